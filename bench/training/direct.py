"""``python -m bench.training.direct CONFIG_JSON TRACKING_URI [RUNS]``: direct ``train_model`` runs.

Imports first what the worker's forkserver preloads, then times the ``run`` call alone, ``RUNS``
times (default 1) one after another in this process: the first pays what a fresh process pays
on its first training (MLflow's store set-up, torch's lazy initialisation), the later ones are
warm, as a worker's reused task child is. Prints one JSON line: ``run_s`` (the first ``run``
call), ``runs_s`` (each), ``process_s`` (since this process began, imports included) and the
last result's ``metrics``.
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
    runs = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    runs_s: list[float] = []
    for _ in range(runs):
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
            runs_s.append(time.perf_counter() - t0)
    out = {
        "run_s": runs_s[0],
        "runs_s": runs_s,
        "process_s": time.perf_counter() - PROCESS_T0,
        "metrics": result["metrics"],
    }
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
