"""Held tasks: dependencies (``depends_on``) and start times (``not_before``).

A task with parents or a start time stays ``submitted`` (with ``waiting`` saying why) and is
listed in ``<ns>:held`` and under each parent (``<ns>:task:<parent>:children``). One evaluation,
idempotent, decides its fate from the parents' states, which are terminal once decided:
    a parent failed, was cancelled or is gone  -> ``failed`` "parent <id> failed: <its error>",
                                                  and its own children are evaluated at once
    a parent not completed yet                 -> still held; looked at again in
                                                  ``reaper_interval_s`` (or at once on news)
    start time not reached                     -> still held until then
    all parents completed                      -> references filled in from their results, the
                                                  whole config validated (a failure fails the
                                                  task naming the field), then ``queued``, due
                                                  for dispatch, and published

Three paths evaluate: the intake, after recording and listing the task (so a parent that ends
meanwhile is either seen ended here or finds the child listed); a parent's ``task.completed``,
``task.failed`` or ``task.cancelled`` event (for speed); and a pass over the held tasks every
``schedule_poll_s`` (the truth: events are news and may be lost). Every move is one
compare-and-set from ``submitted``, so two evaluations of one task move it once.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import Any

import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from shared.broker import Broker
from shared.errors import BrokerError, DecodeError, StoreError, TaskError, TaskNotFoundError
from shared.events import state_event
from shared.messages import TaskEvent, TaskState, decode
from shared.references import resolve_config
from shared.schedules import format_utc
from shared.settings import Settings
from shared.store import HAS_CHILDREN_FIELD, StatusStore, TaskRecord
from shared.task_types import validate_config

log = structlog.get_logger(__name__)

#: Events that may release or fail a held child: its parent ended.
PARENT_END_KEYS = ("task.completed.*", "task.failed.*", "task.cancelled.*")

#: Parent-end events handled at once by the scheduler (each evaluates that parent's children).
EVENTS_PREFETCH = 32


class Held(StrEnum):
    """What one evaluation did to a held task."""

    HELD = "held"
    QUEUED = "queued"
    FAILED = "failed"
    GONE = "gone"  # no longer ``submitted``: released, failed or cancelled elsewhere


class Dependencies:
    """Holds and releases tasks in the scheduler.

    Args:
        settings: ``reaper_interval_s`` (how soon a waiting child is looked at again without
            news of its parents), ``max_message_bytes``.
        store: the status store.
        broker: to announce failures and follow parents' ends.
        dispatch: publishes a task just released (the reaper's ``dispatch``).
    """

    def __init__(
        self,
        settings: Settings,
        store: StatusStore,
        broker: Broker,
        dispatch: Callable[[str], Awaitable[None]],
    ) -> None:
        self.settings = settings
        self.store = store
        self.broker = broker
        self._dispatch = dispatch
        self._channel: AbstractChannel | None = None

    async def start(self) -> None:
        """Follow parents' ends on the events exchange (an exclusive auto-delete queue)."""
        channel = await self.broker.consumer_channel(EVENTS_PREFETCH)
        name = self.broker.topology.private_queue("parents")
        queue = await channel.declare_queue(name, exclusive=True, auto_delete=True)
        events = await channel.get_exchange(self.broker.topology.events_exchange)
        for key in PARENT_END_KEYS:
            await queue.bind(events, routing_key=key)
        await queue.consume(self.on_event, no_ack=True)
        self._channel = channel

    async def stop(self) -> None:
        """Stop following events."""
        channel, self._channel = self._channel, None
        await Broker.close_channel(channel)

    async def hold(self, task_id: str, parents: list[str]) -> Held:
        """List a new task as held (under each parent too), then evaluate it.

        Raises:
            StoreError, BrokerError: the intake hands the message back and tries again.
        """
        await self.store.hold(task_id, parents, check_at=await self.store.now())
        return await self.evaluate_tree(task_id)

    async def on_event(self, message: AbstractIncomingMessage) -> None:
        """A task ended: evaluate the tasks waiting for it (failures wait for the next pass)."""
        try:
            event = decode(message.body, TaskEvent, max_bytes=self.settings.max_message_bytes)
        except DecodeError as e:
            log.warning("event_undecodable", error=str(e))
            return
        if event.record is not None and HAS_CHILDREN_FIELD not in event.record:
            return  # the record as the task ended: no task was ever held for it
        try:
            for child in await self.store.children(event.task_id):
                await self.evaluate_tree(child)
        except (StoreError, BrokerError) as e:
            log.warning("children_release_failed", parent=event.task_id, error=str(e))

    async def run_due(self) -> None:
        """Evaluate every held task due for a look (start time reached, or no news for a while)."""
        for task_id in await self.store.due_held():
            try:
                await self.evaluate_tree(task_id)
            except (StoreError, BrokerError) as e:
                log.error("held_task_check_failed", task_id=task_id, error=str(e))
            except Exception:  # one bad task must not end the planner for every other one
                log.exception("held_task_check_crashed", task_id=task_id)

    async def evaluate_tree(self, task_id: str) -> Held:
        """Evaluate ``task_id``; when it fails, its children (and theirs) at once."""
        first: Held | None = None
        pending = [task_id]
        while pending:
            current = pending.pop()
            outcome = await self.evaluate(current)
            first = first or outcome
            if outcome is Held.FAILED:
                pending.extend(await self.store.children(current))
        return first or Held.GONE

    async def evaluate(self, task_id: str) -> Held:
        """Decide one held task's fate (see the module docstring); idempotent."""
        record = await self._held_record(task_id)
        if record is None:
            await self.store.unhold(task_id)
            return Held.GONE
        parents = {p.task_id: p for p in await self.store.get_many(record.depends_on)}
        blocker = _blocking_parent(record.depends_on, parents)
        if blocker is not None:
            return await self._fail(record, blocker)
        wait = self._wait_for(record, parents, await self.store.now())
        if wait is not None:
            await self._wait(record, *wait)
            return Held.HELD
        try:
            config = _resolved_config(record, parents)
        except TaskError as e:
            return await self._fail(record, str(e))
        return await self._release(record, config)

    async def _held_record(self, task_id: str) -> TaskRecord | None:
        """The task's record while it is ``submitted``, else None (gone, or moved on)."""
        try:
            record = await self.store.get(task_id)
        except TaskNotFoundError:
            return None
        return record if record.state is TaskState.SUBMITTED else None

    def _wait_for(
        self, record: TaskRecord, parents: dict[str, TaskRecord], now: float
    ) -> tuple[str, float] | None:
        """``(what it waits for, when to look again)`` while it must wait, else None."""
        pending = [p for p in record.depends_on if parents[p].state is not TaskState.COMPLETED]
        if pending:
            waiting = f"waiting for {_plural('parent', pending)} {', '.join(pending)} to complete"
            return waiting, now + self.settings.reaper_interval_s
        if record.not_before is not None and record.not_before > now:
            return f"waiting for its start time {format_utc(record.not_before)}", record.not_before
        return None

    async def _wait(self, record: TaskRecord, waiting: str, check_at: float) -> None:
        if record.waiting != waiting:
            await self.store.update_if(record.task_id, [TaskState.SUBMITTED], {"waiting": waiting})
        await self.store.recheck_held(record.task_id, check_at)

    async def _fail(self, record: TaskRecord, reason: str) -> Held:
        moved = await self.store.transition(
            record.task_id,
            [TaskState.SUBMITTED],
            TaskState.FAILED,
            by="scheduler",
            reason=reason,
            fields={"error": reason, "waiting": ""},
        )
        await self.store.unhold(record.task_id)
        if not moved.applied:
            return Held.GONE
        log.warning("held_task_failed", task_id=record.task_id, error=reason)
        await self.broker.announce(state_event(record.task_id, TaskState.FAILED, error=reason))
        return Held.FAILED

    async def _release(self, record: TaskRecord, config: dict[str, Any]) -> Held:
        fields: dict[str, str | int | float] = {
            "config": json.dumps(config),
            "waiting": "",
            "retry_in_s": 0,  # due for dispatch now: the pump publishes it if we cannot
        }
        if record.config_refs:
            fields["config_template"] = json.dumps(record.config)
        reason = (
            f"{_plural('parent', record.depends_on)} completed"
            if record.depends_on
            else "start time reached"
        )
        moved = await self.store.transition(
            record.task_id,
            [TaskState.SUBMITTED],
            TaskState.QUEUED,
            by="scheduler",
            reason=reason,
            fields=fields,
        )
        await self.store.unhold(record.task_id)
        if not moved.applied:
            return Held.GONE
        log.info("held_task_released", task_id=record.task_id, reason=reason)
        await self._dispatch(record.task_id)
        return Held.QUEUED


def _blocking_parent(depends_on: list[str], parents: dict[str, TaskRecord]) -> str | None:
    """Why the child can never run (the first parent failed, cancelled or gone), or None."""
    for parent_id in depends_on:
        parent = parents.get(parent_id)
        if parent is None:
            return f"parent {parent_id} no longer exists"
        if parent.state is TaskState.FAILED:
            return f"parent {parent_id} failed: {parent.error or 'no error recorded'}"
        if parent.state is TaskState.CANCELLED:
            return f"parent {parent_id} was cancelled"
    return None


def _resolved_config(record: TaskRecord, parents: dict[str, TaskRecord]) -> dict[str, Any]:
    """The config filled in from the parents' results and validated in full.

    Raises:
        DependencyError: a reference cannot be resolved (names the field).
        TaskConfigError, UnknownTaskTypeError: the result does not validate (names the field).
    """
    config = record.config
    if record.config_refs:
        results = {p: parents[p].result for p in record.depends_on}
        config = resolve_config(config, record.config_refs, results)
    return validate_config(record.task_type, config).model_dump(mode="json")


def _plural(word: str, items: list[str]) -> str:
    return word if len(items) == 1 else f"{word}s"
