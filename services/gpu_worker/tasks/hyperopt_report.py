"""A finished study's output: the trials table, the optimisation-history plot, the summary, MLflow.

Written once by the hyperopt task after every trial has ended: one writer, so a SQLite MLflow
store never sees several workers at once (its "database is locked").
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from services.gpu_worker.context import TaskContext
from services.gpu_worker.tasks.hyperopt_study import (
    ATTR_ATTEMPT,
    ATTR_ERROR,
    ATTR_LOST,
    ATTR_METRICS,
    ATTR_RETRY_OF,
    ATTR_RUNNER,
    ATTR_TASK,
    ATTR_WORKER,
    is_lost,
)
from services.gpu_worker.tasks.tracking import mlflow_run
from shared.events import finite_metrics
from shared.hyperopt_config import HyperoptConfig

#: MLflow experiment of every study (one parent run per hyperopt task, a child run per trial).
EXPERIMENT_NAME = "hyperopt"
TRIALS_FILE = "trials.csv"
HISTORY_PLOT_FILE = "optimization_history.png"
SUMMARY_FILE = "study.json"
#: Rows of the trials table kept in the task's result; ``trials.csv`` has every one.
RESULT_TRIAL_ROWS = 1000

#: MLflow status of a child run by the trial's state.
_RUN_STATUS = {
    TrialState.COMPLETE: "FINISHED",
    TrialState.PRUNED: "KILLED",
    TrialState.FAIL: "FAILED",
}
_COLUMNS = (
    "number",
    "state",
    "value",
    "task_id",
    "worker",
    "attempt",
    "runner",
    "retry_of",
    "lost",
    "error",
    "duration_s",
    "started_at",
    "completed_at",
)


def trial_rows(trials: Sequence[FrozenTrial]) -> list[dict[str, Any]]:
    """One row per trial: number, state, value, parameters and who ran it.

    Returns:
        Dicts with ``number``, ``state`` (``COMPLETE``, ``PRUNED``, ``FAIL``...), ``value``
        (the metric; for a pruned trial its last report), ``params``, ``task_id``, ``worker``,
        ``attempt`` and ``runner`` of the task that ran it, ``retry_of`` (the lost trial it
        repeats), ``lost`` (why it was lost), ``error`` (its own failure), ``duration_s``,
        ``started_at``/``completed_at`` (ISO times).
    """
    return [_row(t) for t in trials]


def _row(trial: FrozenTrial) -> dict[str, Any]:
    attrs = trial.user_attrs
    return {
        "number": trial.number,
        "state": trial.state.name,
        "value": _finite(trial.value),
        "params": dict(trial.params),
        "task_id": attrs.get(ATTR_TASK),
        "worker": attrs.get(ATTR_WORKER),
        "attempt": attrs.get(ATTR_ATTEMPT),
        "runner": attrs.get(ATTR_RUNNER),
        "retry_of": attrs.get(ATTR_RETRY_OF),
        "lost": attrs.get(ATTR_LOST),
        "error": attrs.get(ATTR_ERROR),
        "duration_s": trial.duration.total_seconds() if trial.duration else None,
        "started_at": _iso(trial.datetime_start),
        "completed_at": _iso(trial.datetime_complete),
    }


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def write_trials_csv(rows: Sequence[dict[str, Any]], config: HyperoptConfig, path: Path) -> None:
    """The trials table as CSV: one row per trial, one ``param_<name>`` column per parameter."""
    names = list(config.search_space)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, [*_COLUMNS, *(f"param_{n}" for n in names)])
        writer.writeheader()
        for row in rows:
            params = {f"param_{n}": row["params"].get(n) for n in names}
            writer.writerow({**{c: row[c] for c in _COLUMNS}, **params})


def plot_history(trials: Sequence[FrozenTrial], config: HyperoptConfig, path: Path) -> None:
    """Plot each trial's metric by trial number and the best value so far (PNG, matplotlib).

    Complete trials are dots, pruned ones crosses at their last reported value; the line is the
    best complete value up to each trial.
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.5), dpi=100)
    axes = figure.add_subplot()
    for state, style in ((TrialState.COMPLETE, "o"), (TrialState.PRUNED, "x")):
        points = [(t.number, t.value) for t in trials if t.state is state and t.value is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            axes.plot(xs, ys, style, label=state.name.lower(), alpha=0.8)
    best_x, best_y = _best_so_far(trials, config.direction)
    if best_x:
        axes.step(best_x, best_y, where="post", color="crimson", label="best so far")
    axes.set_xlabel("trial")
    axes.set_ylabel(config.metric)
    axes.set_title(f"{config.target}: {config.direction} {config.metric}")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, format="png")


def _best_so_far(trials: Sequence[FrozenTrial], direction: str) -> tuple[list[int], list[float]]:
    better = min if direction == "minimize" else max
    xs: list[int] = []
    ys: list[float] = []
    for trial in trials:
        if trial.state is TrialState.COMPLETE and trial.value is not None:
            xs.append(trial.number)
            ys.append(trial.value if not ys else better(ys[-1], trial.value))
    return xs, ys


def summary(
    study: optuna.Study, trials: Sequence[FrozenTrial], config: HyperoptConfig, prefix: str
) -> dict[str, Any]:
    """The study in brief: best trial, counts by state, settings, where it lives in Redis."""
    best = study.best_trial
    counts: dict[str, int] = {}
    for trial in trials:
        state = "LOST" if is_lost(trial) else trial.state.name
        counts[state] = counts.get(state, 0) + 1
    return {
        "study_name": study.study_name,
        "storage": {"kind": "optuna JournalStorage on Redis", "key_prefix": prefix},
        "target": config.target,
        "metric": config.metric,
        "direction": config.direction,
        "n_trials": config.n_trials,
        "parallel": config.runners,
        "pruner": config.pruner,
        "seed": config.seed,
        "best_trial": best.number,
        "best_value": best.value,
        "best_params": dict(best.params),
        "best_metrics": best.user_attrs.get(ATTR_METRICS, {}),
        "trial_counts": counts,
        "search_space": {
            k: v.model_dump(exclude_none=True) for k, v in config.search_space.items()
        },
        "base_config": config.base_config,
    }


def write_artifacts(
    folder: Path,
    study: optuna.Study,
    trials: Sequence[FrozenTrial],
    config: HyperoptConfig,
    prefix: str,
) -> tuple[list[str], dict[str, Any]]:
    """Write ``trials.csv``, ``optimization_history.png`` and ``study.json`` into ``folder``.

    Returns:
        The file names written and the summary (``study.json``'s content).
    """
    write_trials_csv(trial_rows(trials), config, folder / TRIALS_FILE)
    plot_history(trials, config, folder / HISTORY_PLOT_FILE)
    brief = summary(study, trials, config, prefix)
    (folder / SUMMARY_FILE).write_text(json.dumps(brief, indent=2) + "\n")
    return [TRIALS_FILE, HISTORY_PLOT_FILE, SUMMARY_FILE], brief


def record_mlflow(
    ctx: TaskContext,
    config: HyperoptConfig,
    trials: Sequence[FrozenTrial],
    brief: dict[str, Any],
    artifacts: Sequence[Path],
) -> str:
    """Log the study as an MLflow parent run with one child run per trial; returns its run id.

    The parent holds the study's settings as params, ``best_value`` and the artifacts; each
    child (tagged ``mlflow.parentRunId``, named ``trial-<n>``) the trial's parameters, its
    metrics (the target's final metrics, and the reported metric per epoch as steps), who ran
    it, and its own start and end times. Children end FINISHED (complete), KILLED (pruned) or
    FAILED.
    """
    tags = {"tp.target": config.target, "tp.metric": config.metric}
    with mlflow_run(ctx, EXPERIMENT_NAME, tags) as parent:
        params = {
            k: v
            for k, v in brief.items()
            if k in ("target", "metric", "direction", "n_trials", "parallel", "pruner", "seed")
        }
        parent.log_params({**params, "search_space": json.dumps(brief["search_space"])})
        parent.log_metrics({"best_value": float(brief["best_value"])}, step=0)
        experiment_id = parent.client.get_run(parent.run_id).info.experiment_id
        for trial in trials:
            _log_trial(
                parent.client, experiment_id, parent.run_id, ctx.task_id, config, trial=trial
            )
        parent.log_artifacts(list(artifacts))
    return parent.run_id


def _log_trial(
    client: Any,
    experiment_id: str,
    parent_run_id: str,
    study_task_id: str,
    config: HyperoptConfig,
    *,
    trial: FrozenTrial,
) -> None:
    from mlflow.entities import Metric, Param

    row = _row(trial)
    tags = {
        "mlflow.parentRunId": parent_run_id,
        "tp.hyperopt_task_id": study_task_id,
        "tp.trial_number": str(trial.number),
        "tp.trial_state": "LOST" if is_lost(trial) else trial.state.name,
        **{f"tp.{k}": str(row[k]) for k in ("task_id", "worker", "attempt") if row[k] is not None},
    }
    start = _millis(trial.datetime_start)
    run = client.create_run(
        experiment_id, start_time=start, tags=tags, run_name=f"trial-{trial.number}"
    )
    end = _millis(trial.datetime_complete) or start or 0
    steps = _steps(trial)
    metrics = [Metric(config.metric, v, end, step) for step, v in steps]
    last = steps[-1][0] if steps else 0  # final metrics at the last epoch: the curve's end
    metrics += [
        Metric(k, v, end, last)
        for k, v in _metrics(trial).items()
        if not (steps and k == config.metric)  # already there, as the last step
    ]
    params = [Param(k, str(v)) for k, v in trial.params.items()]
    client.log_batch(run.info.run_id, metrics=metrics, params=params)
    client.set_terminated(run.info.run_id, _RUN_STATUS.get(trial.state, "FAILED"), end_time=end)


def _steps(trial: FrozenTrial) -> list[tuple[int, float]]:
    return [(int(s), v) for s, v in sorted(trial.intermediate_values.items()) if math.isfinite(v)]


def _metrics(trial: FrozenTrial) -> dict[str, float]:
    return finite_metrics(trial.user_attrs.get(ATTR_METRICS))


def _millis(moment: datetime | None) -> int | None:
    return int(moment.timestamp() * 1000) if moment is not None else None
