"""A lane: one work queue consumed with a fixed number of execution slots.

Claim first, never hold a delivery long, and never let a delivery wait inside a busy worker
(DESIGN.md, "Task lifecycle"): on a delivery the lane claims the task in Redis
(``queued -> running``) and starts it. Its delivery stays unacked while the task runs, so prefetch
(= free slots) keeps the broker from pushing a message no slot could take (it would skip ahead of
a higher-priority task published later); the task's end acks it, and the broker hands out the
next task at once. A task that runs past ``worker_ack_hold_s`` (far below RabbitMQ's
``consumer_timeout``) has its delivery acked then: the consumer is cancelled *before* that ack,
and the lane consumes again, with prefetch = free slots, when a slot frees. With
``worker_ack_hold_s = 0`` every delivery is acked right after its claim that way. A refused
claim (task taken, cancelled, finished) acks and drops the delivery. While the claim is in
flight an idle child of the pool already makes the task's folders (``runner.prepare``); it runs
the task only once the claim applied, and is idle again otherwise.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from services.gpu_worker import runner
from services.gpu_worker.commits import CommitGate, Gate
from services.gpu_worker.execution import TaskExecution, WorkerEnv, child_job
from shared.broker import BROKER_FAILURES
from shared.consuming import handle_delivery, settle
from shared.errors import DecodeError
from shared.events import state_event
from shared.messages import TaskState, TaskSubmission, decode

log = structlog.get_logger(__name__)

#: Pause between attempts to consume again while the broker is away (s).
RESUME_RETRY_S = 2.0
#: Bound on a channel operation while stopping, so a dead broker cannot hang the stop (s).
BROKER_OP_TIMEOUT_S = 5.0


class Lane:
    """Consumes ``route``'s queue with ``slots`` slots (prefetch = slots)."""

    def __init__(self, route: str, slots: int, env: WorkerEnv, gate: CommitGate) -> None:
        self.route = route
        self.slots = slots
        self.env = env
        self.gate = gate
        self.running: dict[str, TaskExecution] = {}
        #: Deliveries between their slot check and their start (claim, commit check): they hold
        #: a slot too, or several handled at once would all pass the check and overrun it.
        self._reserved = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._stopping = False
        #: Deliveries of running tasks, unacked until the task ends or runs past the hold bound.
        self._held: dict[str, AbstractIncomingMessage] = {}
        self._hold_timers: dict[str, asyncio.TimerHandle] = {}
        #: Running tasks whose slot the current consumer's prefetch does not count: acked early,
        #: or delivered to an earlier consumer. Their end must renew the consumer.
        self._uncounted: set[str] = set()
        #: Consumer changes (cancel, qos + consume) one at a time, or two resumes make two.
        self._consumer_lock = asyncio.Lock()

    @property
    def queue_name(self) -> str:
        """The queue this lane consumes."""
        return self.env.broker.topology.queue(self.route)

    async def start(self) -> None:
        self._channel = await self.env.broker.consumer_channel(prefetch=self.slots)
        self._queue = await self._channel.get_queue(self.queue_name)
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
            try:
                await asyncio.wait_for(self._channel.close(), BROKER_OP_TIMEOUT_S)
            except BROKER_FAILURES as e:
                log.warning("channel_close_failed", error=repr(e))

    async def _resume(self) -> None:
        """Consume again; while the broker is away, keep trying until it is back or we stop."""
        async with self._consumer_lock:
            await self._resume_locked()

    async def _resume_locked(self) -> None:
        while self._consumer_tag is None and self._queue is not None and not self._stopping:
            free = self.slots - len(self.running) - self._reserved
            if free <= 0:
                return  # the next task's end resumes it
            try:
                if self._channel is not None:  # prefetch = free slots: nothing to hand back
                    await self._channel.set_qos(prefetch_count=free)
                self._consumer_tag = await self._queue.consume(self.on_message)
                # Prefetch counts only what this consumer delivers: running tasks are outside it.
                self._uncounted = set(self.running)
            except BROKER_FAILURES as e:
                log.warning("consume_failed", error=repr(e), retry_in_s=RESUME_RETRY_S)
                await asyncio.sleep(RESUME_RETRY_S)

    async def _pause(self) -> None:
        async with self._consumer_lock:
            await self._pause_locked()

    async def _renew(self) -> None:
        """Cancel the consumer (if any) and consume again with prefetch = the free slots now."""
        async with self._consumer_lock:
            await self._pause_locked()
            await self._resume_locked()

    async def _pause_locked(self) -> None:
        if self._consumer_tag is not None and self._queue is not None:
            tag, self._consumer_tag = self._consumer_tag, None
            try:
                await asyncio.wait_for(self._queue.cancel(tag), BROKER_OP_TIMEOUT_S)
            except BROKER_FAILURES as e:  # a closed channel has no consumer left anyway
                log.warning("consumer_cancel_failed", error=repr(e))

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        await handle_delivery(
            message, self._handle, broker=self.env.broker, source_queue=self.queue_name
        )

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        try:
            submission = decode(
                message.body, TaskSubmission, max_bytes=self.env.settings.max_message_bytes
            )
        except DecodeError as e:
            await self.env.broker.dead_letter(message, str(e), source_queue=self.queue_name)
            await settle(message)
            return
        if len(self.running) + self._reserved >= self.slots:
            # A delivery no slot can take: one already in flight when the consumer was
            # cancelled, or prefetch stopped counting the running tasks (the channel was
            # reopened after a broker outage, RabbitMQ requeued their held deliveries, and the
            # restored consumer has its old prefetch). Stop consuming until a slot frees (else
            # the broker pushes it straight back, in a loop), then hand it back unclaimed so it
            # keeps its place by priority.
            self._uncounted.update(self.running)
            await self._pause()
            await settle(message, requeue=True)
            return
        self._reserved += 1  # no await between the check and this: the slot is taken
        try:
            await self._claim_and_start(message, submission)
        finally:
            self._reserved -= 1
        # A task that ended while this delivery still held its slot found no free slot to
        # resume with: resume now (a no-op while consuming or full).
        await self._resume()

    async def _claim_and_start(
        self, message: AbstractIncomingMessage, submission: TaskSubmission
    ) -> None:
        if not await self._commit_ready(submission):
            await settle(message)
            return
        # An idle child makes the task's folders while the claim is in flight; it runs the task
        # only if the claim applies.
        prepared = runner.prepare(child_job(submission, 0, self.env, route=self.route))
        try:
            claim = await self.env.store.claim(
                submission.task_id,
                self.env.name,
                lease_s=self.env.settings.lease_s,
                code_commit=self.env.code_commit,
            )
        except BaseException:
            if prepared is not None:
                runner.release_prepared(prepared)
            raise
        if claim.applied:
            await self._start(message, submission, claim.attempts, prepared)
            return
        if prepared is not None:
            runner.release_prepared(prepared)
        if claim.previous is None:
            await self.env.broker.dead_letter(
                message, f"no task record for {submission.task_id!r}", source_queue=self.queue_name
            )
            await settle(message)
        else:
            log.info("claim_refused", task_id=submission.task_id, state=claim.previous)
            await settle(message)

    async def _commit_ready(self, submission: TaskSubmission) -> bool:
        """True if this worker's code may run the task now; else it was held back or failed."""
        verdict = await self.gate.check(submission)
        if verdict.action is Gate.RUN:
            return True
        task_id = submission.task_id
        if verdict.action is Gate.DEFER:
            waited = await self.env.store.defer(task_id, verdict.delay_s, verdict.waiting)
            if waited is None or waited < self.env.settings.commit_wait_s:
                log.info(
                    "task_held_back", task_id=task_id, waiting=verdict.waiting, waited_s=waited
                )
                return False
        moved = await self.env.store.transition(
            task_id,
            [TaskState.QUEUED],
            TaskState.FAILED,
            by=self.env.name,
            reason=verdict.failure,
            fields={"error": verdict.failure, "waiting": ""},
        )
        if moved.applied:
            log.warning("task_failed_commit_missing", task_id=task_id, error=verdict.failure)
            await self.env.broker.announce(
                state_event(task_id, TaskState.FAILED, worker=self.env.name, error=verdict.failure)
            )
        return False

    async def _start(
        self,
        message: AbstractIncomingMessage,
        submission: TaskSubmission,
        attempt: int,
        prepared: runner.WarmChild | None = None,
    ) -> None:
        """Run a claimed task. From the claim on the task is ours: nothing here hands it back.

        A lost ack only means a redelivery, whose claim is then refused. ``prepared``: the idle
        child already handed the task to prepare (``runner.prepare``), which runs it.
        """
        task_id = submission.task_id
        self.running[task_id] = TaskExecution(
            submission, attempt, self.env, route=self.route, prepared=prepared
        )
        if message.consumer_tag is None or message.consumer_tag != self._consumer_tag:
            self._uncounted.add(task_id)  # delivered just before its consumer was cancelled
        hold_s = self.env.settings.worker_ack_hold_s
        if hold_s > 0:
            self._held[task_id] = message
            self._hold_timers[task_id] = asyncio.get_running_loop().call_later(
                hold_s, self._spawn_release, task_id
            )
        self._spawn(self._execute(task_id), f"task-{task_id}")
        if hold_s <= 0:
            await self._ack_early(task_id, message)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _spawn_release(self, task_id: str) -> None:
        self._spawn(self._release(task_id), f"release-{task_id}")

    async def _ack_early(self, task_id: str, message: AbstractIncomingMessage) -> None:
        """Ack a running task's delivery; its slot then stays busy outside prefetch's count."""
        self._uncounted.add(task_id)
        if len(self.running) + self._reserved >= self.slots:
            await self._pause()  # before the ack, or the broker pushes the next message now
        await settle(message)

    async def _release(self, task_id: str) -> None:
        """The task ran past ``worker_ack_hold_s``: ack its delivery (consumer cancelled first)."""
        self._hold_timers.pop(task_id, None)
        message = self._held.pop(task_id, None)
        if message is None or task_id not in self.running:
            return
        log.info("delivery_released", task_id=task_id, held_s=self.env.settings.worker_ack_hold_s)
        await self._pause()  # the ack frees prefetch while the slot stays busy
        self._uncounted.add(task_id)
        await settle(message)
        await self._resume()  # prefetch = the free slots left (none: not consuming)

    async def _execute(self, task_id: str) -> None:
        execution = self.running[task_id]
        structlog.contextvars.bind_contextvars(task_id=task_id)
        execution.on_recorded = lambda: self._free(task_id)
        try:
            await execution.announce(TaskState.RUNNING)
            await execution.run()
        except Exception:
            log.exception("task_execution_crashed")
        finally:
            await self._free(task_id)

    async def _free(self, task_id: str) -> None:
        """The task's outcome is recorded (or it ended without one): its slot is free.

        Acks its held delivery, so the broker pushes the next task for this slot, and consumes
        again where needed. Runs once per task, whichever of the outcome or the end comes first.
        """
        if self.running.pop(task_id, None) is None:
            return
        timer = self._hold_timers.pop(task_id, None)
        if timer is not None:
            timer.cancel()
        message = self._held.pop(task_id, None)
        renew = task_id in self._uncounted and self._consumer_tag is not None
        self._uncounted.discard(task_id)
        if message is not None:
            # Acked only now that its outcome is recorded: the broker's next push is the
            # next task for this very slot (prefetch counted it).
            await settle(message)
        if renew:
            await self._renew()  # the consumer's prefetch never counted this slot
        else:
            await self._resume()  # not consuming (paused while full): consume again
