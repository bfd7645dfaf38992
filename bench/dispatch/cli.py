"""The dispatch benchmark's command-line options."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .constants import (
    CONFIGS,
    DEFAULT_CANCEL_TASKS,
    DEFAULT_GAP_MS,
    DEFAULT_LATENCY_TASKS,
    DEFAULT_SLEEP_TASKS,
    DEFAULT_SUBMIT_CONCURRENCY,
    DEFAULT_TASKS,
    DEFAULT_WARMUP,
    SYSTEMS,
)

DESCRIPTION = (
    "Dispatch performance: our scheduler and worker beside Celery 5, same broker, one run."
)


def _prog() -> str | None:
    """``python -m bench.dispatch`` under ``-m`` (argparse would say ``__main__.py``)."""
    return "python -m bench.dispatch" if Path(sys.argv[0]).name == "__main__.py" else None


def _names(raw: str, allowed: tuple[str, ...], p: argparse.ArgumentParser, flag: str) -> list[str]:
    names = [n.strip() for n in raw.split(",") if n.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        p.error(f"{flag}: choose from {', '.join(allowed)} (got {raw!r})")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; counts of 0 skip that measurement."""
    p = argparse.ArgumentParser(prog=_prog(), description=DESCRIPTION)
    add = p.add_argument
    add("--tasks", type=int, default=DEFAULT_TASKS, help="no-op tasks for throughput (2000)")
    add("--latency-tasks", type=int, default=DEFAULT_LATENCY_TASKS, help="spaced tasks (300)")
    add("--gap-ms", type=float, default=DEFAULT_GAP_MS, help="between spaced submits (ms; 20)")
    add("--sleep-tasks", type=int, default=DEFAULT_SLEEP_TASKS, help="100 ms tasks (50)")
    add("--cancel-tasks", type=int, default=DEFAULT_CANCEL_TASKS, help="running tasks (20)")
    add("--warmup", type=int, default=DEFAULT_WARMUP, help="uncounted tasks first (20)")
    add("--config", default="gpu,cpu", help="configurations, comma-separated (gpu,cpu)")
    add("--system", default="ours,celery", help="systems, comma-separated (ours,celery)")
    add(
        "--submit-concurrency",
        type=int,
        default=DEFAULT_SUBMIT_CONCURRENCY,
        help="our client's submits in flight in a batch (100)",
    )
    add(
        "--commit-check",
        choices=["warn", "refuse", "off"],
        default="warn",
        help="the client's TP_COMMIT_CHECK (warn, the product default: each submit pins HEAD)",
    )
    add("--json", default=None, help="JSON path (default bench/results/dispatch-<UTC>.json)")
    args = p.parse_args(argv)
    args.configs = _names(args.config, tuple(CONFIGS), p, "--config")
    args.systems = _names(args.system, SYSTEMS, p, "--system")
    counts = (args.tasks, args.latency_tasks, args.sleep_tasks, args.cancel_tasks, args.warmup)
    if min(counts) < 0 or args.gap_ms < 0 or args.submit_concurrency < 1:
        p.error("counts and --gap-ms must not be negative; --submit-concurrency must be >= 1")
    return args
