"""One claimed task from start to end: run the child, relay progress and output, record it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from services.gpu_worker.outcome import RetryPolicy, StopReason, Verdict, decide
from services.gpu_worker.runner import ChildJob, ChildOutcome, ChildProcess, WarmChild
from shared.artifacts import ArtifactRequest, ArtifactState, ArtifactStatus
from shared.broker import Broker
from shared.constants import FINISHED_TASK_TTL_S, PROGRESS_MIN_INTERVAL_S, ROUTE_GPU
from shared.errors import BrokerError, StoreError
from shared.events import progress_event, state_event
from shared.logstream import LogLine, LogStreamWriter
from shared.messages import TaskState, TaskSubmission
from shared.settings import Settings
from shared.storage.base import artifact_location
from shared.store import StatusStore, Transition

log = structlog.get_logger(__name__)

#: A run's first news write (its child's pid, its progress) waits this long after the run began
#: (s): a short task's news then goes with its outcome in one write instead of two or three.
NEWS_DELAY_S = 0.05
#: A running task's checkpoints are sent to shared storage at most this often (s).
CHECKPOINT_SYNC_EVERY_S = 60.0
#: How long the worker keeps trying to record a finished task's outcome while Redis is away (s).
RECORD_RETRY_MAX_S = 600.0
#: Characters of a failed run's traceback (its end) in the note closing the run's log lines.
TRACEBACK_IN_LOG_CHARS = 3000


@dataclass(frozen=True)
class WorkerEnv:
    """What every part of a worker shares: settings, connections, its name and code commit."""

    settings: Settings
    store: StatusStore
    broker: Broker
    name: str
    #: Commit of the code the worker loaded: what its tasks run on (result, MLflow tag).
    code_commit: str | None = None


def child_job(submission: TaskSubmission, attempt: int, env: WorkerEnv, *, route: str) -> ChildJob:
    """What a child needs to run ``submission`` as ``attempt`` on ``route``'s lane."""
    task_dir = env.settings.tasks_dir / submission.task_id
    return ChildJob(
        task_id=submission.task_id,
        task_type=submission.task_type,
        config=submission.config,
        attempt=attempt,
        artifact_dir=task_dir / "artifacts",
        checkpoint_path=task_dir / "checkpoints" / "last.pt",
        tracking_uri=env.settings.tracking_uri,
        git_commit=env.code_commit,
        artifact_location=artifact_location(env.settings, submission.task_id),
        log_level=env.settings.log_level,
        log_format=env.settings.log_format,
        settings=env.settings,
        max_tasks=(
            1
            if env.settings.worker_gpu_isolate and route == ROUTE_GPU
            else env.settings.worker_child_max_tasks
        ),
        gpu_lane=route == ROUTE_GPU,
    )


class TaskExecution:
    """Runs a task the worker has claimed (state ``running``) and records how it ended.

    Args:
        submission: the task as dispatched.
        attempt: this run's attempt number (1 = first).
        env: the worker's settings and connections.
        route: the lane it runs on (``gpu`` or ``cpu``).
        prepared: an idle child already handed this task to prepare (``runner.prepare``).
    """

    def __init__(
        self,
        submission: TaskSubmission,
        attempt: int,
        env: WorkerEnv,
        *,
        route: str,
        prepared: WarmChild | None = None,
    ) -> None:
        self.submission = submission
        self.env = env
        self.attempt = attempt
        self.route = route
        #: When this worker started running it (Unix s).
        self.started_at = time.time()
        self.stop_reason: StopReason | None = None
        #: Set once the child ended and the outcome is being recorded.
        self.finishing = False
        #: Called once the outcome is recorded and announced (the lane frees the slot and acks
        #: the delivery then, not after this run's last log line).
        self.on_recorded: Callable[[], Awaitable[None]] | None = None
        self._timers: list[asyncio.TimerHandle] = []
        s = env.settings
        self.retry = RetryPolicy(
            submission.max_attempts or s.max_attempts, s.retry_base_s, s.retry_max_s
        )
        #: Record fields not written yet (child pid, progress), the progress event to send with
        #: them, and when news was last written (monotonic s): see ``_schedule_news``.
        self._news: dict[str, str | int | float] = {}
        self._progress: tuple[float, str, dict[str, float]] | None = None
        self._run_started = time.monotonic()
        self._last_news = -PROGRESS_MIN_INTERVAL_S
        self._news_timer: asyncio.TimerHandle | None = None
        self._news_tasks: set[asyncio.Task[None]] = set()
        self.child = ChildProcess(
            child_job(submission, attempt, env, route=route),
            self.on_progress,
            self.on_checkpoint,
            self.on_logs,
            prepared=prepared,
        )
        self._last_checkpoint_sync = -CHECKPOINT_SYNC_EVERY_S
        #: The last lines still to go, in the outcome's round trip (``_record``'s first try).
        self._logs_pending = True
        self._started_noted = False
        #: The run's time limit (s): the submission's, else the worker's default.
        self.timeout_s = submission.timeout_s or env.settings.task_timeout_s
        #: The task's output on its way to its Redis stream (``tradectl task logs``).
        self.logs = LogStreamWriter(
            env.store.redis,
            env.store.keys.task_logs(submission.task_id),
            attempt=attempt,
            max_lines=env.settings.task_log_max_lines,
            delay_s=NEWS_DELAY_S,
        )

    async def run(self) -> TaskState:
        """Run the child to its end; returns the terminal state recorded."""
        timeout = self.timeout_s
        try:
            outcome = await self.child.run(timeout, on_started=self.on_child_started)
        except Exception as e:  # the child could not be started: disk full, unwritable folder...
            self._note_started()
            log.exception("child_not_started")
            self.child.kill()
            outcome = ChildOutcome(
                error=f"worker could not start the task: {type(e).__name__}: {e}"
            )
        return await self.finish(outcome, timeout)

    async def announce(
        self,
        state: TaskState,
        *,
        error: str | None = None,
        metrics: dict[str, Any] | None = None,
        record: dict[str, str] | None = None,
    ) -> None:
        """Publish a state event; best effort, since Redis already holds the truth."""
        await self.env.broker.announce(
            state_event(
                self.submission.task_id,
                state,
                worker=self.env.name,
                error=error,
                metrics=metrics,
                record=record,
            )
        )

    async def on_child_started(self, pid: int) -> None:
        """The child has the job: log the start, and record its pid with the next news write.

        Logged after the hand-over, not before it (the child gets to work meanwhile), and before
        any message of the child is read: the start note leads the task's lines. The pid goes
        with the run's next news write (``_post_news``).
        """
        self._note_started()
        self._news["child_pid"] = pid
        self._schedule_news()

    def _note_started(self) -> None:
        if self._started_noted:
            return
        self._started_noted = True
        log.info("task_started", attempt=self.attempt, timeout_s=self.timeout_s)
        self.logs.note(f"attempt {self.attempt} started on worker {self.env.name}")

    async def on_progress(self, fraction: float, message: str, metrics: dict[str, float]) -> None:
        """Progress from the task: recorded and announced with the next news write.

        Never waits: the child's next message (its result, say) is not held up behind Redis.
        """
        self._news.update({"progress": fraction, "progress_message": message})
        self._progress = (fraction, message, metrics)
        self._schedule_news()

    def _schedule_news(self) -> None:
        """Have the pending news written when it is due, not at once.

        Due ``NEWS_DELAY_S`` after the run started, then at most every
        ``PROGRESS_MIN_INTERVAL_S``: a task that ends sooner has it all written with its
        outcome, in that one write.
        """
        if self._news_timer is not None or self.finishing:
            return
        now = time.monotonic()
        due = max(self._run_started + NEWS_DELAY_S, self._last_news + PROGRESS_MIN_INTERVAL_S)
        self._news_timer = asyncio.get_running_loop().call_later(
            max(0.0, due - now), self._spawn_news
        )

    def _spawn_news(self) -> None:
        task = asyncio.create_task(self._post_news(), name=f"news-{self.submission.task_id}")
        self._news_tasks.add(task)
        task.add_done_callback(self._news_tasks.discard)

    async def _post_news(self) -> None:
        """One write of the pending fields (child pid, progress) and the progress event."""
        self._news_timer = None
        if self.finishing or not self._news:
            return
        fields, self._news = self._news, {}
        progress, self._progress = self._progress, None
        self._last_news = time.monotonic()
        try:
            await self.env.store.update_if(
                self.submission.task_id, [TaskState.RUNNING], fields, worker=self.env.name
            )
            if progress is not None:
                await self.env.broker.announce(
                    progress_event(
                        self.submission.task_id,
                        worker=self.env.name,
                        progress=progress[0],
                        message=progress[1],
                        metrics=progress[2],
                    )
                )
        except (StoreError, BrokerError, ValueError) as e:  # news; the task goes on
            log.warning("progress_not_relayed", error=str(e))

    def on_logs(self, lines: list[LogLine]) -> None:
        """A batch of the task's output lines: queue them for the stream (never waits)."""
        self.logs.add(lines)

    async def on_checkpoint(self) -> None:
        """The task saved a checkpoint: have it copied to shared storage (throttled)."""
        now = time.monotonic()
        if now - self._last_checkpoint_sync >= CHECKPOINT_SYNC_EVERY_S:
            self._last_checkpoint_sync = now
            await self.request_artifacts(final=False, reason="checkpoint")

    async def request_artifacts(self, *, final: bool, reason: str = "finished") -> None:
        """Queue an artifact sync of this task's folder (no-op without shared storage)."""
        if self.env.settings.artifact_backend == "none":
            return
        request = ArtifactRequest(
            task_id=self.submission.task_id,
            reason="checkpoint" if reason == "checkpoint" else "finished",
            final=final,
            ts=time.time(),
        )
        pending = ArtifactStatus(
            task_id=request.task_id,
            state=ArtifactState.PENDING,
            backend=self.env.settings.artifact_backend,
            location=artifact_location(self.env.settings, request.task_id) or "",
            updated_at=request.ts,
        )
        try:
            key = self.env.store.keys.artifacts(request.task_id)
            await self.env.store.save_report(key, pending, ttl_s=FINISHED_TASK_TTL_S)
            await self.env.broker.publish_artifact_request(request)
        except (BrokerError, StoreError) as e:
            log.warning("artifact_request_not_published", error=str(e))

    def request_stop(self, reason: StopReason) -> None:
        """Ask the task to stop: SIGTERM now (it may checkpoint), SIGKILL after the grace period.

        The first reason wins; the outcome is recorded by ``finish`` according to it.
        """
        if self.stop_reason is not None:
            return
        self.stop_reason = reason
        log.info("task_stop_requested", reason=reason.value)
        grace = self.env.settings.cancel_grace_s
        loop = asyncio.get_running_loop()
        # SIGTERM again every quarter second: a child still starting up ignores the signal until
        # its handler is installed, and must not lose the request (and its checkpoint).
        self._timers = [
            loop.call_later(i * 0.25, self.child.terminate) for i in range(int(grace / 0.25) + 1)
        ]
        self._timers.append(loop.call_later(grace, self.child.kill))

    async def finish(self, outcome: ChildOutcome, timeout_s: float) -> TaskState:
        """Record the outcome (retrying through a Redis outage), then announce it."""
        self.finishing = True
        for timer in self._timers:
            timer.cancel()
        if self._news_timer is not None:
            self._news_timer.cancel()
            self._news_timer = None
        if self._news_tasks:  # a news write in flight lands before the outcome
            await asyncio.gather(*self._news_tasks, return_exceptions=True)
        if self.stop_reason is StopReason.LOST:
            log.warning("task_abandoned", reason="lease lost to the reaper; nothing recorded")
            self.logs.note(f"attempt {self.attempt} abandoned: its lease was lost")
            await self.logs.close()
            return TaskState.QUEUED
        verdict = decide(
            outcome,
            stop_reason=self.stop_reason,
            attempt=self.attempt,
            retry=self.retry,
            timeout_s=timeout_s,
            git_commit=self.child.job.git_commit,
            submitted_commit=self.submission.git_commit,
        )
        await self._close_logs(verdict, outcome)
        moved = await self._record(verdict)
        if moved is not None and not moved.applied and moved.previous is TaskState.CANCELLING:
            # A cancel arrived while the run was failing or being handed back: it wins.
            verdict = Verdict(TaskState.CANCELLED, (TaskState.CANCELLING,), reason="cancelled")
            moved = await self._record(verdict)
        if moved is None or not moved.applied:
            found = None if moved is None else moved.previous
            log.warning("task_outcome_not_recorded", found=found, outcome=verdict.state)
            return found or verdict.state
        if verdict.republish:
            await self._republish()
        await self.request_artifacts(final=verdict.state.is_terminal)
        metrics = (outcome.result or {}).get("metrics", {})
        await self.announce(
            verdict.state, error=verdict.error, metrics=metrics, record=moved.record
        )
        if self.on_recorded is not None:
            await self.on_recorded()
        log.info("task_" + verdict.state.value, reason=verdict.reason, exitcode=outcome.exitcode)
        return verdict.state

    async def _close_logs(self, verdict: Verdict, outcome: ChildOutcome) -> None:
        """Note how the run ended; the last lines go with the outcome (``_record``).

        A follower stops once it sees the task finished; by then every line is in the stream:
        the lines still buffered are written in the outcome's own round trip, just before it.
        """
        note = f"attempt {self.attempt} ended: {verdict.reason or verdict.state.value}"
        tail = (outcome.traceback or "").rstrip()[-TRACEBACK_IN_LOG_CHARS:]
        if tail and verdict.state is not TaskState.COMPLETED:
            note += "\n" + tail
        self.logs.note(note)
        await self.logs.settle()

    async def _republish(self) -> None:
        """Publish a handed-back task at once, and take it off the dispatch pump's list.

        The hand-back also put it on that list (due now): if this publish fails, the scheduler's
        pump publishes it instead; if it succeeds, the pump must not publish it a second time.
        """
        task_id = self.submission.task_id
        try:
            await self.env.broker.publish_submission(self.submission, self.route)
        except BrokerError as e:
            log.warning("hand_back_publish_failed", error=str(e), fallback="dispatch pump")
            return
        try:
            await self.env.store.dispatched(task_id)
        except StoreError as e:  # the pump may publish it again: a refused claim, no harm
            log.warning("hand_back_not_unlisted", error=str(e))

    async def _record(self, verdict: Verdict) -> Transition | None:
        """The outcome's compare-and-set, retried with doubling back-off while Redis is away.

        Gives up after ``RECORD_RETRY_MAX_S`` (None): the task's lease then expires and the
        record stays ``running`` until a reaper acts on it.
        """
        delay, deadline = 0.5, time.monotonic() + RECORD_RETRY_MAX_S
        while True:
            prelude, self._logs_pending = self._logs_pending, False
            try:
                return await self.env.store.transition(
                    self.submission.task_id,
                    verdict.expected,
                    verdict.state,
                    by=self.env.name,
                    reason=verdict.reason,
                    # News not written yet goes with the outcome (the verdict's own fields win:
                    # a hand-back clears the child pid, a completion sets progress 1).
                    fields={**self._news, **verdict.fields},
                    owner=(self.env.name, self.attempt),
                    prelude=self.logs.queue_rest if prelude else None,
                )
            except StoreError as e:
                if prelude:
                    self.logs.lose_rest()
                if time.monotonic() + delay > deadline:
                    log.error("task_outcome_lost", outcome=verdict.state, error=str(e))
                    return None
                log.warning("task_outcome_retry", error=str(e), retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
