"""A backtest's statistics and artifacts: metrics, ``stats.json``, trades, equity curve, report.

Every statistic is backtesting.py's own (``Backtest.run``'s result, computed in its
``backtesting/_stats.py:compute_stats``, documented at
https://kernc.github.io/backtesting.py/doc/backtesting/backtesting.html#backtesting.backtesting.Backtest.run);
this module only renames them and makes them JSON-safe. In the formulas below ``E_t`` is the
equity at bar ``t`` (cash plus open positions at the close), ``r`` the equity's simple returns
per period (daily bars resampled to calendar days), ``g`` their geometric mean and ``D`` the
periods per year (252 trading days; 365 for data with weekends; 52, 12, 1 for weekly, monthly,
yearly bars).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

STATS_FILE = "stats.json"
TRADES_FILE = "trades.csv"
EQUITY_CSV_FILE = "equity_curve.csv"
EQUITY_PNG_FILE = "equity_curve.png"
REPORT_FILE = "report.html"
SIGNALS_FILE = "signals.csv"

#: ``result["metrics"]`` key -> backtesting.py statistic, and how it is computed there.
METRICS: tuple[tuple[str, str, str], ...] = (
    ("return_pct", "Return [%]", "(E_last - E_0) / E_0 * 100"),
    ("return_ann_pct", "Return (Ann.) [%]", "((1 + g)^D - 1) * 100 (compounded)"),
    (
        "buy_hold_return_pct",
        "Buy & Hold Return [%]",
        "(Close_last - Close_k) / Close_k * 100, k = first bar the strategy can trade",
    ),
    (
        "volatility_ann_pct",
        "Volatility (Ann.) [%]",
        "sqrt((var(r) + (1 + g)^2)^D - (1 + g)^(2D)) * 100 (of compounded returns)",
    ),
    ("cagr_pct", "CAGR [%]", "((E_last / E_0)^(1 / years) - 1) * 100, years of 365.25 days"),
    ("sharpe_ratio", "Sharpe Ratio", "return_ann_pct / volatility_ann_pct (risk-free rate 0)"),
    (
        "sortino_ratio",
        "Sortino Ratio",
        "((1 + g)^D - 1) / (sqrt(mean(min(r, 0)^2)) * sqrt(D)) (risk-free rate 0)",
    ),
    ("calmar_ratio", "Calmar Ratio", "((1 + g)^D - 1) / |max drawdown|"),
    (
        "max_drawdown_pct",
        "Max. Drawdown [%]",
        "-max_t(1 - E_t / max_{s<=t} E_s) * 100 (negative or 0)",
    ),
    (
        "max_drawdown_duration_days",
        "Max. Drawdown Duration",
        "longest time from an equity peak to its recovery (or the last bar), days",
    ),
    ("n_trades", "# Trades", "closed trades"),
    ("win_rate_pct", "Win Rate [%]", "share of trades with P&L > 0 * 100"),
    (
        "profit_factor",
        "Profit Factor",
        "sum of winning trades' returns / |sum of losing trades' returns| (returns in %)",
    ),
    ("exposure_time_pct", "Exposure Time [%]", "share of bars with a position open * 100"),
    ("equity_final", "Equity Final [$]", "E_last (currency)"),
    ("commissions", "Commissions [$]", "commission and slippage paid (currency)"),
)


def json_value(value: Any) -> Any:
    """One backtesting.py statistic as JSON: times as ISO text, durations as pandas prints them.

    NaN and infinity (a profit factor without a losing trade, a Sortino ratio without a losing
    period) become ``None``: JSON has neither.
    """
    if value is None or value is pd.NaT:
        converted: Any = None
    elif isinstance(value, pd.Timestamp):
        converted = value.isoformat()
    elif isinstance(value, bool | np.bool_):
        converted = bool(value)
    elif isinstance(value, int | np.integer):
        converted = int(value)
    elif isinstance(value, float | np.floating):
        converted = float(value) if math.isfinite(value) else None
    else:
        converted = str(value)  # Timedelta as "830 days 00:00:00", the strategy's name
    return converted


def library_stats(stats: pd.Series) -> dict[str, Any]:
    """backtesting.py's statistics under its own names, JSON-safe.

    The ``_``-prefixed strategy, equity curve and trades are left out: they have their own files.
    """
    return {str(k): json_value(v) for k, v in stats.items() if not str(k).startswith("_")}


def _number(value: Any) -> float | None:
    if isinstance(value, pd.Timedelta):
        return float(value.total_seconds()) / 86_400.0
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | float | np.number):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def metrics_of(stats: pd.Series) -> tuple[dict[str, float], list[str]]:
    """The task's metrics (:data:`METRICS`) from backtesting.py's statistics.

    Args:
        stats: ``Backtest.run``'s result.

    Returns:
        ``(metrics, undefined)``: the finite metrics as floats (drawdown duration in days), and
        the names of those the run leaves undefined (NaN or infinite: no trades, no losing
        trade, no drawdown), which are left out of ``metrics`` since JSON has no NaN.
    """
    metrics: dict[str, float] = {}
    undefined: list[str] = []
    for name, key, _ in METRICS:
        if key == "Commissions [$]" and key not in stats:
            metrics[name] = 0.0  # backtesting.py lists it only when some were paid
            continue
        number = _number(stats.get(key))
        if number is None:
            undefined.append(name)
        else:
            metrics[name] = number
    return metrics, undefined


def write_stats(
    path: Path,
    stats: pd.Series,
    metrics: Mapping[str, float],
    undefined: list[str],
    extra: Mapping[str, Any],
) -> None:
    """Write ``stats.json``.

    It holds the metrics, their definitions, the library's full statistics and ``extra``
    (config, data period, model, warnings).
    """
    report = {
        "metrics": dict(metrics),
        "undefined_metrics": undefined,
        "definitions": {name: {"source": key, "formula": f} for name, key, f in METRICS},
        "library_stats": library_stats(stats),
        **extra,
    }
    path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")


def write_tables(artifact_dir: Path, stats: pd.Series) -> list[str]:
    """Write ``trades.csv`` and ``equity_curve.csv``.

    ``trades.csv``: one row per closed trade, backtesting.py's ``_trades`` columns (size in
    units, entry/exit bar and price, P&L in currency, return as a fraction, commissions...).
    ``equity_curve.csv``: per bar, equity in currency and drawdown as a fraction.

    Returns:
        The file names written.
    """
    stats["_trades"].to_csv(artifact_dir / TRADES_FILE, index=False)
    stats["_equity_curve"].to_csv(artifact_dir / EQUITY_CSV_FILE, index_label="time")
    return [TRADES_FILE, EQUITY_CSV_FILE]


def plot_equity(
    stats: pd.Series, bars: pd.DataFrame, first_bar: int, cash: float, path: Path
) -> None:
    """Plot the equity curve against buy-and-hold, with the drawdown below (PNG).

    Args:
        stats: ``Backtest.run``'s result (``_equity_curve``: Equity, DrawdownPct per bar).
        bars: the bars the backtest ran on.
        first_bar: position of the first bar the strategy could trade (after warm-up), where
            buy-and-hold buys.
        cash: starting equity (currency).
        path: where to write the PNG.
    """
    from matplotlib.figure import Figure

    curve = stats["_equity_curve"]
    close = bars["Close"].iloc[first_bar:]
    figure = Figure(figsize=(9, 5.5), dpi=100)
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    top.plot(curve.index, curve["Equity"] / cash * 100.0, label="strategy", linewidth=1.2)
    top.plot(close.index, close / close.iloc[0] * 100.0, label="buy & hold", linewidth=1.0)
    top.set_ylabel("equity (% of starting cash)")
    top.set_title(f"{stats['_strategy']}: {stats['Return [%]']:+.1f} %")
    top.grid(alpha=0.3)
    top.legend()
    bottom.fill_between(curve.index, -curve["DrawdownPct"] * 100.0, 0.0, color="tab:red", alpha=0.4)
    bottom.set_ylabel("drawdown (%)")
    bottom.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, format="png")


def write_html_report(backtest: Any, stats: pd.Series, path: Path) -> None:
    """Write backtesting.py's interactive report as one self-contained HTML file.

    ``Backtest.plot(filename=..., open_browser=False)`` builds the bokeh figure and saves it with
    bokeh's default CDN resources and with backtesting.py's usage counter (a document-ready
    callback that loads an iframe from kernc.github.io). Both would reach the internet when the
    file is opened, so the document's remote JS callbacks are dropped and the figure is saved
    again with bokeh's JS inline (``bokeh.resources.INLINE``): the file works offline and
    fetches nothing.
    """
    from bokeh.io import save
    from bokeh.resources import INLINE

    figure = backtest.plot(results=stats, filename=str(path), open_browser=False)
    document = figure.document
    if document is not None:
        callbacks = document.callbacks.js_event_callbacks
        for event, handlers in list(callbacks.items()):
            callbacks[event] = [h for h in handlers if "://" not in str(getattr(h, "code", ""))]
    save(figure, filename=path, resources=INLINE, title=f"Backtest: {stats['_strategy']}")
