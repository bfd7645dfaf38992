"""A lane: one work queue consumed with a fixed number of execution slots.

Claim first, never hold a delivery long, and never let a delivery wait inside a busy worker:
on a delivery the lane claims the task in Redis (``queued -> running``); if that used the last free
slot it cancels its consumer *before* acking, so the broker cannot push the next message (which
would then skip ahead of a higher-priority task published later); it consumes again when a slot
frees. A refused claim (task taken, cancelled, finished) acks and drops the delivery.
"""

from __future__ import annotations

import asyncio
import time

import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from services.gpu_worker.execution import TaskExecution, WorkerEnv
from shared.errors import BrokerError, DecodeError, StoreError
from shared.events import state_event
from shared.messages import TaskState, TaskSubmission, decode

log = structlog.get_logger(__name__)

#: Pause before handing a delivery back when Redis or the broker failed, so an outage does not
#: become a hot redelivery loop (s).
REDELIVERY_BACKOFF_S = 1.0

#: Lease a claim takes (s); renewed while the task runs (the reaper that acts on it is later work).
LEASE_S = 60.0


class Lane:
    """Consumes ``route``'s queue with ``slots`` slots (prefetch = slots)."""

    def __init__(self, route: str, slots: int, env: WorkerEnv) -> None:
        self.route = route
        self.slots = slots
        self.env = env
        self.settings = env.settings
        self.store = env.store
        self.broker = env.broker
        self.worker = env.name
        self.running: dict[str, TaskExecution] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._stopping = False

    async def start(self) -> None:
        self._channel = await self.broker.consumer_channel(prefetch=self.slots)
        self._queue = await self._channel.get_queue(self.broker.topology.queue(self.route))
        await self._resume()

    async def stop(self) -> None:
        """Stop consuming; running tasks are left to the caller (see ``Worker.stop``)."""
        self._stopping = True
        await self._pause()

    async def wait_idle(self) -> None:
        """Wait until no task of this lane runs."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()

    async def _resume(self) -> None:
        if self._consumer_tag is None and self._queue is not None and not self._stopping:
            self._consumer_tag = await self._queue.consume(self.on_message)

    async def _pause(self) -> None:
        if self._consumer_tag is not None and self._queue is not None:
            tag, self._consumer_tag = self._consumer_tag, None
            await self._queue.cancel(tag)

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            await self._handle(message)
        except (StoreError, BrokerError) as e:
            log.warning("delivery_deferred", error=str(e), route=self.route)
            await asyncio.sleep(REDELIVERY_BACKOFF_S)
            await message.nack(requeue=True)
        except Exception:  # a service never dies of a message
            log.exception("delivery_crashed", route=self.route)
            await self.broker.dead_letter(message, "worker error while handling delivery")
            await message.ack()

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        try:
            submission = decode(
                message.body, TaskSubmission, max_bytes=self.settings.max_message_bytes
            )
        except DecodeError as e:
            await self.broker.dead_letter(message, str(e))
            await message.ack()
            return
        task_id = submission.task_id
        if len(self.running) >= self.slots:
            # Only a delivery already in flight when the consumer was cancelled lands here: hand it
            # back unclaimed so it keeps its place by priority.
            await message.nack(requeue=True)
            return
        claim = await self.store.transition(
            task_id,
            [TaskState.QUEUED],
            TaskState.RUNNING,
            by=self.worker,
            fields={"worker": self.worker, "+attempts": 1, "lease_until": time.time() + LEASE_S},
        )
        if not claim.applied:
            log.info("claim_refused", task_id=task_id, state=claim.previous)
            await message.ack()
            return
        record = await self.store.get(task_id)
        self.running[task_id] = TaskExecution(submission, record.attempts, self.env)
        if len(self.running) >= self.slots:
            await self._pause()  # before the ack, or the broker pushes the next message now
        await message.ack()
        await self.broker.publish_event(state_event(task_id, TaskState.RUNNING, worker=self.worker))
        task = asyncio.create_task(self._execute(task_id), name=f"task-{task_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _execute(self, task_id: str) -> None:
        execution = self.running[task_id]
        structlog.contextvars.bind_contextvars(task_id=task_id)
        renewal = asyncio.create_task(self._renew_lease(task_id))
        try:
            await execution.run()
        except Exception:
            log.exception("task_execution_crashed")
        finally:
            renewal.cancel()
            del self.running[task_id]
            await self._resume()

    async def _renew_lease(self, task_id: str) -> None:
        while True:
            await asyncio.sleep(LEASE_S / 3)
            try:
                await self.store.update_if(
                    task_id, [TaskState.RUNNING], {"lease_until": time.time() + LEASE_S}
                )
            except StoreError as e:
                log.warning("lease_not_renewed", error=str(e))
