"""``python -m bench.training.direct CONFIG_JSON TRACKING_URI``: one direct ``train_model`` run.

Imports first what the worker's forkserver preloads, then times the ``run`` call alone. Prints
one JSON line: ``run_s`` (the ``run`` call), ``process_s`` (since this process began, imports
included) and the result's ``metrics``.
"""

from __future__ import annotations

import importlib
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

PROCESS_T0 = time.perf_counter()


def preload() -> None:
    """Import what the worker's forkserver preloads (``TP_WORKER_PRELOAD``'s default) untimed.

    The worker's task child starts with these imported, so the direct call must not pay them.
    """
    from shared.settings import Settings

    for name in Settings.model_fields["worker_preload"].get_default(call_default_factory=True):
        importlib.import_module(name)


def main() -> int:
    preload()
    from services.gpu_worker.context import TaskContext
    from services.gpu_worker.tasks.train_model import run
    from shared.task_types import TrainModelConfig, validate_config

    config = validate_config("train_model", json.loads(sys.argv[1]))
    assert isinstance(config, TrainModelConfig)
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        folder = Path(tmp)
        (folder / "artifacts").mkdir()
        (folder / "checkpoints").mkdir()
        ctx = TaskContext(
            task_id=f"direct-{uuid.uuid4().hex[:8]}",
            attempt=1,
            artifact_dir=folder / "artifacts",
            checkpoint_path=folder / "checkpoints" / "last.pt",
            tracking_uri=sys.argv[2],
        )
        t0 = time.perf_counter()
        result = run(config, ctx)
        run_s = time.perf_counter() - t0
    out = {
        "run_s": run_s,
        "process_s": time.perf_counter() - PROCESS_T0,
        "metrics": result["metrics"],
    }
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
