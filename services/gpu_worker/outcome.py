"""How a finished run is recorded: the rules in one place, as a pure function.

stopped for a cancel   -> cancelled           (completed if it finished anyway)
stopped for a drain    -> queued, handed back, attempt not counted (completed if it finished)
past its time limit    -> failed "timed out after N s"
retryable error        -> queued with a back-off due time, until max_attempts; then failed
any other error/death  -> failed with the error
result                 -> completed
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from enum import StrEnum

from services.gpu_worker.runner import ChildOutcome
from shared.messages import TaskState


class StopReason(StrEnum):
    """Why the worker asked a running task to stop."""

    CANCEL = "cancel"
    DRAIN = "drain"
    LOST = "lost"  # the lease is no longer ours (reaped): stop, record nothing


@dataclass(frozen=True)
class Verdict:
    """The transition to make: target state, allowed current states, fields, history reason."""

    state: TaskState
    expected: tuple[TaskState, ...]
    fields: dict[str, str | int | float] = field(default_factory=dict)
    reason: str = ""
    error: str | None = None
    #: Publish the task to its queue again after recording (hand-back).
    republish: bool = False


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential back-off with equal jitter, as in AWS's "Exponential Backoff And Jitter".

    ``d = min(max_s, base_s * 2**(attempt - 1))``; the delay is uniform in ``[d/2, d]`` (s).
    """

    max_attempts: int
    base_s: float
    max_s: float

    def delay_s(self, attempt: int) -> float:
        """Back-off before attempt ``attempt + 1`` (s)."""
        ceiling = min(self.max_s, self.base_s * 2.0 ** (attempt - 1))
        return ceiling / 2 + random.uniform(0, ceiling / 2)


RUNNING = (TaskState.RUNNING, TaskState.CANCELLING)


def decide(
    outcome: ChildOutcome,
    *,
    stop_reason: StopReason | None,
    attempt: int,
    retry: RetryPolicy,
    timeout_s: float,
    git_commit: str | None,
    submitted_commit: str | None = None,
) -> Verdict:
    """The verdict for a run that ended with ``outcome``.

    ``git_commit`` is the commit the worker's code was at (what the task ran on),
    ``submitted_commit`` the one it was pinned to; both go into a completed task's result.
    """
    finished = outcome.result is not None and not outcome.stopped and outcome.error is None
    if finished and not outcome.timed_out:
        result = {
            **(outcome.result or {}),
            "git_commit": git_commit,
            "submitted_commit": submitted_commit,
        }
        fields: dict[str, str | int | float] = {
            "result": json.dumps(result),
            "progress": 1,
            "error": "",
            "traceback": "",
        }
        return Verdict(TaskState.COMPLETED, RUNNING, fields)
    if stop_reason is StopReason.CANCEL:
        return Verdict(TaskState.CANCELLED, RUNNING, reason="cancelled while running")
    if stop_reason is StopReason.DRAIN:
        return Verdict(
            TaskState.QUEUED,
            (TaskState.RUNNING,),
            {"+attempts": -1, "worker": "", "child_pid": "", "progress": "", "retry_in_s": 0},
            reason="handed back by a draining worker (attempt not counted)",
            republish=True,
        )
    error = f"timed out after {timeout_s:g} s" if outcome.timed_out else outcome.failure
    failed: dict[str, str | int | float] = {
        "error": error or "unknown failure",
        "traceback": outcome.traceback or "",
    }
    if outcome.retryable and not outcome.timed_out:
        if attempt < retry.max_attempts:
            delay = retry.delay_s(attempt)
            return Verdict(
                TaskState.QUEUED,
                (TaskState.RUNNING,),
                {**failed, "retry_in_s": delay, "worker": "", "child_pid": "", "progress": ""},
                reason=f"retrying in {delay:.2f} s after: {error}",
                error=error,
            )
        failed["error"] = f"{error} (gave up after {attempt} attempts)"
    message = str(failed["error"])
    return Verdict(TaskState.FAILED, (TaskState.RUNNING,), failed, message, message)
