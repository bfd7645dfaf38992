"""Builders for task events, so every publisher fills them the same way."""

from __future__ import annotations

import time

from shared.messages import EventKind, TaskEvent, TaskState


def state_event(
    task_id: str,
    state: TaskState,
    *,
    worker: str | None = None,
    error: str | None = None,
    metrics: dict[str, float] | None = None,
) -> TaskEvent:
    """A ``task.<state>.<id>`` event stamped with the local clock (Unix s)."""
    return TaskEvent(
        task_id=task_id,
        kind=EventKind.STATE,
        state=state,
        ts=time.time(),
        worker=worker,
        error=error,
        metrics=metrics or {},
    )


def progress_event(
    task_id: str, *, worker: str, progress: float, message: str, metrics: dict[str, float]
) -> TaskEvent:
    """A ``task.progress.<id>`` event: fraction done (0-1), a short message and metrics."""
    return TaskEvent(
        task_id=task_id,
        kind=EventKind.PROGRESS,
        state=TaskState.RUNNING,
        ts=time.time(),
        worker=worker,
        progress=progress,
        message=message,
        metrics=metrics,
    )
