"""RabbitMQ access shared by every process: robust connection, confirmed persistent publishes.

One ``Broker`` per process owns a robust connection (aio-pika reconnects and re-declares after a
broker restart) and a publisher-confirms channel; task events (news: Redis holds the truth) go
on a second channel without confirms; consumers get their own channels so a consumer's prefetch
never limits publishing.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aio_pika
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractRobustConnection,
    DeliveryMode,
)

from shared.artifacts import ArtifactEvent, ArtifactRequest
from shared.constants import PUBLISH_CONFIRM_TIMEOUT_S, ROUTE_ARTIFACTS, ROUTE_SUBMIT
from shared.errors import BrokerError, NotConnectedError
from shared.gitsync import SyncEvent, SyncRequest
from shared.messages import CancelRequest, DrainRequest, TaskEvent, TaskSubmission, encode
from shared.settings import Settings
from shared.topology import DeclaredTopology, Topology, declare

log = structlog.get_logger(__name__)

#: Header carrying the reason a message was dead-lettered.
REASON_HEADER = "x-tp-reason"
#: Header naming the queue a dead-lettered message was taken from.
SOURCE_QUEUE_HEADER = "x-tp-source-queue"

#: What a lost or closing connection raises from aio-pika/aiormq: AMQP errors, socket errors,
#: time-outs, and ``ChannelInvalidStateError`` (a ``RuntimeError``) on a channel closed under us.
BROKER_FAILURES = (
    OSError,
    TimeoutError,
    aio_pika.exceptions.AMQPError,
    aio_pika.exceptions.ChannelInvalidStateError,
)


class Broker:
    """A process's connection to RabbitMQ.

    Args:
        settings: ``amqp_url`` (credentials inside), TLS files, ``namespace``.
        name: connection name shown in the RabbitMQ management UI (``scheduler``, ``worker:host``).
    """

    def __init__(self, settings: Settings, *, name: str) -> None:
        self.settings = settings
        self.topology = Topology(settings.namespace)
        self._name = name
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._declared: DeclaredTopology | None = None
        #: Task events go out on a channel of their own without publisher confirms (news).
        self._news_channel: AbstractChannel | None = None
        self._news_exchange: aio_pika.abc.AbstractExchange | None = None
        #: Events being published in the background (``announce``), awaited by ``stop``.
        self._announcing: set[asyncio.Task[None]] = set()

    async def start(self, *, timeout_s: float = 10.0) -> None:
        """Connect, open a confirming channel and declare the topology.

        Raises:
            BrokerError: the broker cannot be reached within ``timeout_s`` (URL redacted).
        """
        s = self.settings
        try:
            self._connection = await aio_pika.connect_robust(
                s.amqp_url,
                ssl_context=s.amqp_ssl_context(),
                timeout=timeout_s,
                client_properties={"connection_name": f"{self._name}@{socket.gethostname()}"},
            )
            self._channel = await self._connection.channel(publisher_confirms=True)
            self._declared = await declare(self._channel, self.topology)
            self._news_channel = await self._connection.channel(publisher_confirms=False)
            self._news_exchange = await self._news_channel.get_exchange(
                self.topology.events_exchange, ensure=False
            )
        except BROKER_FAILURES as e:
            await self.stop()
            raise BrokerError(s.connection_error("amqp", e)) from e

    async def stop(self, *, timeout_s: float = 10.0) -> None:
        """Close the connection (idempotent; bounded even when the broker is gone).

        Events still being announced get up to ``timeout_s`` to be sent first.
        """
        if self._announcing:
            await asyncio.wait(set(self._announcing), timeout=timeout_s)
        connection, self._connection = self._connection, None
        self._channel = self._declared = None
        self._news_channel = self._news_exchange = None
        if connection is not None:
            try:
                await asyncio.wait_for(connection.close(), timeout_s)
            except BROKER_FAILURES as e:
                log.warning("broker_close_failed", error=repr(e))

    @property
    def connected(self) -> bool:
        """Whether ``start`` succeeded (and ``stop`` was not called since)."""
        return self._connection is not None

    @property
    def connection(self) -> AbstractRobustConnection:
        """The robust connection (``NotConnectedError`` before ``start``)."""
        if self._connection is None:
            raise NotConnectedError("broker used before start()")
        return self._connection

    @property
    def declared(self) -> DeclaredTopology:
        """Exchanges and queues as declared on the publishing channel."""
        if self._declared is None:
            raise NotConnectedError("broker used before start()")
        return self._declared

    async def consumer_channel(self, prefetch: int) -> AbstractChannel:
        """A new channel with ``prefetch`` unacked deliveries at most (basic.qos)."""
        channel = await self.connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        return channel

    async def follow_control(
        self,
        routing_keys: str | Sequence[str],
        on_message: Callable[[AbstractIncomingMessage], Awaitable[None]],
        *,
        prefetch: int = 16,
    ) -> AbstractChannel:
        """Consume ``routing_keys`` of the control exchange on a new channel (no ack: commands).

        An exclusive auto-delete queue per process, bound once per key: every worker (or
        git-sync) hears every command and picks those meant for it; ``message.routing_key``
        tells the commands apart. Close the returned channel with ``close_channel``.

        Args:
            routing_keys: one binding key (``task.cancel``) or several.
            on_message: called with each command.
            prefetch: commands delivered before the callback has returned.
        """
        keys = [routing_keys] if isinstance(routing_keys, str) else list(routing_keys)
        channel = await self.consumer_channel(prefetch)
        name = self.topology.private_queue("control")
        queue = await channel.declare_queue(name, exclusive=True, auto_delete=True)
        control = await channel.get_exchange(self.topology.control_exchange)
        for key in dict.fromkeys(keys):  # once per distinct key, in order
            await queue.bind(control, routing_key=key)
        await queue.consume(on_message, no_ack=True)
        return channel

    @staticmethod
    async def close_channel(channel: AbstractChannel | None, timeout_s: float = 5.0) -> None:
        """Close a channel if it is open; bounded, and quiet when the broker is gone."""
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(*BROKER_FAILURES):
                await asyncio.wait_for(channel.close(), timeout_s)

    async def publish_submission(
        self, submission: TaskSubmission, route: str = ROUTE_SUBMIT
    ) -> None:
        """Publish a task to ``route`` (default intake): persistent, prioritised, confirmed.

        Raises:
            BrokerError: the broker did not confirm within the timeout.
        """
        await self._publish(
            self.declared.tasks,
            route,
            encode(submission),
            priority=submission.priority,
            message_id=submission.task_id,
        )

    async def publish_cancel(self, request: CancelRequest) -> None:
        """Publish ``task.cancel`` on the control exchange (every worker hears it; confirmed)."""
        await self._publish(
            self.declared.control,
            "task.cancel",
            encode(request),
            persistent=False,
            message_id=request.task_id,
        )

    async def publish_drain(self, request: DrainRequest) -> None:
        """Publish ``worker.<name>.drain`` (or ``worker.all.drain``) on the control exchange.

        Transient and confirmed: only workers running now hear it (a drain is for them, not for
        a worker started later); with no worker bound the broker drops it.

        Raises:
            BrokerError: the broker did not confirm within the timeout.
        """
        await self._publish(
            self.declared.control, request.routing_key, encode(request), persistent=False
        )

    async def publish_to_queue(
        self,
        queue: str,
        body: bytes,
        *,
        headers: dict[str, Any] | None = None,
        message_id: str | None = None,
        priority: int | None = None,
    ) -> None:
        """Publish ``body`` straight into ``queue`` through the default exchange (persistent).

        Used to put a dead-lettered message back into the queue it came from. The default
        exchange drops a message for a queue that does not exist, so callers pass only queues
        of this namespace's topology.

        Raises:
            BrokerError: the broker did not confirm within the timeout.
        """
        channel = self._channel
        if channel is None:
            raise NotConnectedError("broker used before start()")
        await self._publish(
            channel.default_exchange,
            queue,
            body,
            headers=headers,
            message_id=message_id,
            priority=priority,
        )

    async def publish_event(self, event: TaskEvent) -> None:
        """Publish a task event on the events exchange: transient and unconfirmed (news).

        Redis holds every task's truth, and a waiting client rereads it when no news comes
        (``wait``'s recheck), so a task event is not worth a publisher confirm: it goes out on a
        channel without them, once written to the socket. Events keep their order (one channel).
        An event over ``max_message_bytes`` (a result with a huge metrics dict) goes without its
        metrics and record: every reader would refuse it, and the record is in Redis anyway.

        Raises:
            BrokerError: the connection is down (the event is not sent).
        """
        if self._news_exchange is None:
            raise NotConnectedError("broker used before start()")
        body = encode(event)
        if len(body) > self.settings.max_message_bytes:
            body = encode(event.model_copy(update={"metrics": {}, "record": None}))
        await self._publish(
            self._news_exchange,
            event.routing_key,
            body,
            persistent=False,
            message_id=event.task_id,
            mandatory=False,
        )

    async def publish_artifact_request(self, request: ArtifactRequest) -> None:
        """Queue an artifact sync on ``<ns>.artifacts`` (persistent, confirmed)."""
        await self._publish(
            self.declared.tasks, ROUTE_ARTIFACTS, encode(request), message_id=request.task_id
        )

    async def publish_artifact_event(self, event: ArtifactEvent) -> None:
        """Publish ``artifact.<state>.<id>`` on the events exchange (confirmed, transient)."""
        await self._publish(
            self.declared.events,
            event.routing_key,
            encode(event),
            persistent=False,
            mandatory=False,
        )

    async def publish_sync_event(self, event: SyncEvent) -> None:
        """Publish git-sync news (``sync.<event>``) on the events exchange (confirmed)."""
        await self._publish(
            self.declared.events,
            event.routing_key,
            encode(event),
            persistent=False,
            mandatory=False,
        )

    async def request_sync(self, request: SyncRequest) -> None:
        """Publish ``sync.now`` on the control exchange: git-sync fetches at once (confirmed)."""
        await self._publish(self.declared.control, "sync.now", encode(request), persistent=False)

    async def publish_raw_event(self, routing_key: str, body: bytes) -> None:
        """Publish an already-encoded JSON event (heartbeats, alerts) on the events exchange."""
        await self._publish(
            self.declared.events, routing_key, body, persistent=False, mandatory=False
        )

    async def announce(self, event: TaskEvent) -> None:
        """``publish_event`` as news, in the background: the caller never waits for the write.

        Redis holds the truth; the event only tells waiting clients to look now. Events are
        sent in the order announced (one channel, tasks started in order); a failure is logged,
        not raised; ``stop`` waits for those still in flight.
        """
        task = asyncio.get_running_loop().create_task(self._announce_now(event))
        self._announcing.add(task)
        task.add_done_callback(self._announcing.discard)

    async def _announce_now(self, event: TaskEvent) -> None:
        try:
            await self.publish_event(event)
        except (BrokerError, NotConnectedError, ValueError) as e:  # ValueError: not encodable
            log.warning(
                "event_not_published", task_id=event.task_id, state=event.state, error=str(e)
            )

    async def dead_letter(
        self, message: AbstractIncomingMessage, reason: str, *, source_queue: str
    ) -> None:
        """Copy ``message`` to the dead-letter queue with ``reason`` and ``source_queue`` headers.

        The caller acks the original afterwards; a plain nack would lose the reason.

        Raises:
            BrokerError: the copy was not confirmed (the caller must not ack the original then).
        """
        headers: dict[str, Any] = dict(message.headers or {})
        headers[REASON_HEADER] = reason[:1000]
        headers[SOURCE_QUEUE_HEADER] = source_queue
        await self._publish(
            self.declared.dead_letter,
            "",
            message.body,
            headers=headers,
            message_id=message.message_id,
        )

    async def _publish(
        self,
        exchange: aio_pika.abc.AbstractExchange,
        routing_key: str,
        body: bytes,
        *,
        priority: int | None = None,
        persistent: bool = True,
        message_id: str | None = None,
        headers: dict[str, Any] | None = None,
        mandatory: bool = True,
    ) -> None:
        """Publish and wait for the broker's confirm (on a confirming channel; else the write).

        ``mandatory=False`` for news on the events exchange: with no follower bound, the broker
        drops it instead of returning it (a ``basic.return`` per unheard event costs both sides
        CPU for nothing). Work (tasks, artifact requests, dead letters) stays mandatory.
        """
        message = aio_pika.Message(
            body,
            content_type="application/json",
            delivery_mode=DeliveryMode.PERSISTENT if persistent else DeliveryMode.NOT_PERSISTENT,
            priority=priority,
            message_id=message_id,
            headers=headers,
        )
        try:
            await exchange.publish(
                message, routing_key, mandatory=mandatory, timeout=PUBLISH_CONFIRM_TIMEOUT_S
            )
        except aio_pika.exceptions.ChannelInvalidStateError as e:
            raise BrokerError(
                f"publish to {exchange.name}/{routing_key} failed: the broker connection is down "
                "or reconnecting"
            ) from e
        except BROKER_FAILURES as e:
            raise BrokerError(f"publish to {exchange.name}/{routing_key} failed: {e}") from e
