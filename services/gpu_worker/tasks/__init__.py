"""Task implementations, one module per type, each exposing ``run(config, ctx) -> dict``.

Looked up by name so the worker's own process never imports task code (or torch).
"""

from __future__ import annotations

#: task type -> "module:function" run in the child process.
TASK_ENTRYPOINTS: dict[str, str] = {
    "train_model": "services.gpu_worker.tasks.train_model:run",
    "probe": "services.gpu_worker.tasks.probe:run",
}

#: Modules the forkserver imports once so each child starts warm (about 2.5 s saved per task on
#: 2 cores). None of them initialises CUDA or starts threads at import; a missing one (a worker
#: installed without MLflow) is skipped by the forkserver.
PRELOAD_MODULES: tuple[str, ...] = (
    "torch",
    "pandas",
    "mlflow.tracking",
    "services.gpu_worker.tasks.train_model",
)
