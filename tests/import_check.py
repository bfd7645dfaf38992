"""Run scheduler + worker (and a client) in ONE process, train a model through them, then report
which heavy modules that process imported. Used by ``test_no_torch_outside_children``.

Usage: ``python tests/import_check.py services`` or ``python tests/import_check.py cli ARGS...``.
"""

from __future__ import annotations

import asyncio
import faulthandler
import json
import sys
from typing import Any

HEAVY = ("torch", "mlflow", "pandas", "services.gpu_worker.tasks.train_model")


async def run_services() -> str:
    from services.gpu_worker.app import Worker
    from services.scheduler.app import Scheduler
    from shared.client import DistributedClient
    from shared.settings import Settings

    settings = Settings()
    scheduler, worker = Scheduler(settings), Worker(settings)
    await scheduler.start()
    await worker.start()
    try:
        async with DistributedClient(settings) as client:
            record = await client.submit("train_model", {"epochs": 1, "dataset": "GOOG"})
            record = await client.wait(record.task_id, timeout_s=240)
            return f"{record.state.value} {record.error or ''}".strip()
    finally:
        await _bounded(worker.stop(), "worker")
        await _bounded(scheduler.stop(), "scheduler")


async def _bounded(stop: Any, what: str) -> None:
    """Await a service's stop; if it hangs, print every asyncio task's stack and fail."""
    try:
        await asyncio.wait_for(stop, 60)
    except TimeoutError:
        print(f"{what}.stop() hung; asyncio tasks:", file=sys.stderr)
        for task in asyncio.all_tasks():
            task.print_stack(file=sys.stderr)
        raise


def run_cli(args: list[str]) -> str:
    from shared.cli import app

    sys.argv = ["tradectl", *args]
    try:
        app()
    except SystemExit as e:
        return f"exit {e.code}"
    return "exit 0"


if __name__ == "__main__":
    # A hang prints every thread's stack (and exits) instead of waiting for pytest's timeout.
    faulthandler.dump_traceback_later(150, exit=True)
    mode = sys.argv[1]
    outcome = asyncio.run(run_services()) if mode == "services" else run_cli(sys.argv[2:])
    loaded = [m for m in HEAVY if m in sys.modules]
    print(json.dumps({"outcome": outcome, "heavy_modules": loaded}))
