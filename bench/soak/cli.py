"""The soak's command-line options."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DESCRIPTION = "Soak test: thousands of short probe tasks while workers are SIGKILLed and restarted."


def _prog() -> str | None:
    """``python -m bench.soak`` under ``-m`` (argparse would say ``__main__.py``), else its own."""
    return "python -m bench.soak" if Path(sys.argv[0]).name == "__main__.py" else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog=_prog(), description=DESCRIPTION)
    p.add_argument("--tasks", type=int, default=2000, help="probe tasks to submit (2000)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (2)")
    p.add_argument("--kill-every", type=float, default=3.0, help="seconds between kills (3)")
    p.add_argument("--deadline", type=float, default=900.0, help="give up after this (s; 900)")
    p.add_argument(
        "--stall-timeout",
        type=float,
        default=120.0,
        help="give up when no task finished for this long after the last submit (s; 120)",
    )
    p.add_argument("--concurrency", type=int, default=32, help="submits in flight (32)")
    p.add_argument("--seed", type=int, default=None, help="seed for task ids and sleeps")
    p.add_argument("--json", default=None, help="also write the report as JSON to this file")
    p.add_argument(
        "--preload",
        default=None,
        help="TP_WORKER_PRELOAD for the workers, a JSON list (default: the product's, torch "
        "and friends; '[]' makes a restarted worker's first task start in about a second)",
    )
    p.add_argument("--keep-data", action="store_true", help="keep the task folders")
    args = p.parse_args(argv)
    if args.tasks < 1 or args.workers < 1 or args.kill_every <= 0 or args.deadline <= 0:
        p.error("--tasks, --workers, --kill-every and --deadline must be positive")
    return args
