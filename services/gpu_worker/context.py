"""What a task's code sees while it runs in the worker's child process."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shared.settings import Settings

ProgressSink = Callable[[float, str, dict[str, float]], None]


class RetryableTaskError(Exception):
    """Raised by task code for a failure worth retrying (a service briefly unreachable...).

    The worker retries the task with exponential back-off until ``max_attempts``. Builtin
    ``ConnectionError`` and ``TimeoutError`` raised by a task count as retryable too.
    """


#: Exceptions that make a task failure retryable.
RETRYABLE_ERRORS: tuple[type[BaseException], ...] = (
    RetryableTaskError,
    ConnectionError,
    TimeoutError,
)


@dataclass
class TaskContext:
    """Run-time facilities handed to a task's ``run(config, ctx)``.

    Attributes:
        task_id: the task's id.
        attempt: 1 for the first run, 2+ for a retry.
        artifact_dir: the task's own folder (exists); everything written here is the task's output.
        checkpoint_path: where the task may save a checkpoint to resume from.
        tracking_uri: MLflow tracking URI to log the run to.
        git_commit: the commit of the code the task runs on, if known (MLflow tag
            ``mlflow.source.git.commit``).
        artifact_location: where artifact-sync copies the task's folder
            (``s3://bucket/prefix/<id>/`` or a path), if shared storage is configured (MLflow
            tag ``tp.artifact_location``).
        settings: the worker's settings (broker, Redis, namespace), for a task that works with
            the platform itself (``hyperopt`` submits trial tasks and keeps its study in Redis);
            None outside a worker.
    """

    task_id: str
    attempt: int
    artifact_dir: Path
    checkpoint_path: Path
    tracking_uri: str
    git_commit: str | None = None
    artifact_location: str | None = None
    settings: Settings | None = field(default=None, repr=False)
    _progress_sink: ProgressSink | None = field(default=None, repr=False)
    _checkpoint_sink: Callable[[], None] | None = field(default=None, repr=False)
    _stop_requested: bool = field(default=False, repr=False)

    def report_progress(
        self, fraction: float, message: str = "", metrics: dict[str, float] | None = None
    ) -> None:
        """Tell the worker how far the task is (0.0-1.0), with a short message and metrics.

        The worker throttles what it forwards, so calling this every batch is fine. Metrics
        go as Python floats (a one-element tensor or numpy number is converted with ``float``);
        a value that is not a number is left out. The worker never gets a task's own objects.
        """
        if self._progress_sink is not None:
            fraction = min(max(fraction, 0.0), 1.0) if math.isfinite(fraction) else 0.0
            self._progress_sink(fraction, str(message), _float_metrics(metrics or {}))

    def checkpoint_saved(self) -> None:
        """Tell the worker a checkpoint was written (it asks artifact-sync to copy it)."""
        if self._checkpoint_sink is not None:
            self._checkpoint_sink()

    def request_stop(self) -> None:
        """Mark the task as asked to stop (the child's SIGTERM handler calls this)."""
        self._stop_requested = True

    def should_stop(self) -> bool:
        """True once the worker asked the task to stop; a task checks it between steps."""
        return self._stop_requested


def _float_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """``metrics`` with every value as a Python float; values that are not numbers left out."""
    out: dict[str, float] = {}
    for name, value in metrics.items():
        try:
            out[str(name)] = float(value)
        except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of many values
            continue
    return out
