"""Config of the ``backtest`` task type, and its entry in the task-type registry.

Kept apart from :mod:`shared.task_types` (like every config model, importable without torch or
pandas, so the CLI and the scheduler validate it) and registered from here:
``shared/task_types.py`` imports this module on its last line, after ``TaskConfig``, ``TaskType``
and ``TASK_TYPES`` exist, so either module may be imported first.

The engine is backtesting.py (https://kernc.github.io/backtesting.py/); the cost fields map onto
its ``Backtest(cash=, commission=, spread=, trade_on_close=, exclusive_orders=,
finalize_trades=)`` arguments, as documented on :class:`BacktestConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from shared.constants import ROUTE_CPU, ROUTE_GPU
from shared.messages import TASK_ID_PATTERN
from shared.task_types import TASK_TYPES, TaskConfig, TaskType, check_dataset

#: Highest commission, spread or slippage accepted (a fraction: 0.05 is 5 % of the order value).
#: Far above any broker's fee, low enough to catch a percentage typed as a fraction (``1`` for 1 %).
MAX_COST_FRACTION = 0.05

Strategy = Literal["sma_crossover", "model_signal"]


class BacktestConfig(TaskConfig):
    """Config of ``backtest``: one strategy over OHLCV bars, simulated by backtesting.py.

    Data: ``dataset`` as in ``train_model`` (bundled ``GOOG``/``EURUSD``/``BTCUSD`` or a
    CSV/Parquet path on the desktop), cut to the bars with ``start <= time <= end``.

    Costs (fractions of the order value, not percent): ``commission`` is charged on every fill,
    entry and exit (backtesting.py's ``commission``); ``spread`` is the bid-ask spread, paid once
    per round trip as a worse entry price (its ``spread``); ``slippage`` is charged on every fill
    like commission, since backtesting.py has no slippage model of its own.

    Strategies:
        ``sma_crossover``: long when the ``fast_window``-bar simple moving average of the close
            crosses above the ``slow_window``-bar one; on the cross below, close and go short
            (or stay flat when ``allow_short`` is False). backtesting.py's own ``SmaCross``
            example when ``allow_short`` is True.
        ``model_signal``: trades the predictions of the model the ``train_model`` task
            ``model_task`` trained: long when P(next bar up) > ``threshold``, short (or flat)
            when it is < 1 - ``threshold``, flat in between; ``invert`` swaps long and short.

    Orders are market orders for the whole available equity, filled at the next bar's open (at
    this bar's close with ``trade_on_close``); ``finalize_trades`` closes a trade still open at
    the last bar so it counts in the trade statistics.
    """

    dataset: str = Field("GOOG", min_length=1)
    start: datetime | None = Field(None, description="First bar time (inclusive); default all.")
    end: datetime | None = Field(None, description="Last bar time (inclusive); default all.")
    cash: float = Field(10_000.0, gt=0.0, le=1e12, description="Starting equity (currency).")
    commission: float = Field(0.001, ge=0.0, le=MAX_COST_FRACTION)
    spread: float = Field(0.0, ge=0.0, le=MAX_COST_FRACTION)
    slippage: float = Field(0.0, ge=0.0, le=MAX_COST_FRACTION)
    strategy: Strategy = "sma_crossover"
    fast_window: int = Field(10, ge=1, le=10_000, description="Fast SMA length (bars).")
    slow_window: int = Field(20, ge=2, le=10_000, description="Slow SMA length (bars).")
    allow_short: bool = Field(True, description="Go short on a sell signal, else go flat.")
    model_task: str | None = Field(
        None,
        pattern=TASK_ID_PATTERN,
        validate_default=True,  # so a model_signal config without one is refused by name
        description="Id of the train_model task whose model model_signal trades.",
    )
    threshold: float = Field(0.5, ge=0.5, lt=1.0, description="P(up) needed to go long.")
    invert: bool = Field(False, description="Trade against the model's signals.")
    trade_on_close: bool = False
    exclusive_orders: bool = False
    finalize_trades: bool = True
    html_report: bool = Field(True, description="Write backtesting.py's interactive report.")
    needs_gpu: bool = Field(False, description="Route to the gpu queue (a big model) not cpu.")

    @field_validator("dataset")
    @classmethod
    def _check_dataset(cls, value: str) -> str:
        return check_dataset(value)  # the rule of TrainModelConfig.dataset

    @field_validator("end")
    @classmethod
    def _check_period(cls, value: datetime | None, info: ValidationInfo) -> datetime | None:
        start = info.data.get("start")
        if value is not None and start is not None and _naive(value) < _naive(start):
            raise ValueError(f"must not be before start ({start.isoformat()})")
        return value

    @field_validator("slow_window")
    @classmethod
    def _check_windows(cls, value: int, info: ValidationInfo) -> int:
        fast = info.data.get("fast_window")
        if fast is not None and fast >= value:
            raise ValueError(f"must be greater than fast_window ({fast}), got {value}")
        return value

    @field_validator("model_task")
    @classmethod
    def _check_model_task(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None and info.data.get("strategy") == "model_signal":
            raise ValueError("is required by strategy model_signal (a train_model task id)")
        return value


def _naive(moment: datetime) -> datetime:
    """``moment`` as a naive UTC time, so an aware and a naive time compare."""
    if moment.tzinfo is None:
        return moment
    return moment.astimezone(UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class BacktestTaskType(TaskType):
    """The ``backtest`` type: the cpu queue unless the config asks for the GPU."""

    def route_for(self, config: TaskConfig) -> str:
        """``gpu`` when ``config.needs_gpu`` (a model too big for the CPU), else ``cpu``."""
        needs_gpu = isinstance(config, BacktestConfig) and config.needs_gpu
        return ROUTE_GPU if needs_gpu else ROUTE_CPU


TASK_TYPES["backtest"] = BacktestTaskType("backtest", BacktestConfig, ROUTE_CPU)
