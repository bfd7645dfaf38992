"""``probe``: sleeps, reports progress, fails or crashes on request (tests, health, benchmarks)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from services.gpu_worker.context import TaskContext
from shared.task_types import ProbeConfig


def run(config: ProbeConfig, ctx: TaskContext) -> dict[str, Any]:
    """Sleep ``config.sleep_s`` in ``config.steps`` steps; stop early if asked.

    Returns:
        ``{"metrics": {"slept_s": s, "steps": n}, "pid": child pid}``.

    Raises:
        RuntimeError: ``config.fail_with`` is set (its text is the message).
    """
    step_s = config.sleep_s / config.steps
    started = time.monotonic()
    done = 0
    for done in range(1, config.steps + 1):
        if ctx.should_stop():
            break
        time.sleep(step_s)
        ctx.report_progress(done / config.steps, f"step {done}/{config.steps} pid {os.getpid()}")
    if config.crash:
        os.kill(os.getpid(), signal.SIGKILL)
    if config.fail_with is not None:
        raise RuntimeError(config.fail_with)
    slept = time.monotonic() - started
    return {"metrics": {"slept_s": slept, "steps": float(done)}, "pid": os.getpid()}
