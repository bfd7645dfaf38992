"""Idle resident memory of the desktop services that must stay light (no torch in them).

``python -m bench.idle_memory [--settle 3]`` starts the scheduler, git-sync, artifact-sync,
health-monitor and, for comparison, a gpu-worker as real processes on this machine's RabbitMQ
and Redis (a fresh namespace, deleted after), waits until each one's heartbeat is live
(``shared.healthcheck``) and ``--settle`` seconds more, then reads each process's resident set
(``VmRSS`` in ``/proc/<pid>/status``, MiB) and whether it mapped libtorch (``/proc/<pid>/maps``).
The worker's own process is measured, not its forkserver or task children (those hold torch by
design). Target (issue 10): under 100 MB for the four light services. Prints a table and
writes JSON (``bench/results/idle-memory-<UTC>.json`` unless ``--json``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from shared.admin import delete_namespace
from shared.settings import Settings, service_environment

ROOT = Path(__file__).resolve().parent.parent
#: Service kind -> module; the light ones must stay under TARGET_MB.
SERVICES = {
    "scheduler": "services.scheduler",
    "git-sync": "services.git_sync",
    "artifact-sync": "services.artifact_sync",
    "health-monitor": "services.health_monitor",
    "gpu-worker": "services.gpu_worker",
}
LIGHT = ("scheduler", "git-sync", "artifact-sync", "health-monitor")
TARGET_MB = 100.0


def rss_mib(pid: int) -> float:
    """Resident set of ``pid`` in MiB (``VmRSS``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def maps_torch(pid: int) -> bool:
    """Whether ``pid`` has libtorch mapped (it imported torch)."""
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def wait_alive(kind: str, env: dict[str, str], timeout_s: float = 60) -> None:
    """Until ``python -m shared.healthcheck <kind>`` passes with the service's environment."""
    deadline = time.monotonic() + timeout_s
    while True:
        done = subprocess.run(
            [sys.executable, "-m", "shared.healthcheck", kind],
            cwd=ROOT,
            env=env,
            capture_output=True,
            check=False,
        )
        if done.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{kind} did not come up: {done.stderr.decode()[-500:]}")
        time.sleep(0.5)


def measure(settle_s: float, folder: Path) -> dict[str, dict[str, float | bool]]:
    """Start every service, wait until each is alive and settled, read its memory, stop it."""
    settings = Settings(
        namespace=f"bm{uuid.uuid4().hex[:10]}",
        data_dir=folder / "data",
        mlflow_tracking_uri=f"sqlite:///{folder / 'mlflow.db'}",
        _env_file=None,
    )
    (folder / "artifacts").mkdir()
    extra = {
        "TP_WORKER_NAME": "idle-memory",
        "TP_ARTIFACT_BACKEND": "path",
        "TP_ARTIFACT_DIR": str(folder / "artifacts"),
        "TP_HEALTH_PORT": "0",
        "TP_CODE_DIR": str(ROOT),
        "TP_COMMIT_CHECK": "off",
    }
    env = service_environment(settings, os.environ, **extra)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for kind, module in SERVICES.items():
            log = (folder / f"{kind}.log").open("wb")
            procs[kind] = subprocess.Popen(
                [sys.executable, "-m", module], cwd=ROOT, env=env, stdout=log, stderr=log
            )
        for kind in SERVICES:
            wait_alive(kind, env | ({"TP_WORKER_NAME": "idle-memory"}))
        time.sleep(settle_s)
        return {
            kind: {"rss_mib": rss_mib(p.pid), "torch": maps_torch(p.pid)}
            for kind, p in procs.items()
        }
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        asyncio.run(delete_namespace(settings))


def main(argv: list[str] | None = None) -> int:
    """Measure, print, write JSON; exit 1 when a light service misses the target."""
    parser = argparse.ArgumentParser(prog="python -m bench.idle_memory", description=__doc__)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds idle before reading")
    parser.add_argument("--json", type=Path, help="where to write the figures")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        found = measure(args.settle, Path(tmp))
    table = Table("service", "idle RSS (MiB)", "torch loaded", "target", "met?")
    missed = False
    for kind, figures in found.items():
        light = kind in LIGHT
        met = float(figures["rss_mib"]) < TARGET_MB and not figures["torch"]
        missed |= light and not met
        table.add_row(
            kind,
            f"{float(figures['rss_mib']):.1f}",
            "yes" if figures["torch"] else "no",
            f"< {TARGET_MB:.0f} MB, no torch" if light else "(for comparison)",
            ("yes" if met else "NO") if light else "-",
        )
    Console().print(table)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = args.json or ROOT / "bench" / "results" / f"idle-memory-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({"utc": stamp, "target_mib": TARGET_MB, "services": found}, indent=2)
    )
    print(f"JSON written to {path}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
