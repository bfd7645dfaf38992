"""Wiring and lifecycle of one soak: settings, start, load, stop, report, clean-up."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika

from shared.settings import Settings, service_environment
from shared.topology import Topology

from .cleanup import cleanup_namespace
from .cli import parse_args
from .console import say
from .constants import LINGER_S, ROOT, SOAK_SERVICE_ENV
from .load import run_load
from .processes import Fleet, describe_pid, processes_tagged
from .queues import queue_counts, wait_for_consumers
from .report import build_report, print_report, write_json

#: Seconds the scheduler and the first workers get to start consuming (a cold torch import).
START_TIMEOUT_S = 180


async def start_services(args: argparse.Namespace, s: Settings, fleet: Fleet) -> bool:
    """Start the scheduler and workers; False (logs shown) if they do not come up in 180 s."""
    fleet.start("scheduler", "scheduler")
    for i in range(args.workers):
        fleet.start("worker", f"w{i}")
    topo = Topology(s.namespace)
    try:
        await wait_for_consumers(
            s, {topo.queue("submit"): 1, topo.queue("cpu"): args.workers}, START_TIMEOUT_S
        )
    except TimeoutError as e:
        say(f"!! services did not start: {e}")
        for inc in fleet.current.values():
            say(f"--- {inc.log_path.name}")
            say("\n".join(inc.log_path.read_text(errors="replace").splitlines()[-20:]))
        return False
    for inc in fleet.current.values():
        inc.check_ready()
    return True


async def stop_services(s: Settings, fleet: Fleet) -> dict[str, Any]:
    """Stop the services gracefully; exit codes, stray processes and queue counts after it."""
    fleet.check_lingering(LINGER_S)
    codes = fleet.stop_gracefully()
    say(f"services stopped: {codes}")
    stray = [describe_pid(p) for p in processes_tagged(s.namespace + "/")]
    try:
        queues = await queue_counts(s)
    except (aio_pika.exceptions.AMQPError, OSError) as e:
        queues = {}
        say(f"!! could not read queues: {e}")
    return {"codes": codes, "stray": stray, "queues": queues}


async def soak(args: argparse.Namespace, s: Settings, fleet: Fleet) -> dict[str, Any] | None:
    """Start, submit, kill, wait, stop, analyse; the report, or None if nothing started."""
    t_total = time.monotonic()
    say(
        f"soak {s.namespace}: {args.tasks} probe tasks, {args.workers} workers, a worker SIGKILLed "
        f"every {args.kill_every:g} s (+-30 %), deadline {args.deadline:g} s"
    )
    say(
        "service settings for the soak: TP_LEASE_S=3, TP_REAPER_INTERVAL_S=0.5 (a killed "
        "worker's task is requeued within ~3.5 s), TP_MAX_ATTEMPTS=20 (so a task hit by many "
        "kills still finishes; the product default is 3), TP_DRAIN_TIMEOUT_S=5 (final stop only)"
    )
    say(f"logs: {fleet.log_dir}")
    if not await start_services(args, s, fleet):
        return None
    say(f"services up after {time.monotonic() - t_total:.1f} s")
    load = await run_load(args, s, fleet)
    end = await stop_services(s, fleet)
    return build_report(args, s, fleet, load, {**end, "t_total": t_total})


def soak_settings(namespace: str, run_dir: Path, data_dir: Path) -> Settings:
    """The soak's own settings: the broker and Redis from the environment, all else its own."""
    return Settings(
        amqp_url=os.environ.get("TP_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
        redis_url=os.environ.get("TP_REDIS_URL", "redis://127.0.0.1:6379/0"),
        namespace=namespace,
        data_dir=data_dir,
        mlflow_tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}",
        _env_file=None,
    )


def service_env(s: Settings, preload: str | None) -> dict[str, str]:
    """The services' environment: no inherited ``TP_*``, the soak's settings, JSON logs."""
    env = service_environment(s, os.environ, TP_LOG_LEVEL="info", **SOAK_SERVICE_ENV)
    if preload is not None:
        env["TP_WORKER_PRELOAD"] = preload
    return env


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _show(report: dict[str, Any] | None, json_path: str | None) -> int:
    """Print the report (and write its JSON); the exit code: 0 pass, 1 fail, 2 not started."""
    if report is None:
        return 2
    print_report(report)
    if json_path:
        write_json(report, json_path)
        say(f"JSON written to {json_path}")
    return 1 if report["failed"] else 0


def _run(args: argparse.Namespace, s: Settings, fleet: Fleet) -> int:
    """The soak and its report; 130 on Ctrl-C or SIGTERM."""
    try:
        code = _show(asyncio.run(soak(args, s, fleet)), args.json)
    except KeyboardInterrupt:
        say("!! interrupted; stopping everything")
        return 130
    return code


def _clean_up(fleet: Fleet, s: Settings, data_dir: Path, *, keep_data: bool) -> None:
    """Kill every process of the soak, delete its namespace, and its data unless kept."""
    killed = fleet.kill_everything()
    if killed:
        say(f"killed {len(killed)} leftover processes: {killed}")
    try:
        cleanup_namespace(s)
        say(f"namespace {s.namespace} deleted (Redis keys, queues, exchanges)")
    except Exception as e:  # say so, never mask the result
        say(f"!! clean-up of namespace {s.namespace} failed: {e}")
    if not keep_data:
        shutil.rmtree(data_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Run the soak; always kill its processes and delete its namespace on the way out."""
    args = parse_args(argv)
    namespace = f"soak{uuid.uuid4().hex[:8]}"
    run_dir = ROOT / "bench" / "results" / f"soak-{namespace}"
    log_dir, data_dir = run_dir / "logs", run_dir / "data"
    log_dir.mkdir(parents=True)
    data_dir.mkdir()
    s = soak_settings(namespace, run_dir, data_dir)
    fleet = Fleet(service_env(s, args.preload), log_dir, namespace)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _run(args, s, fleet)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # finish the clean-up
        _clean_up(fleet, s, data_dir, keep_data=args.keep_data)
        signal.signal(signal.SIGTERM, previous)
