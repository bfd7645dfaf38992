"""Wiring of one run: per configuration, start each system, measure it, stop it, report."""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import logging
import os
import platform
import shutil
import signal
import subprocess
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import redis
import structlog

from shared import eventloop
from shared.settings import Settings

from .celery_app import CeleryRun
from .celery_side import CelerySide, new_prefix
from .cli import parse_args
from .console import say
from .constants import CELERY_REDIS_DB, CONFIGS, ROOT, SlotConfig
from .measure import measure
from .ours import Ours
from .report import evaluate, print_report, write_json
from .timing import System


def bench_settings(namespace: str, data_dir: Path, commit_check: str) -> Settings:
    """Our side's settings: the broker and Redis from the environment, all else its own."""
    return Settings(
        amqp_url=os.environ.get("TP_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
        redis_url=os.environ.get("TP_REDIS_URL", "redis://127.0.0.1:6379/0"),
        namespace=namespace,
        data_dir=data_dir,
        mlflow_tracking_uri=f"sqlite:///{data_dir / 'mlflow.db'}",
        commit_check=commit_check,
        _env_file=None,
    )


def celery_run(s: Settings) -> CeleryRun:
    """Celery on the same broker and Redis server as ours, its results in a db of their own."""
    base = s.redis_url.rsplit("/", 1)[0] if s.redis_url.count("/") > 2 else s.redis_url
    return CeleryRun(s.amqp_url, f"{base}/{CELERY_REDIS_DB}", new_prefix())


def make_system(
    name: str, cfg: SlotConfig, args: argparse.Namespace, run_dir: Path
) -> tuple[System, Settings]:
    """The system called ``name`` in ``cfg``, with the settings of a fresh namespace."""
    data_dir = Path(tempfile.mkdtemp(prefix="bench-dispatch-"))
    s = bench_settings(f"bd{uuid.uuid4().hex[:8]}-{cfg.name}", data_dir, args.commit_check)
    if name == "ours":
        return Ours(cfg, s, run_dir, submit_concurrency=args.submit_concurrency), s
    return CelerySide(cfg, celery_run(s), run_dir), s


async def run_one(
    name: str, cfg: SlotConfig, args: argparse.Namespace, run_dir: Path
) -> dict[str, Any]:
    """Start one system, measure it, always stop it and delete what it created."""
    system, s = make_system(name, cfg, args, run_dir)
    say(f"{cfg.name} / {name}: starting")
    try:
        await system.start()
        say(f"{cfg.name} / {name}: measuring")
        return await measure(system, cfg, args)
    finally:
        await system.stop()
        shutil.rmtree(s.data_dir, ignore_errors=True)
        say(f"{cfg.name} / {name}: stopped and cleaned up")


async def run_all(args: argparse.Namespace, run_dir: Path) -> dict[str, dict[str, Any]]:
    """Every configuration, each system in turn within it (same order every time)."""
    results: dict[str, dict[str, Any]] = {}
    for cfg_name in args.configs:
        cfg = CONFIGS[cfg_name]
        results[cfg_name] = {}
        for name in args.systems:
            results[cfg_name][name] = await run_one(name, cfg, args, run_dir)
    return results


def versions(s: Settings) -> dict[str, str]:
    """Python, the client libraries, the broker's and Redis's server versions, our commit."""
    out = {"python": platform.python_version()}
    for package in ("celery", "kombu", "aio-pika", "redis", "torch"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = "-"
    out["redis-server"] = str(redis.Redis.from_url(s.redis_url).info()["redis_version"])
    out["rabbitmq"] = asyncio.run(_rabbitmq_version(s.amqp_url))
    git = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    out["commit"] = git.stdout.strip() or "-"
    return out


async def _rabbitmq_version(url: str) -> str:
    connection = await aio_pika.connect(url)
    async with connection:
        underlay: Any = connection.transport
        props: Any = underlay.connection.server_properties
        version = props.get("version", b"-")
        return version.decode() if isinstance(version, bytes) else str(version)


def notes(args: argparse.Namespace) -> list[str]:
    """How each side was set up, printed under the table and kept in the JSON."""
    return [
        "ours: services.scheduler + services.gpu_worker as processes, product defaults "
        f"(forkserver preload, info logs), client TP_COMMIT_CHECK={args.commit_check}, "
        f"{args.submit_concurrency} submits in flight in a batch",
        "celery: celery worker --pool prefork --concurrency <slots> --without-gossip "
        "--without-mingle, prefetch multiplier 1, late acks, track started, priority queue, "
        "JSON, results in Redis db 13; send_task in a loop from one thread",
        "throughput/overhead: submit all, client holds every result; latency: spaced submits, "
        "each waited for by itself; cancel: command until cancelled state and process gone",
    ]


def build_report(
    args: argparse.Namespace, results: dict[str, dict[str, Any]], machine: dict[str, Any]
) -> dict[str, Any]:
    report: dict[str, Any] = {
        "started_utc": machine.pop("started_utc"),
        "args": {k: v for k, v in vars(args).items() if k not in {"configs", "systems"}},
        "machine": machine,
        "versions": versions(bench_settings("bdversions", Path("."), "off")),
        "notes": notes(args),
        "results": results,
    }
    report["rows"] = evaluate(report)
    return report


def _loads(results: dict[str, dict[str, Any]]) -> list[float]:
    return [
        r[key][0]
        for systems in results.values()
        for r in systems.values()
        for key in ("load_before", "load_after")
    ]


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 when it ran (targets missed or not), 130 when interrupted."""
    args = parse_args(argv)
    # The client's own warnings (a dirty checkout, per submit) would drown the progress lines.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    started = datetime.now(UTC)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    run_dir = ROOT / "bench" / "results" / f"dispatch-{stamp}"
    run_dir.mkdir(parents=True)
    json_path = (
        Path(args.json) if args.json else ROOT / "bench" / "results" / f"dispatch-{stamp}.json"
    )
    machine: dict[str, Any] = {
        "started_utc": started.isoformat(),
        "cpus": os.cpu_count(),
        "load_before": list(os.getloadavg()),
    }
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        results = eventloop.run(run_all(args, run_dir))
    except KeyboardInterrupt:
        say("!! interrupted; every started process was stopped and its namespace deleted")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    machine["load_after"] = list(os.getloadavg())
    machine["load_max_1m"] = max([machine["load_before"][0], *_loads(results)])
    machine["logs"] = str(run_dir)
    report = build_report(args, results, machine)
    print_report(report)
    write_json(report, json_path)
    say(f"JSON written to {json_path}; service logs in {run_dir}")
    return 0
