"""Wiring of the training benchmark: direct runs and runs through the system, alternating."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
import yaml

from bench.dispatch.app import bench_settings
from bench.dispatch.constants import ROOT, START_TIMEOUT_S
from bench.dispatch.processes import Service
from bench.soak.queues import wait_for_consumers
from shared.admin import delete_namespace
from shared.client import DistributedClient
from shared.messages import TaskState
from shared.settings import Settings, service_environment
from shared.topology import Topology

#: The issue's target: through the system at most 3 % slower than direct.
TARGET_RATIO = 1.03


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.training",
        description="train_model run directly and through the whole system; wall times, ratio.",
    )
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "train_goog.yaml")
    p.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    p.add_argument("--repeats", type=int, default=3, help="counted runs of each (3)")
    p.add_argument("--warmup", type=int, default=1, help="uncounted runs of each first (1)")
    p.add_argument("--json", default=None, help="JSON path (default bench/results/training-<UTC>)")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def load_config(args: argparse.Namespace) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(args.config.read_text())
    if args.epochs is not None:
        config["epochs"] = args.epochs
    return config


def run_direct(config: dict[str, Any], tracking_uri: str) -> dict[str, Any]:
    """Two direct runs in a fresh process, the first cold, the second warm; its JSON line."""
    argv = [sys.executable, "-m", "bench.training.direct", json.dumps(config), tracking_uri, "2"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TP_")}
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"direct run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


async def run_system(client: DistributedClient, config: dict[str, Any]) -> dict[str, Any]:
    """One run through the system: submit until the client has the completed record."""
    t0 = time.perf_counter()
    record = await client.submit_and_wait("train_model", config)
    wall = time.perf_counter() - t0
    if record.state is not TaskState.COMPLETED:
        raise RuntimeError(f"train_model ended {record.state.value}: {record.error}")
    run_s = (record.completed_at or 0.0) - (record.running_at or 0.0)
    metrics = (record.result or {}).get("metrics", {})
    return {"task_id": record.task_id, "wall_s": wall, "run_s": run_s, "metrics": metrics}


async def start_services(s: Settings, log_dir: Path, services: list[Service]) -> None:
    """Start the scheduler and a worker (appended to ``services``); wait until they consume."""
    env = service_environment(s, os.environ, TP_WORKER_NAME="bench-training", TP_FALLBACK="never")
    for module in ("scheduler", "gpu_worker"):
        argv = [sys.executable, "-m", f"services.{module}"]
        services.append(Service(argv, env, log_dir / f"{module}.log"))
    topo = Topology(s.namespace)
    await wait_for_consumers(s, {topo.queue("submit"): 1, topo.queue("gpu"): 1}, START_TIMEOUT_S)


async def alternate(args: argparse.Namespace, s: Settings, log_dir: Path) -> dict[str, Any]:
    """Warm-up runs, then direct and system runs alternating; every run's figures."""
    config = load_config(args)
    direct_uri = f"sqlite:///{s.data_dir / 'direct-mlflow.db'}"
    services: list[Service] = []
    runs: dict[str, list[dict[str, Any]]] = {"direct": [], "system": []}
    cold_system_s = 0.0
    try:
        await start_services(s, log_dir, services)
        async with DistributedClient(s, name="bench-training") as client:
            for i in range(args.warmup + args.repeats):
                counted = i >= args.warmup
                direct = await asyncio.to_thread(run_direct, config, direct_uri)
                system = await run_system(client, config)
                if i == 0:  # the fresh worker's first training: its task child starts cold
                    cold_system_s = system["wall_s"]
                cold, warm = direct["runs_s"]
                print(
                    f"{'run' if counted else 'warm-up'} {i + 1}: direct {warm:.2f} s (its "
                    f"process's first run {cold:.2f} s), system {system['wall_s']:.2f} s (its "
                    f"run {system['run_s']:.2f} s)",
                    flush=True,
                )
                if counted:
                    runs["direct"].append(direct)
                    runs["system"].append(system)
    finally:
        for service in services:
            await asyncio.to_thread(service.stop)
        await delete_namespace(s)
    return {"config": config, "runs": runs, "cold_system_s": cold_system_s}


def summarise(out: dict[str, Any]) -> dict[str, Any]:
    """Medians; the ratio compares like with like: a warm direct run against a warm system run.

    The direct process's first run (cold: MLflow's store set-up, torch's lazy initialisation)
    is reported beside it, as is the system's first run on a fresh worker (``cold_system_s``).
    """
    direct = statistics.median(r["runs_s"][1] for r in out["runs"]["direct"])
    direct_cold = statistics.median(r["runs_s"][0] for r in out["runs"]["direct"])
    system = statistics.median(r["wall_s"] for r in out["runs"]["system"])
    system_run = statistics.median(r["run_s"] for r in out["runs"]["system"])
    return {
        "direct_median_s": direct,
        "direct_cold_median_s": direct_cold,
        "system_median_s": system,
        "system_record_run_median_s": system_run,
        "cold_system_s": out["cold_system_s"],
        "ratio": system / direct,
        "cold_ratio": out["cold_system_s"] / direct_cold,
        "target_ratio": TARGET_RATIO,
        "met": system / direct <= TARGET_RATIO,
    }


def print_summary(args: argparse.Namespace, report: dict[str, Any]) -> None:
    summary, load = report["summary"], " ".join(f"{x:.2f}" for x in report["load_before"])
    print(
        f"train_model ({args.config.name}, epochs {report['config']['epochs']}), median of "
        f"{args.repeats}, {report['cpus']} CPUs, load before {load}"
    )
    print(f"  direct (the run call, its process's 2nd run): {summary['direct_median_s']:.2f} s")
    print(f"  system (submit until the client has it):      {summary['system_median_s']:.2f} s")
    run_s = summary["system_record_run_median_s"]
    print(f"  system, the record's run time (claim->end):   {run_s:.2f} s")
    met = "met" if summary["met"] else "NOT met"
    print(f"  ratio system/direct: {summary['ratio']:.3f} (target <= {TARGET_RATIO}: {met})")
    print(
        f"  cold, for reference: a fresh process's first run {summary['direct_cold_median_s']:.2f}"
        f" s; the system's first run on a fresh worker {summary['cold_system_s']:.2f} s "
        f"(ratio {summary['cold_ratio']:.3f})"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    log_dir = ROOT / "bench" / "results" / f"training-{stamp}"
    log_dir.mkdir(parents=True)
    data_dir = Path(tempfile.mkdtemp(prefix="bench-training-"))
    s = bench_settings(f"bt{uuid.uuid4().hex[:8]}", data_dir, "warn")
    load_before = list(os.getloadavg())
    try:
        out = asyncio.run(alternate(args, s, log_dir))
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    summary = summarise(out)
    report = {
        "started_utc": stamp,
        "cpus": os.cpu_count(),
        "load_before": load_before,
        "load_after": list(os.getloadavg()),
        **out,
        "summary": summary,
    }
    print_summary(args, report)
    path = Path(args.json) if args.json else ROOT / "bench" / "results" / f"training-{stamp}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"JSON written to {path}; service logs in {log_dir}")
    return 0
