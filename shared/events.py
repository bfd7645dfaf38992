"""Builders for task events, so every publisher fills them the same way."""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from shared.messages import RECORD_IN_EVENT_MAX_CHARS, EventKind, TaskEvent, TaskState

#: A follower's callback for each event of a task (sync or async).
EventCallback = Callable[[TaskEvent], Awaitable[None] | None]


def finite_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """The numeric, finite entries of ``metrics`` as floats (JSON has no NaN or inf)."""
    return {
        k: float(v)
        for k, v in (metrics or {}).items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


def state_event(
    task_id: str,
    state: TaskState,
    *,
    worker: str | None = None,
    error: str | None = None,
    metrics: Mapping[str, Any] | None = None,
    record: Mapping[str, str] | None = None,
) -> TaskEvent:
    """A ``task.<state>.<id>`` event stamped with the local clock (Unix s).

    ``record``: a terminal state's record hash (``Transition.record``); carried only when its
    keys and values total at most ``RECORD_IN_EVENT_MAX_CHARS`` characters.
    """
    carried = None
    if record is not None:
        size = sum(len(key) + len(value) for key, value in record.items())
        carried = dict(record) if size <= RECORD_IN_EVENT_MAX_CHARS else None
    return TaskEvent(
        task_id=task_id,
        kind=EventKind.STATE,
        state=state,
        ts=time.time(),
        worker=worker,
        error=error,
        metrics=finite_metrics(metrics),
        record=carried,
    )


def progress_event(
    task_id: str, *, worker: str, progress: float, message: str, metrics: Mapping[str, Any]
) -> TaskEvent:
    """A ``task.progress.<id>`` event: fraction done (0-1), a short message and metrics."""
    return TaskEvent(
        task_id=task_id,
        kind=EventKind.PROGRESS,
        state=TaskState.RUNNING,
        ts=time.time(),
        worker=worker,
        progress=progress,
        message=message[:500],
        metrics=finite_metrics(metrics),
    )
