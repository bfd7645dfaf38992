"""The local fallback's runner: one task run on the client's machine, as a worker would run it.

Same child process (``runner.ChildProcess``: a forkserver child, output captured, SIGTERM then
SIGKILL), same task code and config validation, same verdict rules (``outcome.decide``), same
claim (``StatusStore.claim``). What differs, and why:

- The claimant is ``local:<host>`` and claims from ``submitted`` too (the scheduler may never
  have seen the task: the broker was down at submit).
- The lease is the task's whole time limit plus ``TP_LEASE_S``: a laptop that loses its network
  mid-run cannot renew, and a shorter lease would let the desktop's reaper requeue a task that
  is still running here, which is a second run. The cost: a laptop that dies mid-run leaves its
  task ``running`` until that lease expires, then it is requeued.
- One attempt: a retryable error fails the run (the desktop's back-off queue is not used).
- Artifacts are copied to shared storage from here (the desktop cannot read this disk).
- Without Redis the run has only its journal record (``shared.local_runs``), published later.

A cancel (``tradectl task cancel``, seen when the lease is renewed) or Ctrl-C stops the child
the way a worker does: SIGTERM, ``TP_CANCEL_GRACE_S``, SIGKILL; the run ends ``cancelled``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

import structlog

from services.gpu_worker.outcome import RetryPolicy, StopReason, Verdict, decide
from services.gpu_worker.runner import ChildJob, ChildOutcome, ChildProcess, warm_up
from shared.broker import Broker
from shared.constants import PROGRESS_MIN_INTERVAL_S
from shared.errors import StoreError
from shared.events import EventCallback, progress_event, state_event
from shared.local_runs import (
    HANDED_BACK,
    LocalJournal,
    LocalRecord,
    end_fields,
    local_worker_name,
    log_line_json,
    process_start,
    store_artifacts,
)
from shared.logstream import LogLine, LogStreamWriter, clean_text
from shared.messages import TaskEvent, TaskState, TaskSubmission
from shared.settings import Settings
from shared.storage.base import artifact_location
from shared.store import StatusStore

log = structlog.get_logger(__name__)


#: How long the end of a run is retried in Redis before it is left to ``task sync-local`` (s).
RECORD_RETRY_S = 30.0
#: Longest pause between two lease renewals (s): how late a cancel is noticed.
RENEW_EVERY_MAX_S = 2.0


class LocalRun:
    """Runs one task on this machine.

    Args:
        settings: this machine's settings (data folder, MLflow, storage, time limits).
        submission: the task as submitted (its config as the desktop would run it).
        reason: why it runs here; recorded and printed.
        store: connected status store, or None when Redis is unreachable (journal only).
        broker: connected broker to announce events on, or None.
        profile: the config's local profile, applied over the config for this run.
        code_commit: the commit this machine's code is at (the result's ``git_commit``).
        on_event: called with each progress and state event, as the desktop's would arrive.
    """

    def __init__(
        self,
        settings: Settings,
        submission: TaskSubmission,
        *,
        reason: str,
        store: StatusStore | None,
        broker: Broker | None,
        profile: dict[str, Any] | None = None,
        code_commit: str | None = None,
        on_event: EventCallback | None = None,
        on_start: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.submission = submission
        self.reason = reason
        self.store = store
        self.broker = broker
        self.profile = dict(profile or {})
        self.code_commit = code_commit
        self.on_event = on_event
        self.on_start = on_start
        self.name = local_worker_name()
        self.journal = LocalJournal(settings)
        self.timeout_s = submission.timeout_s or settings.task_timeout_s
        #: Held well past the time limit: see the module's docstring (s).
        self.lease_s = self.timeout_s + settings.cancel_grace_s + settings.lease_s
        self.attempt = 1
        self.stop_reason: StopReason | None = None
        self._timers: list[asyncio.TimerHandle] = []
        self._child: ChildProcess | None = None
        self._signals: list[signal.Signals] = []
        self._progress_write: asyncio.Task[None] | None = None
        self._lines_lost = False
        self._last_progress = 0.0

    async def claim(self) -> bool:
        """Claim the task in Redis (``submitted|queued -> running``); True if this run has it.

        Without Redis there is nothing to claim: the task exists only here. False means a
        worker (or another client) took it, or it was cancelled or finished: do not run it.

        From here on Ctrl-C, SIGTERM and SIGHUP cancel the run (see ``_stop_on_signals``), so
        none of them can leave a claimed task behind unrecorded.

        Raises:
            StoreError: Redis failed.
        """
        self._signals = self._stop_on_signals()
        if self.store is None:
            return True
        try:
            claim = await self.store.claim(
                self.submission.task_id,
                self.name,
                lease_s=self.lease_s,
                code_commit=self.code_commit,
                expected=(TaskState.SUBMITTED, TaskState.QUEUED),
                fields={"fallback_reason": self.reason},
                reason=f"run locally: {self.reason}",
            )
        except BaseException:
            self._release_signals()
            raise
        if not claim.applied:
            self._release_signals()
            log.info("local_claim_refused", task_id=self.submission.task_id, state=claim.previous)
            return False
        self.attempt = claim.attempts
        return True

    async def run(self) -> LocalRecord:
        """Run the claimed task to its end here; returns its journal record.

        Ends ``completed``, ``failed`` or ``cancelled``; the record says whether Redis has the
        end (``published``) and where the artifacts are.

        Raises:
            LocalRunExistsError: this machine has a run of the task already, or cannot keep its
                record; the claim was handed back unrun.
        """
        try:
            return await self._run()
        finally:
            self._release_signals()

    async def _run(self) -> LocalRecord:
        config = {**self.submission.config, **self.profile}
        record = LocalRecord(
            submission=self.submission,
            reason=self.reason,
            worker=self.name,
            state=TaskState.RUNNING,
            attempt=self.attempt,
            host=socket.gethostname(),
            pid=os.getpid(),
            pid_start=process_start(os.getpid()),
            in_redis=self.store is not None,
            logs_in_redis=self.store is not None,
            started_at=time.time(),
            profile=self.profile,
            config_run=config,
            artifact_dir=str(self.settings.tasks_dir / self.submission.task_id / "artifacts"),
            log_file=str(self.journal.log_path(self.submission.task_id)),
        )
        try:
            self.journal.start(record, claimed=self.store is not None)
        except BaseException as e:  # a run here already, or no journal: never run unrecorded
            await self._hand_back(f"not run locally: {e}")
            raise
        if self.on_start is not None:
            self.on_start()
        await self._emit(state_event(self.submission.task_id, TaskState.RUNNING, worker=self.name))
        outcome = await self._run_child(config)
        verdict = self._verdict(outcome)
        record.state = verdict.state
        record.finished_at = time.time()
        record.end_fields = dict(verdict.fields)
        record.end_reason = f"ran locally ({self.reason}): {verdict.reason or verdict.state}"
        record.error = verdict.error
        record.traceback = outcome.traceback
        if verdict.state is TaskState.COMPLETED:
            record.result = _result_with_local_facts(verdict, self)
            record.end_fields["result"] = json.dumps(record.result)
        record.logs_in_redis = self.store is not None and not self._lines_lost
        self.journal.save(record)  # the outcome is safe on disk before anything else is tried
        if self.store is not None and self.stop_reason is not StopReason.LOST:
            record.published = await self._record_end(record)
        await store_artifacts(self.settings, record, self.store)
        self.journal.save(record)
        metrics = (record.result or {}).get("metrics", {})
        await self._emit(
            state_event(
                self.submission.task_id,
                record.state,
                worker=self.name,
                error=record.error,
                metrics=metrics,
            )
        )
        return record

    async def _run_child(self, config: dict[str, Any]) -> ChildOutcome:
        s, task_id = self.settings, self.submission.task_id
        warm_up(())  # the forkserver ignores Ctrl-C, so Ctrl-C reaches only this process
        task_dir = s.tasks_dir / task_id
        child = ChildProcess(
            ChildJob(
                task_id=task_id,
                task_type=self.submission.task_type,
                config=config,
                attempt=self.attempt,
                artifact_dir=task_dir / "artifacts",
                checkpoint_path=task_dir / "checkpoints" / "last.pt",
                tracking_uri=s.tracking_uri,
                git_commit=self.code_commit,
                artifact_location=artifact_location(s, task_id),
                log_level=s.log_level,
                log_format=s.log_format,
                settings=s,
                stdout_to_stderr=True,
            ),
            self._on_progress,
            None,
            self._on_logs,
        )
        self._child = child
        self._stream = (
            LogStreamWriter(
                self.store.redis,
                self.store.keys.task_logs(task_id),
                attempt=self.attempt,
                max_lines=s.task_log_max_lines,
            )
            if self.store is not None
            else None
        )
        self._log_file = self.journal.log_path(task_id).open("a", encoding="utf-8")
        self._note(f"attempt {self.attempt} started on {self.name}: {self.reason}")
        renewing = asyncio.create_task(self._renew_lease())
        try:
            if self.stop_reason is not None:  # cancelled before the child started
                outcome = ChildOutcome(stopped=True)
            else:
                outcome = await self._child_outcome(child)
        finally:
            renewing.cancel()
            await asyncio.gather(renewing, return_exceptions=True)
            for timer in self._timers:
                timer.cancel()
        self._note(f"attempt {self.attempt} ended: {outcome.failure or 'completed'}")
        self._log_file.close()
        if self._stream is not None:
            await self._stream.close()
            # Lines lost to a Redis outage are sent again from the journal by sync-local.
            self._lines_lost = self._stream.dropped > 0
        return outcome

    def _stop_on_signals(self) -> list[signal.Signals]:
        """Make Ctrl-C, SIGTERM and SIGHUP (terminal closed) cancel the run.

        The child gets SIGTERM, the grace period, SIGKILL, and the run is recorded
        ``cancelled``; a second signal is the same request again, so the end is always recorded
        (by default a second Ctrl-C would abort that). Returns the signals handled (none outside
        the main thread).
        """
        loop = asyncio.get_running_loop()
        handled = []
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            try:
                loop.add_signal_handler(sig, self.request_stop, StopReason.CANCEL)
            except (ValueError, RuntimeError, NotImplementedError):  # not the main thread
                continue
            handled.append(sig)
        return handled

    def _release_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in self._signals:
            loop.remove_signal_handler(sig)
            if self.stop_reason is StopReason.CANCEL and sig in (signal.SIGINT, signal.SIGHUP):
                # A run cancelled by Ctrl-C ends in well under a second now: a second Ctrl-C
                # right after must not kill tradectl before it prints the recorded end.
                signal.signal(sig, signal.SIG_IGN)
        self._signals = []

    async def _hand_back(self, why: str) -> None:
        """Give the claim back unrun (``running -> queued``, attempt not counted)."""
        if self.store is None:
            return
        try:
            await self.store.transition(
                self.submission.task_id,
                [TaskState.RUNNING],
                TaskState.QUEUED,
                by=self.name,
                reason=why,
                fields={**HANDED_BACK, "+attempts": -1},
                owner=(self.name, self.attempt),
            )
        except StoreError as e:  # the claim's lease expires; the reaper fails it (see module)
            log.warning("local_claim_not_handed_back", error=str(e))

    async def _child_outcome(self, child: ChildProcess) -> ChildOutcome:
        run = asyncio.create_task(child.run(self.timeout_s))
        try:
            return await asyncio.shield(run)
        except asyncio.CancelledError:  # cancelled from outside: stop the child, record it
            self.request_stop(StopReason.CANCEL)
            return await run
        except Exception as e:  # the child could not be started (disk full, no forkserver)
            log.exception("local_child_not_started")
            child.kill()
            return ChildOutcome(error=f"could not start the task here: {type(e).__name__}: {e}")

    def request_stop(self, reason: StopReason) -> None:
        """SIGTERM the child now (it may checkpoint), SIGKILL after the grace period.

        Before the child exists the request is kept and the child is never started.
        """
        if self.stop_reason is None:
            self.stop_reason = reason
        if self._child is None or self._timers:
            return
        child, grace = self._child, self.settings.cancel_grace_s
        loop = asyncio.get_running_loop()
        self._timers = [
            loop.call_later(i * 0.25, child.terminate) for i in range(int(grace / 0.25) + 1)
        ]
        self._timers.append(loop.call_later(grace, child.kill))

    def _verdict(self, outcome: ChildOutcome) -> Verdict:
        return decide(
            outcome,
            stop_reason=self.stop_reason,
            attempt=self.attempt,
            # One attempt here: a retryable error ends the run (see the module's docstring).
            retry=RetryPolicy(self.attempt, self.settings.retry_base_s, self.settings.retry_max_s),
            timeout_s=self.timeout_s,
            git_commit=self.code_commit,
            submitted_commit=self.submission.git_commit,
        )

    async def _renew_lease(self) -> None:
        """Hold the claim while the child runs; notice a cancel (``cancelling``) or a lost claim."""
        if self.store is None:
            return
        every = min(self.settings.lease_s / 3, RENEW_EVERY_MAX_S)
        while True:
            await asyncio.sleep(every)
            try:
                state = await self.store.renew_lease(
                    self.submission.task_id, self.name, self.lease_s
                )
            except StoreError as e:  # the lease outlasts the time limit: keep running
                log.warning("local_lease_not_renewed", error=str(e))
                continue
            if state is TaskState.CANCELLING:
                self.request_stop(StopReason.CANCEL)
            elif state is None:
                log.warning("local_claim_lost", task_id=self.submission.task_id)
                self.request_stop(StopReason.LOST)

    async def _record_end(self, record: LocalRecord) -> bool:
        """Record the end in Redis, retried for ``RECORD_RETRY_S``; False: left to sync-local."""
        assert self.store is not None
        deadline = time.monotonic() + RECORD_RETRY_S
        while True:
            try:
                moved = await self.store.transition(
                    record.task_id,
                    (TaskState.RUNNING, TaskState.CANCELLING),
                    record.state,
                    by=self.name,
                    reason=record.end_reason,
                    fields=end_fields(record),
                    owner=(self.name, self.attempt),
                )
            except StoreError as e:
                if time.monotonic() > deadline:
                    log.warning("local_end_not_recorded", error=str(e), left_to="task sync-local")
                    return False
                await asyncio.sleep(1.0)
                continue
            if moved.applied:
                return True
            if moved.previous is TaskState.CANCELLING and record.state is not TaskState.CANCELLED:
                # A cancel arrived while the run was ending: recorded as the worker does.
                record.state = TaskState.CANCELLED
                record.end_fields = {}
                continue
            log.warning("local_end_refused", found=moved.previous)
            return False

    async def _on_progress(self, fraction: float, message: str, metrics: dict[str, float]) -> None:
        """Give progress to the caller at once, and to Redis and the broker in the background.

        Those writes are throttled and never awaited here: a hanging server must not hold up
        the child's later messages (its result).
        """
        event = progress_event(
            self.submission.task_id,
            worker=self.name,
            progress=fraction,
            message=message,
            metrics=metrics,
        )
        if self.on_event is not None:
            maybe = self.on_event(event)
            if maybe is not None:
                await maybe
        now = time.monotonic()
        busy = self._progress_write is not None and not self._progress_write.done()
        if busy or (now - self._last_progress < PROGRESS_MIN_INTERVAL_S and fraction < 1.0):
            return
        self._last_progress = now
        self._progress_write = asyncio.create_task(self._publish_progress(event))

    async def _publish_progress(self, event: TaskEvent) -> None:
        if self.store is not None:
            with contextlib.suppress(StoreError):
                await self.store.update_if(
                    event.task_id,
                    [TaskState.RUNNING],
                    {"progress": event.progress or 0.0, "progress_message": event.message},
                    worker=self.name,
                )
        if self.broker is not None:
            await self.broker.announce(event)

    def _on_logs(self, lines: list[LogLine]) -> None:
        """The task's output: into the journal's log file, and its Redis stream if any."""
        self._log_file.writelines(log_line_json(line) + "\n" for line in lines)
        self._log_file.flush()
        if self._stream is not None:
            self._stream.add(lines)

    def _note(self, text: str) -> None:
        self._on_logs([LogLine(time.time(), "log", self.attempt, clean_text(text))])

    async def _emit(self, event: TaskEvent) -> None:
        """Give the event to the caller, and announce it on the broker when there is one."""
        if self.on_event is not None:
            maybe = self.on_event(event)
            if maybe is not None:
                await maybe
        if self.broker is not None:
            await self.broker.announce(event)


def _result_with_local_facts(verdict: Verdict, run: LocalRun) -> dict[str, Any]:
    """The result as ``decide`` made it, plus where and why it ran and the profile applied."""
    result: dict[str, Any] = json.loads(str(verdict.fields["result"]))
    result["ran_locally"] = {
        "host": socket.gethostname(),
        "worker": run.name,
        "reason": run.reason,
        "profile": run.profile,
    }
    return result
