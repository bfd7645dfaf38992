"""The issue's measurements on one started system: the workloads and the figures of each."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from .console import say
from .constants import SLEEP_TASK_S, SlotConfig
from .timing import Batch, System, Timing, summary_ms


def _timings_figures(timings: list[Timing]) -> dict[str, Any]:
    return {
        "submit_to_start_ms": summary_ms([t.submit_to_start_s for t in timings]),
        "finish_to_client_ms": summary_ms([t.finish_to_client_s for t in timings]),
    }


def _batch_figures(batch: Batch, n: int) -> dict[str, Any]:
    return {
        "tasks": n,
        "completed": len(batch.timings),
        "failed": batch.failed,
        "wall_s": batch.wall_s,
        "per_s": n / batch.wall_s if batch.wall_s > 0 else None,
        **_timings_figures(batch.timings),
    }


async def _throughput(system: System, n: int) -> dict[str, Any]:
    batch = await system.batch(n, 0.0)
    figures = _batch_figures(batch, n)
    say(f"  throughput: {n} tasks in {batch.wall_s:.2f} s = {figures['per_s']:.0f}/s")
    return figures


async def _latency(system: System, n: int, gap_ms: float) -> dict[str, Any]:
    timings = await system.spaced(n, gap_ms / 1000)
    figures = {"tasks": n, "completed": len(timings), "gap_ms": gap_ms, **_timings_figures(timings)}
    # Each task's (submit->start, finish->client) in ms, in the order the results came.
    figures["samples_ms"] = [
        [round(t.submit_to_start_s * 1000, 3), round(t.finish_to_client_s * 1000, 3)]
        for t in timings
    ]
    s2s, f2c = figures["submit_to_start_ms"], figures["finish_to_client_ms"]
    say(
        f"  latency: submit->start p50 {s2s['p50']:.2f} p99 {s2s['p99']:.2f} ms; "
        f"finish->client p50 {f2c['p50']:.2f} p99 {f2c['p99']:.2f} ms"
    )
    return figures


async def _overhead(system: System, m: int, slots: int) -> dict[str, Any]:
    batch = await system.batch(m, SLEEP_TASK_S)
    figures = _batch_figures(batch, m)
    figures["sleep_s"] = SLEEP_TASK_S
    figures["slots"] = slots
    figures["overhead_ms"] = (batch.wall_s * slots / m - SLEEP_TASK_S) * 1000
    say(f"  overhead: {m} x 100 ms in {batch.wall_s:.2f} s = {figures['overhead_ms']:.2f} ms/task")
    return figures


async def _cancel(system: System, n: int) -> dict[str, Any]:
    c = await system.cancels(n)
    figures: dict[str, Any] = {
        "tasks": n,
        "timed_out": c.timed_out,
        "notes": c.notes,
        "latency_ms": summary_ms(c.latencies_s),
        "to_state_ms": summary_ms(c.state_s),
        "to_process_gone_ms": summary_ms(c.gone_s),
        "samples_ms": [round(x * 1000, 3) for x in c.latencies_s],
    }
    lat = figures["latency_ms"]
    say(f"  cancel: p50 {lat['p50']:.1f} p99 {lat['p99']:.1f} ms ({c.timed_out} timed out)")
    return figures


async def measure(system: System, cfg: SlotConfig, args: argparse.Namespace) -> dict[str, Any]:
    """Warm-up, throughput, spaced latency, 100 ms overhead, cancels; each figure by name."""
    out: dict[str, Any] = {"load_before": list(os.getloadavg())}
    t0 = time.monotonic()
    if args.warmup:
        await system.batch(args.warmup, 0.0)
    if args.tasks:
        out["throughput"] = await _throughput(system, args.tasks)
    if args.latency_tasks:
        out["latency"] = await _latency(system, args.latency_tasks, args.gap_ms)
    if args.sleep_tasks:
        out["overhead"] = await _overhead(system, args.sleep_tasks, cfg.slots)
    if args.cancel_tasks:
        out["cancel"] = await _cancel(system, args.cancel_tasks)
    out["load_after"] = list(os.getloadavg())
    out["measured_s"] = time.monotonic() - t0
    return out
