"""MLflow recording shared by task types: one run per task attempt, written through a client.

Uses an ``MlflowClient`` bound to the task's tracking URI rather than the fluent API's process-wide
state, so a child never leaks settings into the next task.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from services.gpu_worker.context import TaskContext


class MlflowRecorder:
    """One MLflow run of this task, written through an ``MlflowClient`` bound to its URI."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client = client
        self.run_id = run_id
        #: Status the run ends with when its body returns normally (``KILLED`` after a stop).
        self.status = "FINISHED"

    def log_params(self, params: dict[str, Any]) -> None:
        """Log each item as a string param."""
        from mlflow.entities import Param

        entries = [Param(k, str(v)) for k, v in params.items()]
        self.client.log_batch(self.run_id, params=entries)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log metrics at ``step`` (the epoch for per-epoch metrics)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=entries)

    def log_artifacts(self, paths: list[Path]) -> None:
        """Copy files to the run's artifact store."""
        for path in paths:
            self.client.log_artifact(self.run_id, str(path))


def _quiet_mlflow() -> None:
    # MLflow and its migrations (alembic) log every table creation at INFO.
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _artifact_location(tracking_uri: str) -> str | None:
    # A sqlite store would put artifacts under the current directory; keep them beside the DB.
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    return (Path(tracking_uri[len(prefix) :]).resolve().parent / "mlartifacts").as_uri()


def open_client(client_class: Any, tracking_uri: str) -> Any:
    """An MLflow client whose store is ready; a SQLite store is created under a file lock.

    Two tasks starting at once on a fresh data folder (the cpu and gpu slots) would otherwise
    both create and migrate the empty SQLite database, and one fails ("Online migration expected
    to match one row ... 0 found"). The first call on the client builds the store, so it is
    made while holding ``<db>.lock``.
    """
    if not tracking_uri.startswith("sqlite:///"):
        return client_class(tracking_uri=tracking_uri)
    lock_path = Path(tracking_uri.removeprefix("sqlite:///") + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            client = client_class(tracking_uri=tracking_uri)
            client.get_experiment_by_name("Default")  # builds (creates, migrates) the store
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return client


def _experiment_id(client: Any, tracking_uri: str, name: str) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return str(experiment.experiment_id)
    try:
        location = _artifact_location(tracking_uri)
        return str(client.create_experiment(name, artifact_location=location))
    except MlflowException:
        # Another task created it between the lookup and the create.
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return str(experiment.experiment_id)


@contextlib.contextmanager
def mlflow_run(
    ctx: TaskContext, experiment: str, extra_tags: dict[str, str] | None = None
) -> Iterator[MlflowRecorder]:
    """Open an MLflow run named after the task; end it FINISHED, or FAILED if the body raises.

    Args:
        ctx: supplies the tracking URI, task id, attempt and git commit.
        experiment: experiment name (created on first use; artifacts beside a SQLite store).
        extra_tags: more tags (``tp.device``...).

    The run is tagged ``tp.task_id``, ``tp.attempt`` and, when known,
    ``mlflow.source.git.commit``. A body that sets ``recorder.status`` (e.g. ``KILLED`` after a
    stop request) ends the run with that status instead of FINISHED.
    """
    from mlflow.tracking import MlflowClient

    _quiet_mlflow()  # after the import: importing mlflow configures its loggers

    client = open_client(MlflowClient, ctx.tracking_uri)
    tags = {"tp.task_id": ctx.task_id, "tp.attempt": str(ctx.attempt), **(extra_tags or {})}
    if ctx.git_commit:
        tags["mlflow.source.git.commit"] = ctx.git_commit
    if ctx.artifact_location:
        tags["tp.artifact_location"] = ctx.artifact_location
    run = client.create_run(
        _experiment_id(client, ctx.tracking_uri, experiment), run_name=ctx.task_id, tags=tags
    )
    recorder = MlflowRecorder(client, run.info.run_id)
    try:
        yield recorder
    except BaseException:
        client.set_terminated(recorder.run_id, "FAILED")
        raise
    client.set_terminated(recorder.run_id, recorder.status)
