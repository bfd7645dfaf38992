"""Print the MLflow run a task logged: its params and final metrics.

Usage: ``python examples/show_mlflow_run.py TASK_ID`` (tracking URI from ``TP_*`` settings).
"""

from __future__ import annotations

import sys

from mlflow.tracking import MlflowClient

from shared.settings import Settings


def main(task_id: str) -> None:
    client = MlflowClient(Settings().tracking_uri)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`tp.task_id` = '{task_id}'",
    )
    if not runs:
        sys.exit(f"no MLflow run tagged tp.task_id={task_id}")
    run = runs[0]
    print(f"MLflow run {run.info.run_id} ({run.info.status}) at {Settings().tracking_uri}")
    print("  params: " + ", ".join(f"{k}={v}" for k, v in sorted(run.data.params.items())))
    print("  metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(run.data.metrics.items())))


if __name__ == "__main__":
    main(sys.argv[1])
