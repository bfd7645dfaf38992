"""The report: one table of both systems with ratios and targets, and the JSON file."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


@dataclass(frozen=True)
class Metric:
    """One row kind: where its figure is in a system's results, and the issue's target."""

    label: str
    path: tuple[str, ...]
    higher_is_better: bool
    target: str
    #: (ours, Celery's) -> met; None when the issue sets no target for it.
    met: Callable[[float, float], bool] | None


METRICS = [
    Metric(
        "throughput (tasks/s)",
        ("throughput", "per_s"),
        True,
        ">= 2.0x Celery",
        lambda o, c: o >= 2.0 * c,
    ),
    Metric(
        "submit->start p50 (ms)",
        ("latency", "submit_to_start_ms", "p50"),
        False,
        "<= 2 ms, < Celery",
        lambda o, c: o <= 2.0 and o < c,
    ),
    Metric(
        "submit->start p99 (ms)",
        ("latency", "submit_to_start_ms", "p99"),
        False,
        "<= 5 ms, < Celery",
        lambda o, c: o <= 5.0 and o < c,
    ),
    Metric(
        "finish->client p50 (ms)",
        ("latency", "finish_to_client_ms", "p50"),
        False,
        "<= 2 ms",
        lambda o, c: o <= 2.0,
    ),
    Metric("finish->client p99 (ms)", ("latency", "finish_to_client_ms", "p99"), False, "-", None),
    Metric(
        "overhead on 100 ms tasks (ms/task)",
        ("overhead", "overhead_ms"),
        False,
        "<= 2 ms",
        lambda o, c: o <= 2.0,
    ),
    Metric("cancel p50 (ms)", ("cancel", "latency_ms", "p50"), False, "-", None),
    Metric(
        "cancel p99 (ms)",
        ("cancel", "latency_ms", "p99"),
        False,
        "< 1000 ms",
        lambda o, c: o < 1000,
    ),
]


def figure(results: dict[str, Any] | None, path: tuple[str, ...]) -> float:
    """The figure at ``path`` in one system's results; NaN where it was not measured."""
    node: Any = results
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return math.nan
        node = node[part]
    return float(node) if isinstance(node, int | float) else math.nan


def advantage(metric: Metric, ours: float, celery: float) -> float:
    """How many times better ours is: ours/Celery for throughput, Celery/ours for times."""
    if math.isnan(ours) or math.isnan(celery) or min(ours, celery) <= 0:
        return math.nan
    return ours / celery if metric.higher_is_better else celery / ours


def evaluate(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per metric and configuration: both figures, the advantage, the target, met."""
    rows = []
    for cfg, systems in report["results"].items():
        for metric in METRICS:
            ours = figure(systems.get("ours"), metric.path)
            celery = figure(systems.get("celery"), metric.path)
            met: bool | None = None
            if metric.met is not None and not math.isnan(ours):
                needs_celery = "Celery" in metric.target
                met = None if needs_celery and math.isnan(celery) else metric.met(ours, celery)
            rows.append(
                {
                    "config": cfg,
                    "metric": metric.label,
                    "ours": ours,
                    "celery": celery,
                    "advantage": advantage(metric, ours, celery),
                    "target": metric.target,
                    "met": met,
                }
            )
    return rows


def _num(x: float, digits: int = 2) -> str:
    return "-" if math.isnan(x) else f"{x:,.{digits}f}"


def print_report(report: dict[str, Any]) -> None:
    """The table (both systems, advantage, target, met) and the machine's load and versions."""
    table = Table(title="Dispatch: ours vs Celery 5 on the same RabbitMQ and Redis")
    for col in ("config", "metric", "ours", "Celery", "ours better by (x)", "target", "met?"):
        table.add_column(col, justify="right" if col in {"ours", "Celery"} else "left")
    for row in report["rows"]:
        met = {True: "yes", False: "NO", None: "-"}[row["met"]]
        digits = 0 if row["metric"].startswith("throughput") else 2
        table.add_row(
            row["config"],
            row["metric"],
            _num(row["ours"], digits),
            _num(row["celery"], digits),
            _num(row["advantage"]),
            row["target"],
            met,
        )
    console = Console(width=max(120, Console().width))
    console.print(table)
    m = report["machine"]
    console.print(
        f"machine: {m['cpus']} CPUs; load average before {_load(m['load_before'])}, "
        f"after {_load(m['load_after'])}; max during the run {m['load_max_1m']:.2f} (1 min)"
    )
    console.print("versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()))
    console.print(
        "ours better by: ours/Celery for throughput, Celery/ours for times (>1: ours better)"
    )
    for note in report["notes"]:
        console.print(f"note: {note}")


def _load(values: list[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


def write_json(report: dict[str, Any], path: Path) -> None:
    """The whole report as JSON (NaN written as null)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_nan_to_none(report), indent=2, default=str) + "\n")


def _nan_to_none(node: Any) -> Any:
    if isinstance(node, float) and math.isnan(node):
        return None
    if isinstance(node, dict):
        return {k: _nan_to_none(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_nan_to_none(v) for v in node]
    return node
