"""``probe``: sleeps, prints, reports progress, fails or crashes on request (tests, benchmarks)."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import structlog

from services.gpu_worker.context import RetryableTaskError, TaskContext
from shared.task_types import ProbeConfig

log = structlog.get_logger(__name__)


def run(config: ProbeConfig, ctx: TaskContext) -> dict[str, Any]:
    """Print ``config.print_lines`` lines, then sleep ``config.sleep_s`` in ``config.steps`` steps.

    Stops early if asked.

    Each finished step is checkpointed (``ctx.checkpoint_path`` holds the step count), so a probe
    that is run again after its worker was lost resumes after the last finished step. With
    ``config.report_steps`` off it sleeps ``sleep_s`` at once, without progress, checkpoint or
    stop check: the no-op that ``bench.dispatch`` runs against Celery's, which does only that.

    Returns:
        ``{"metrics": {"slept_s", "steps", "resumed_from_step"}, "pid": child pid,
        "started_at": Unix s, "returned_at": Unix s}``: ``started_at`` is taken first thing in
        ``run`` and ``returned_at`` just before it returns (wall clock), so a benchmark can tell
        when the task's own code began and ended (``bench.dispatch``).

    Raises:
        RetryableTaskError, RuntimeError: ``config.fail_with`` is set (see ``ProbeConfig``).
    """
    started_at = time.time()
    if config.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if config.fork_sleeper_s and os.fork() == 0:  # it holds all the child holds, then goes
        time.sleep(config.fork_sleeper_s)
        os._exit(0)
    if config.print_lines:
        _print_lines(config, ctx)
    step_s = config.sleep_s / config.steps
    started = time.monotonic()
    if not config.report_steps:
        if config.sleep_s:
            time.sleep(config.sleep_s)
        resumed, done = 0, config.steps
    else:
        resumed = done = _load_step(ctx.checkpoint_path)
    while done < config.steps:
        if ctx.should_stop() and not config.ignore_sigterm:
            break
        time.sleep(step_s)
        done += 1
        _save_step(ctx.checkpoint_path, done)
        ctx.checkpoint_saved()
        ctx.report_progress(done / config.steps, f"step {done}/{config.steps} pid {os.getpid()}")
    if config.crash:
        os.kill(os.getpid(), signal.SIGKILL)
    if config.fail_with is not None and (
        config.fail_times == 0 or ctx.attempt <= config.fail_times
    ):
        raise (RetryableTaskError if config.retryable else RuntimeError)(config.fail_with)
    metrics = {
        "slept_s": time.monotonic() - started,
        "steps": float(done),
        "resumed_from_step": float(resumed),
    }
    return {
        "metrics": metrics,
        "pid": os.getpid(),
        "started_at": started_at,
        "returned_at": time.time(),
    }


def _print_lines(config: ProbeConfig, ctx: TaskContext) -> None:
    """``print_lines`` lines to stdout, each stamped with when it was printed, then a summary.

    ``print()`` is not flushed here: the worker makes stdout line-buffered, as a task's plain
    ``print`` calls rely on.
    """
    printed = 0
    while printed < config.print_lines:
        if ctx.should_stop() and not config.ignore_sigterm:
            break
        if printed and config.print_every_s:
            time.sleep(config.print_every_s)
        printed += 1
        print(f"probe line {printed}/{config.print_lines} ts={time.time():.6f}")
    print(f"probe printed {printed} lines", file=sys.stderr)
    log.info("probe_printed", lines=printed)


def _load_step(path: Path) -> int:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return 0


def _save_step(path: Path, step: int) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(str(step))
    tmp.replace(path)
