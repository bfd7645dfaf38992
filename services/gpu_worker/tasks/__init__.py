"""Task implementations, one module per type, each exposing ``run(config, ctx) -> dict``.

Looked up by name so the worker's own process never imports task code (or torch).
"""

from __future__ import annotations

#: task type -> "module:function" run in the child process.
TASK_ENTRYPOINTS: dict[str, str] = {
    "train_model": "services.gpu_worker.tasks.train_model:run",
    "probe": "services.gpu_worker.tasks.probe:run",
    "backtest": "services.gpu_worker.tasks.backtest:run",
    "hyperopt": "services.gpu_worker.tasks.hyperopt:run",
    "hyperopt_trial": "services.gpu_worker.tasks.hyperopt:run_trials",
}
