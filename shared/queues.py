"""What waits where: queue depths and consumers, queued tasks per priority, dead letters.

Read by ``tradectl queue ...`` and usable by the health-monitor:

- ``queue_depths``: per queue of the namespace (submit, gpu, cpu, artifacts, dead), the ready
  messages and consumers as RabbitMQ reports them to a passive ``queue.declare``.
- ``queued_tasks``: tasks ``queued`` in Redis per priority, and the oldest one's age. Redis and the
  broker can differ: a task waiting for its retry back-off (or for a commit) is ``queued`` in Redis
  with no message in a work queue yet.
- ``peek_dead_letters`` / ``requeue_dead_letter``: the dead-letter queue read with ``basic.get``
  and every message handed back (``nack`` with requeue, back to its place), so listing never loses
  one; a requeue republishes one message to the queue it came from (confirmed) before it acks the
  dead copy, so a crash in between leaves a duplicate, never a loss.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from pydantic import BaseModel, ConfigDict

from shared.broker import BROKER_FAILURES, REASON_HEADER, SOURCE_QUEUE_HEADER, Broker
from shared.constants import ROUTE_SUBMIT
from shared.errors import BrokerError, DeadLetterNotFoundError
from shared.messages import TaskState
from shared.store import StatusStore
from shared.topology import Topology

#: Header counting how often a dead letter was put back (``tradectl queue dead --requeue``), so a
#: message that keeps coming back is recognised as such.
REQUEUES_HEADER = "x-tp-requeues"
#: Headers a requeue drops: the old reason and source, and RabbitMQ's own ``x-death`` record.
_DEAD_LETTER_HEADERS = (REASON_HEADER, SOURCE_QUEUE_HEADER, "x-death")
#: Characters of a dead letter's body shown in a listing.
PREVIEW_CHARS = 160
#: Queued task records read for the per-priority counts; beyond it the counts are partial.
QUEUED_SCAN_LIMIT = 10_000
#: Messages a requeue looks through for the one asked for (each is held unacked meanwhile).
REQUEUE_SCAN_LIMIT = 10_000
#: Bound on one ``basic.get`` or passive ``queue.declare`` (s).
GET_TIMEOUT_S = 10.0
DECLARE_TIMEOUT_S = 10.0


class QueueDepth(BaseModel):
    """One queue as RabbitMQ reports it.

    ``messages`` counts ready messages (``queue.declare``'s ``message_count``); deliveries a
    consumer holds unacked are not in it (workers ack at claim, so there are few).
    """

    model_config = ConfigDict(frozen=True)

    name: str
    messages: int
    consumers: int


class PriorityCount(BaseModel):
    """How many tasks of one priority (0-9) are ``queued`` in Redis."""

    model_config = ConfigDict(frozen=True)

    priority: int
    tasks: int


class QueuedTasks(BaseModel):
    """Tasks ``queued`` in Redis: in all, per priority (highest first), and the oldest.

    ``counted`` records were read for ``by_priority``; when it is below ``total`` the per-priority
    counts cover only the ``counted`` longest-queued tasks.
    """

    model_config = ConfigDict(frozen=True)

    total: int
    counted: int
    by_priority: list[PriorityCount]
    oldest_queued_at: float | None
    oldest_age_s: float | None


class QueueReport(BaseModel):
    """``tradectl queue status``: every queue, the queued tasks, and the dead letters waiting."""

    model_config = ConfigDict(frozen=True)

    queues: list[QueueDepth]
    tasks: QueuedTasks
    dead_letter_queue: str
    dead_letters: int


class DeadLetter(BaseModel):
    """One message in the dead-letter queue.

    ``id`` is what ``--requeue`` takes: the message id (a task id for submissions; aio-pika gives
    every message it publishes one), else the ``task_id`` in the body, else
    ``body:<12 hex of the body's SHA-256>`` (a message RabbitMQ dead-lettered itself, published
    without an id).
    """

    model_config = ConfigDict(frozen=True)

    id: str
    message_id: str | None
    task_id: str | None
    reason: str
    source_queue: str | None
    requeues: int
    size_bytes: int
    preview: str


class DeadLetterList(BaseModel):
    """The first ``len(letters)`` of the ``total`` dead letters waiting, oldest first."""

    model_config = ConfigDict(frozen=True)

    total: int
    letters: list[DeadLetter]


class Requeued(BaseModel):
    """A dead letter put back, and the queue it went to."""

    model_config = ConfigDict(frozen=True)

    letter: DeadLetter
    queue: str


async def queue_depths(channel: AbstractChannel, topology: Topology) -> list[QueueDepth]:
    """Ready messages and consumers of every queue of ``topology``, in ``all_queues`` order.

    Each count comes from a passive ``queue.declare`` sent on the AMQP channel itself: aio-pika's
    robust channel answers a passive declare of a queue it already knows from its cache, with
    the counts of the first declare, so a monitor reusing a channel would see frozen numbers.

    Args:
        channel: a channel of its own: a missing queue closes it (AMQP 404).
        topology: the namespace's names.

    Raises:
        BrokerError: a queue does not exist, or the broker failed.
    """
    depths = []
    try:
        amqp = await channel.get_underlay_channel()
    except BROKER_FAILURES as e:
        raise BrokerError(f"reading queue depths failed: {e}") from e
    for name in topology.all_queues:
        try:
            ok = await amqp.queue_declare(name, passive=True, timeout=DECLARE_TIMEOUT_S)
        except aio_pika.exceptions.ChannelNotFoundEntity as e:
            raise BrokerError(f"queue {name} does not exist", queue=name) from e
        except BROKER_FAILURES as e:
            raise BrokerError(f"reading queue {name} failed: {e}", queue=name) from e
        depths.append(
            QueueDepth(name=name, messages=ok.message_count or 0, consumers=ok.consumer_count or 0)
        )
    return depths


async def queued_tasks(store: StatusStore, limit: int = QUEUED_SCAN_LIMIT) -> QueuedTasks:
    """Tasks ``queued`` in Redis per priority, from the store's per-state index.

    Args:
        store: the status store.
        limit: records read for the per-priority counts (the longest-queued first).

    Raises:
        StoreError: Redis failed.
    """
    total = (await store.count_by_state())[TaskState.QUEUED]
    records = await store.in_state(TaskState.QUEUED, limit) if total else []
    counts = Counter(r.priority for r in records)
    oldest = await store.oldest_in_state(TaskState.QUEUED)
    return QueuedTasks(
        total=total,
        counted=len(records),
        by_priority=[PriorityCount(priority=p, tasks=n) for p, n in sorted(counts.items())[::-1]],
        oldest_queued_at=oldest,
        oldest_age_s=None if oldest is None else max(0.0, time.time() - oldest),
    )


async def queue_report(broker: Broker, store: StatusStore) -> QueueReport:
    """Queue depths (on a channel of its own), queued tasks per priority, dead letters waiting.

    Raises:
        BrokerError: RabbitMQ failed or a queue is missing.
        StoreError: Redis failed.
    """
    channel = await _open_channel(broker)
    try:
        depths = await queue_depths(channel, broker.topology)
    finally:
        await broker.close_channel(channel)
    dead_queue = broker.topology.dead_letter_queue
    return QueueReport(
        queues=depths,
        tasks=await queued_tasks(store),
        dead_letter_queue=dead_queue,
        dead_letters=next(d.messages for d in depths if d.name == dead_queue),
    )


async def peek_dead_letters(broker: Broker, limit: int = 100) -> DeadLetterList:
    """The first ``limit`` dead letters, oldest first, every one left in the queue.

    Each is taken with ``basic.get`` (unacked) and handed back with ``nack(requeue=True)``, which
    returns it to its place; should this process die meanwhile, the broker requeues them when the
    channel closes. The handed-back messages are flagged ``redelivered``, nothing else changes.

    Raises:
        BrokerError: RabbitMQ failed.
    """
    async with _borrowed_dead_letters(broker) as (queue, held):
        total = queue.declaration_result.message_count
        while len(held) < limit:
            message = await _get(queue)
            if message is None:
                break
            held.append(message)
        return DeadLetterList(total=total, letters=[describe_dead_letter(m) for m in held])


async def requeue_dead_letter(
    broker: Broker, letter_id: str, *, scan_limit: int = REQUEUE_SCAN_LIMIT
) -> Requeued:
    """Put one dead letter back into the queue it came from and remove it from the dead queue.

    The message goes to its ``x-tp-source-queue`` (or ``x-death``'s queue) when that is a work
    queue of this namespace, else to the submit queue; its reason headers are dropped and
    ``x-tp-requeues`` counts the requeue. The copy is confirmed before the dead one is acked. A
    message still bad is dead-lettered again by its consumer, with its reason: never lost.

    Args:
        broker: a started broker.
        letter_id: a ``DeadLetter.id``, message id or task id; the oldest match is requeued.
        scan_limit: dead letters looked through at most.

    Raises:
        DeadLetterNotFoundError: no dead letter has that id (among the first ``scan_limit``).
        BrokerError: RabbitMQ failed (the dead letter then stays where it was).
    """
    async with _borrowed_dead_letters(broker) as (queue, held):
        message, letter = await _find(broker, queue, held, letter_id, scan_limit)
        target = _target_queue(letter, broker.topology)
        await broker.publish_to_queue(
            target,
            message.body,
            headers=_requeue_headers(message, letter.requeues),
            message_id=message.message_id,
            priority=message.priority,
        )
        # Republished: if the ack below fails the broker requeues the dead copy, a duplicate a
        # person sees in the next listing, never a loss.
        await _remove(held, message, "requeued, but removing the dead copy failed")
        return Requeued(letter=letter, queue=target)


async def drop_dead_letter(
    broker: Broker, letter_id: str, *, scan_limit: int = REQUEUE_SCAN_LIMIT
) -> DeadLetter:
    """Delete one dead letter for good (a person read it and decided it is garbage).

    Raises:
        DeadLetterNotFoundError: no dead letter has that id (among the first ``scan_limit``).
        BrokerError: RabbitMQ failed (the dead letter then stays where it was).
    """
    async with _borrowed_dead_letters(broker) as (queue, held):
        message, letter = await _find(broker, queue, held, letter_id, scan_limit)
        await _remove(held, message, "removing the dead letter failed")
        return letter


async def _find(
    broker: Broker,
    queue: AbstractQueue,
    held: list[AbstractIncomingMessage],
    letter_id: str,
    scan_limit: int,
) -> tuple[AbstractIncomingMessage, DeadLetter]:
    """The oldest dead letter matching ``letter_id``; every delivery read is kept in ``held``."""
    while len(held) < scan_limit:
        message = await _get(queue)
        if message is None:
            break
        held.append(message)  # handed back on exit unless removed
        letter = describe_dead_letter(message)
        if letter_id in (letter.id, letter.message_id, letter.task_id):
            return message, letter
    raise DeadLetterNotFoundError(
        f"no dead letter with id {letter_id!r} among the {len(held)} in "
        f"{broker.topology.dead_letter_queue}",
        letter_id=letter_id,
    )


async def _remove(
    held: list[AbstractIncomingMessage], message: AbstractIncomingMessage, failure: str
) -> None:
    """Ack ``message`` (taking it out of the dead-letter queue) instead of handing it back."""
    held.remove(message)
    try:
        await message.ack()
    except BROKER_FAILURES as e:
        raise BrokerError(f"{failure}: {e}") from e


def describe_dead_letter(message: AbstractIncomingMessage) -> DeadLetter:
    """A dead-lettered message's id, reason, source queue and a printable preview of its body."""
    headers: dict[str, Any] = dict(message.headers or {})
    death = _first_death(headers)
    task_id = _body_task_id(message.body)
    digest = hashlib.sha256(message.body).hexdigest()[:12]
    text = message.body[:PREVIEW_CHARS].decode("utf-8", "replace")
    return DeadLetter(
        id=message.message_id or task_id or f"body:{digest}",
        message_id=message.message_id,
        task_id=task_id,
        reason=str(headers.get(REASON_HEADER) or death.get("reason") or "unknown"),
        source_queue=_text(headers.get(SOURCE_QUEUE_HEADER) or death.get("queue")),
        requeues=_count(headers.get(REQUEUES_HEADER)),
        size_bytes=len(message.body),
        preview="".join(c if c.isprintable() else "\N{REPLACEMENT CHARACTER}" for c in text),
    )


@contextlib.asynccontextmanager
async def _borrowed_dead_letters(
    broker: Broker,
) -> AsyncIterator[tuple[AbstractQueue, list[AbstractIncomingMessage]]]:
    """The dead-letter queue on a channel of its own, and a list of deliveries to hand back.

    Every delivery left in the list is nacked with requeue on exit, then the channel is closed
    (which requeues anything a failed nack left behind).
    """
    channel = await _open_channel(broker)
    held: list[AbstractIncomingMessage] = []
    name = broker.topology.dead_letter_queue
    try:
        try:
            queue = await channel.declare_queue(name, passive=True)
        except BROKER_FAILURES as e:
            raise BrokerError(f"reading {name} failed: {e}", queue=name) from e
        yield queue, held
    finally:
        with contextlib.suppress(*BROKER_FAILURES):
            for message in held:
                await message.nack(requeue=True)
        await broker.close_channel(channel)


async def _open_channel(broker: Broker) -> AbstractChannel:
    try:
        return await broker.connection.channel()
    except BROKER_FAILURES as e:
        raise BrokerError(f"opening a channel failed: {e}") from e


async def _get(queue: AbstractQueue) -> AbstractIncomingMessage | None:
    """``basic.get`` without auto-ack: the next ready message, or None when none is left."""
    try:
        return await queue.get(no_ack=False, fail=False, timeout=GET_TIMEOUT_S)
    except BROKER_FAILURES as e:
        raise BrokerError(f"reading {queue.name} failed: {e}", queue=queue.name) from e


def _target_queue(letter: DeadLetter, topology: Topology) -> str:
    """The letter's source queue when it is a work queue of ``topology``, else the submit queue."""
    work = [q for q in topology.all_queues if q != topology.dead_letter_queue]
    return letter.source_queue if letter.source_queue in work else topology.queue(ROUTE_SUBMIT)


def _requeue_headers(message: AbstractIncomingMessage, requeues: int) -> dict[str, Any]:
    headers = {k: v for k, v in (message.headers or {}).items() if k not in _DEAD_LETTER_HEADERS}
    headers[REQUEUES_HEADER] = requeues + 1
    return headers


def _first_death(headers: dict[str, Any]) -> dict[str, Any]:
    """The newest ``x-death`` entry RabbitMQ added (a plain nack or an expiry), or ``{}``."""
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        return deaths[0]
    return {}


def _body_task_id(body: bytes) -> str | None:
    """The ``task_id`` of a JSON object body, if it has a string one."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    task_id = data.get("task_id") if isinstance(data, dict) else None
    return task_id if isinstance(task_id, str) and task_id else None


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value) if value else None


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
