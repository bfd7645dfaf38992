"""What one hyperopt trial evaluates: the target task's core, run in-process.

A trial samples the search space, builds the target's config (``base_config`` updated with the
sampled values), runs the target's work without its task duties (no checkpoint, MLflow run or
artifacts per trial) and returns ``(metric, all metrics)``. ``train_model`` reports the metric
after every epoch, so the pruner can stop a poor trial early.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import optuna

from services.gpu_worker.context import TaskContext
from services.gpu_worker.tasks.checkpoints import TrainState
from services.gpu_worker.tasks.hyperopt_study import Objective, StopRequested
from shared.backtest_config import BacktestConfig
from shared.events import finite_metrics
from shared.hyperopt_config import HyperoptConfig
from shared.task_types import TrainModelConfig


def sample_params(trial: optuna.Trial, config: HyperoptConfig) -> dict[str, Any]:
    """Draw every parameter of the search space (an enqueued trial gets its fixed values)."""
    params: dict[str, Any] = {}
    for name, spec in config.search_space.items():
        kwargs = spec.to_optuna()
        if spec.type == "categorical":
            params[name] = trial.suggest_categorical(name, kwargs["choices"])
        elif spec.type == "int":
            params[name] = trial.suggest_int(name, **kwargs)
        else:
            params[name] = trial.suggest_float(name, **kwargs)
    return params


def make_objective(
    config: HyperoptConfig, ctx: TaskContext, should_stop: Callable[[], bool]
) -> Objective:
    """The objective of the study's target.

    Args:
        config: the study.
        ctx: the running task's context.
        should_stop: interrupts a trial between epochs (``StopRequested``) when true.
    """
    if config.target == "backtest":
        return BacktestObjective(config, ctx, should_stop)
    return TrainModelObjective(config, should_stop)


class TrainModelObjective:
    """A ``train_model`` trial: fit and score in-process, reporting the metric every epoch."""

    def __init__(self, config: HyperoptConfig, should_stop: Callable[[], bool]) -> None:
        self.config = config
        self.should_stop = should_stop

    def __call__(self, trial: optuna.Trial) -> tuple[float, dict[str, float]]:
        """Train the trial's config; returns ``(metric, final metrics)``.

        Raises:
            optuna.TrialPruned: the pruner stopped it after an epoch.
            StopRequested: the task was asked to stop.
            pydantic.ValidationError: the sampled values make a config train_model refuses.
            FloatingPointError: training diverged.
        """
        from services.gpu_worker.tasks.train_model import fit_and_score, load_split, resolve_device

        params = sample_params(trial, self.config)
        target = TrainModelConfig.model_validate(self.config.trial_config(params))
        _, data = load_split(target)
        metric = self.config.metric

        def on_epoch(epoch: int, metrics: dict[str, float], state: TrainState) -> bool:
            if self.should_stop():
                raise StopRequested
            trial.report(metrics[metric], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch}: {metric} {metrics[metric]}")
            return True

        _, metrics = fit_and_score(data, target, resolve_device(target.device), on_epoch)
        return metrics[metric], finite_metrics(metrics)


class BacktestObjective:
    """A ``backtest`` trial: prepare and simulate in-process, scored by one statistic."""

    def __init__(
        self, config: HyperoptConfig, ctx: TaskContext, should_stop: Callable[[], bool]
    ) -> None:
        self.config = config
        self.should_stop = should_stop
        # The backtest's own progress messages would read as the study's: keep them out.
        self.quiet_ctx = dataclasses.replace(ctx, _progress_sink=None, _checkpoint_sink=None)

    def __call__(self, trial: optuna.Trial) -> tuple[float, dict[str, float]]:
        """Backtest the trial's config; returns ``(metric, statistics)``.

        Raises:
            StopRequested: the task was asked to stop before the simulation.
            pydantic.ValidationError: the sampled values make a config backtest refuses
                (``fast_window`` not below ``slow_window``).
            ValueError: the metric is undefined for this run (a Sharpe ratio without trades).
        """
        from services.gpu_worker.tasks import backtest
        from services.gpu_worker.tasks.backtest_report import metrics_of

        params = sample_params(trial, self.config)
        target = BacktestConfig.model_validate(self.config.trial_config(params))
        if self.should_stop():
            raise StopRequested
        simulation = backtest.simulate(target, backtest.prepare(target, self.quiet_ctx))
        metrics, undefined = metrics_of(simulation.stats)
        metric = self.config.metric
        if metric not in metrics:
            raise ValueError(f"{metric} is undefined for this backtest (undefined: {undefined})")
        return metrics[metric], metrics
