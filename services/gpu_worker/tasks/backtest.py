"""``backtest``: a strategy over OHLCV bars, simulated by backtesting.py, with its statistics.

Runs in the worker's child process. The bars come from ``train_model``'s loader
(:func:`.ohlcv.load_ohlcv`: bundled samples or a CSV/Parquet file), the simulation and every
statistic from backtesting.py (https://kernc.github.io/backtesting.py/), a maintained library,
rather than an engine of our own: ``Backtest(bars, strategy, cash=, commission=, spread=,
trade_on_close=, exclusive_orders=, finalize_trades=).run()``. Strategies:

- ``sma_crossover``: backtesting.py's ``SmaCross`` example with the windows as parameters.
- ``model_signal``: the positions a ``train_model`` model asks for (:mod:`.model_signals`),
  given to the strategy as data columns computed before the run from bars ``<= t`` only.

Warnings the library raises (a price above the starting cash, an order cancelled for want of
margin) are kept in the result's ``warnings`` and logged, never raised.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import structlog
from backtesting import Backtest, Strategy

from services.gpu_worker.context import TaskContext
from services.gpu_worker.tasks import backtest_report as report
from services.gpu_worker.tasks import model_signals
from services.gpu_worker.tasks.backtest_strategies import (
    P_UP_COLUMN,
    TARGET_COLUMN,
    ModelSignal,
    SmaCrossover,
)
from services.gpu_worker.tasks.ohlcv import load_ohlcv
from services.gpu_worker.tasks.tracking import mlflow_run
from services.gpu_worker.tasks.train_model import resolve_device
from shared.backtest_config import BacktestConfig

log = structlog.get_logger(__name__)

#: MLflow experiment every ``backtest`` run is recorded under.
EXPERIMENT_NAME = "backtest"


@dataclass
class Prepared:
    """Bars and strategy ready to simulate.

    Attributes:
        bars: the bars of the backtest period (OHLCV plus the strategy's data columns).
        strategy: the Strategy class.
        params: its parameters for ``Backtest.run``.
        first_bar: position of the first bar the strategy can trade (after its warm-up).
        info: facts for the result and ``stats.json`` (the model, its training period...).
        signals: P(up) and target per bar (``model_signal`` only).
    """

    bars: pd.DataFrame
    strategy: type[Strategy]
    params: dict[str, Any]
    first_bar: int
    info: dict[str, Any] = field(default_factory=dict)
    signals: pd.DataFrame | None = None


def select_period(bars: pd.DataFrame, start: datetime | None, end: datetime | None) -> pd.DataFrame:
    """The bars with ``start <= time <= end`` (either bound optional).

    Raises:
        ValueError: fewer than 2 bars in the period (the message gives the data's span).
    """
    keep = np.ones(len(bars), dtype=bool)
    if start is not None:
        keep &= bars.index >= _bar_time(start, bars.index)
    if end is not None:
        keep &= bars.index <= _bar_time(end, bars.index)
    selected = bars.loc[keep]
    if len(selected) < 2:
        raise ValueError(
            f"{len(selected)} bars between start={start} and end={end}; the data has "
            f"{bars.index[0]} .. {bars.index[-1]}"
        )
    return selected


def _bar_time(moment: datetime, index: pd.DatetimeIndex) -> pd.Timestamp:
    """``moment`` in the index's time zone (naive times are taken as the index's own)."""
    stamp = pd.Timestamp(moment)
    if index.tz is None:
        return stamp.tz_convert("UTC").tz_localize(None) if stamp.tz is not None else stamp
    return stamp.tz_localize(index.tz) if stamp.tz is None else stamp.tz_convert(index.tz)


def prepare_sma(config: BacktestConfig, bars: pd.DataFrame) -> Prepared:
    """``sma_crossover`` over the configured period.

    Raises:
        ValueError: no bar left to trade after the slow SMA's warm-up.
    """
    period = select_period(bars, config.start, config.end)
    if len(period) <= config.slow_window + 1:
        raise ValueError(
            f"{len(period)} bars are too few for a {config.slow_window}-bar slow SMA "
            "(it needs slow_window + 2 to trade once)"
        )
    params = {
        "fast_window": config.fast_window,
        "slow_window": config.slow_window,
        "allow_short": config.allow_short,
    }
    return Prepared(period, SmaCrossover, params, first_bar=config.slow_window - 1)


def prepare_model_signal(config: BacktestConfig, bars: pd.DataFrame, ctx: TaskContext) -> Prepared:
    """``model_signal``: the model of ``config.model_task`` scores every bar, then the period.

    The model scores the whole series before the period is cut, so the first bars of the period
    get a full window of history; each prediction still uses bars up to its own only.

    Raises:
        FileNotFoundError, ValueError, shared.storage.StorageError: the model cannot be found
            or used (see :func:`.model_signals.model_file` and :func:`.model_signals.load_model`).
    """
    assert config.model_task is not None  # the config refuses model_signal without one
    # ctx.artifact_dir is <tasks_dir>/<this task>/artifacts; a download goes beside artifacts/
    # (not synced as this task's output).
    task_dir = ctx.artifact_dir.parent
    path, source = model_signals.model_file(
        config.model_task, task_dir.parent, task_dir / "inputs" / config.model_task
    )
    trained = model_signals.load_model(path, config.model_task, source)
    device = resolve_device("auto" if config.needs_gpu else "cpu")
    p_up = model_signals.up_probabilities(trained, bars, device)
    target = model_signals.target_positions(
        p_up, config.threshold, invert=config.invert, allow_short=config.allow_short
    )
    with_signals = bars.assign(**{P_UP_COLUMN: p_up, TARGET_COLUMN: target})
    period = select_period(with_signals, config.start, config.end)
    known = np.flatnonzero(period[TARGET_COLUMN].notna().to_numpy())
    if len(known) == 0 or known[0] >= len(period) - 1:
        raise ValueError(
            f"the model's {trained.config.feature_window}-bar window leaves no bar to trade in "
            f"the {len(period)} bars of the period"
        )
    same_data = trained.config.dataset == config.dataset
    info = {"model": _model_info(trained, bars if same_data else None, period.index)}
    signals = pd.concat([p_up, target], axis=1).loc[period.index]
    return Prepared(period, ModelSignal, {}, int(known[0]), info, signals)


def _model_info(
    trained: model_signals.TrainedModel, its_bars: pd.DataFrame | None, period: pd.DatetimeIndex
) -> dict[str, Any]:
    """Which model traded, from where, and how many bars of the period it was trained on.

    Args:
        trained: the model.
        its_bars: all bars of the dataset it was trained on, when the backtest uses that one.
        period: the backtest's bar times.
    """
    end = model_signals.trained_until(trained, its_bars) if its_bars is not None else None
    in_sample = int((period <= end).sum()) if end is not None else None
    if end is not None and in_sample:
        log.warning(
            "backtest_in_sample",
            model_task=trained.task_id,
            trained_until=end.isoformat(),
            in_sample_bars=in_sample,
        )
    return {
        "task_id": trained.task_id,
        "source": trained.source,
        "file": str(trained.path),
        "model": trained.config.model,
        "feature_window": trained.config.feature_window,
        "dataset": trained.config.dataset,
        "trained_until": end.isoformat() if end is not None else None,
        "in_sample_bars": in_sample,
    }


#: Warnings about the libraries' own future (pandas deprecations inside backtesting.py), not
#: about this backtest: dropped rather than reported with the result.
_NOT_ABOUT_THE_RUN = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


@contextmanager
def collected_warnings(into: list[str]) -> Iterator[None]:
    """Append the warnings raised inside to ``into`` instead of raising or printing them.

    Deprecation and future warnings are dropped (see :data:`_NOT_ABOUT_THE_RUN`).
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    into.extend(
        f"{w.category.__name__}: {w.message}"
        for w in caught
        if not issubclass(w.category, _NOT_ABOUT_THE_RUN)
    )


def summarise_warnings(texts: list[str]) -> list[str]:
    """One line per kind of warning: its first text, and how many more of the kind followed.

    Texts that differ only in their numbers are one kind: backtesting.py warns on every bar an
    order is cancelled (``time=802: Broker canceled the relative-sized order ...``).
    """
    kinds: dict[str, list[Any]] = {}
    for text in texts:
        kind = kinds.setdefault(re.sub(r"\d+(\.\d+)?", "#", text), [text, 0])
        kind[1] += 1
    return [
        first if n == 1 else f"{first} (and {n - 1} more like it)" for first, n in kinds.values()
    ]


@dataclass
class Simulation:
    """A finished backtesting.py run.

    Attributes:
        backtest: the ``Backtest`` (it draws the HTML report).
        stats: ``Backtest.run``'s result: statistics plus ``_trades`` and ``_equity_curve``.
        warnings: every warning the library raised, one entry per occurrence (see
            :meth:`summary`).
    """

    backtest: Backtest
    stats: pd.Series
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> list[str]:
        """The warnings, one line per kind (:func:`summarise_warnings`)."""
        return summarise_warnings(self.warnings)


def simulate(config: BacktestConfig, prepared: Prepared) -> Simulation:
    """Run backtesting.py on the prepared bars; slippage is charged like commission per fill."""
    caught: list[str] = []
    with collected_warnings(caught):
        backtest = Backtest(
            prepared.bars,
            prepared.strategy,
            cash=config.cash,
            commission=config.commission + config.slippage,
            spread=config.spread,
            trade_on_close=config.trade_on_close,
            exclusive_orders=config.exclusive_orders,
            finalize_trades=config.finalize_trades,
        )
        stats = backtest.run(**prepared.params)
    return Simulation(backtest, stats, caught)


def write_artifacts(
    folder: Path,
    config: BacktestConfig,
    prepared: Prepared,
    simulation: Simulation,
    record: dict[str, Any],
) -> list[str]:
    """Write every artifact into ``folder``; returns their names.

    ``stats.json`` last, so it also lists the warnings the plots raised.
    """
    stats = simulation.stats
    names = report.write_tables(folder, stats)
    with collected_warnings(simulation.warnings):
        report.plot_equity(
            stats, prepared.bars, prepared.first_bar, config.cash, folder / report.EQUITY_PNG_FILE
        )
        names.append(report.EQUITY_PNG_FILE)
        if config.html_report:
            report.write_html_report(simulation.backtest, stats, folder / report.REPORT_FILE)
            names.append(report.REPORT_FILE)
    if prepared.signals is not None:
        prepared.signals.to_csv(folder / report.SIGNALS_FILE, index_label="time")
        names.append(report.SIGNALS_FILE)
    metrics, undefined = report.metrics_of(stats)
    extra = {**record, "config": config.model_dump(mode="json"), "warnings": simulation.summary()}
    report.write_stats(folder / report.STATS_FILE, stats, metrics, undefined, extra)
    return [report.STATS_FILE, *names]


def prepare(config: BacktestConfig, ctx: TaskContext) -> Prepared:
    """Load the bars and set up the configured strategy over the configured period."""
    ctx.report_progress(0.05, f"loading {config.dataset}")
    bars = load_ohlcv(config.dataset)
    if config.strategy == "model_signal":
        ctx.report_progress(0.2, f"scoring the bars with the model of {config.model_task}")
        return prepare_model_signal(config, bars, ctx)
    return prepare_sma(config, bars)


def run(config: BacktestConfig, ctx: TaskContext) -> dict[str, Any]:
    """Backtest the configured strategy on the configured bars; the ``backtest`` entry point.

    Returns:
        JSON-serialisable result: ``metrics`` (finite floats, see
        :data:`.backtest_report.METRICS`), ``undefined_metrics`` (names left out as NaN or
        infinite), ``strategy`` (backtesting.py's name with parameters), ``dataset`` (name,
        bars, first/last bar ISO time of the period), ``model`` (``model_signal`` only: task id,
        source ``local``/``shared_storage``, ``trained_until`` and ``in_sample_bars`` when the
        model was trained on this dataset), ``artifacts`` (file names in ``ctx.artifact_dir``),
        ``warnings`` (the library's), ``mlflow_run_id``.

    Raises:
        FileNotFoundError: the dataset file or the model's artifacts do not exist.
        ValueError: unusable bars, too few bars for the strategy's warm-up, an unusable model.
        shared.storage.StorageError: the model is neither local nor in shared storage.
    """
    tags: dict[str, str] = {"tp.strategy": config.strategy}
    if config.model_task:
        tags["tp.model_task"] = config.model_task
    with mlflow_run(ctx, EXPERIMENT_NAME, tags) as recorder:
        recorder.log_params(config.model_dump(mode="json"))
        prepared = prepare(config, ctx)
        ctx.report_progress(0.5, f"simulating {len(prepared.bars)} bars")
        simulation = simulate(config, prepared)
        period = prepared.bars.index
        record = {
            "strategy": str(simulation.stats["_strategy"]),
            "dataset": {
                "name": config.dataset,
                "bars": len(period),
                "start": period[0].isoformat(),
                "end": period[-1].isoformat(),
            },
            **prepared.info,
        }
        ctx.report_progress(0.8, "writing artifacts")
        artifacts = write_artifacts(ctx.artifact_dir, config, prepared, simulation, record)
        metrics, undefined = report.metrics_of(simulation.stats)
        recorder.log_metrics(metrics, step=0)
        recorder.log_artifacts([ctx.artifact_dir / name for name in artifacts])
    for line in simulation.summary():
        log.warning("backtest_library_warning", warning=line)
    ctx.report_progress(1.0, "done", metrics)
    return {
        "metrics": metrics,
        "undefined_metrics": undefined,
        **record,
        "artifacts": artifacts,
        "warnings": simulation.summary(),
        "mlflow_run_id": recorder.run_id,
    }
