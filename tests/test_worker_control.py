"""``tradectl worker status|stop|start`` against real worker processes, RabbitMQ and Redis."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from shared.client import DistributedClient
from shared.gitinfo import head_commit
from shared.health import ServiceState, ServiceStatus
from shared.messages import TaskState
from shared.settings import Settings
from tests.conftest import ROOT, Platform, ServiceProcess, service_env, tradectl
from tests.faults.test_lifecycle import wait_progress
from tests.test_pipeline import wait_state

WAIT_S = 60
#: Heartbeat every 0.5 s, offline 2 s after the last one.
HEARTBEAT_TTL_S = 2.0
FAST_BEATS = {"TP_HEARTBEAT_INTERVAL_S": "0.5", "TP_HEARTBEAT_TTL_S": str(HEARTBEAT_TTL_S)}
#: Workers that only run probes start in a second instead of importing torch; they keep their
#: code when the checkout moves under them (a commit made while the test runs).
LIGHT = {
    "TP_WORKER_PRELOAD": '["services.gpu_worker.tasks.probe"]',
    "TP_WORKER_CODE_UPDATE": "ignore",
    **FAST_BEATS,
}
CPU_ONLY = {**LIGHT, "TP_WORKER_GPU_SLOTS": "0"}


def start_worker(platform: Platform, name: str, **env: str) -> ServiceProcess:
    """One more worker process named ``name``, stopped with the platform."""
    proc = ServiceProcess(
        "gpu_worker",
        service_env(platform.settings, TP_WORKER_NAME=name, **env),
        platform.tmp / f"worker-{name}-{len(platform.procs)}.log",
    )
    platform.procs[f"gpu_worker:{name}:{len(platform.procs)}"] = proc
    return proc


async def wait_worker(
    client: DistributedClient,
    name: str,
    states: set[ServiceState],
    *,
    timeout: float = 30,
    pid: int | None = None,
) -> ServiceStatus:
    """Poll the heartbeats until worker ``name`` (process ``pid`` if given) is in ``states``."""
    deadline = time.monotonic() + timeout
    found: ServiceStatus | None = None
    while time.monotonic() < deadline:
        found = next((w for w in await client.workers() if w.heartbeat.name == name), None)
        if found and found.state in states and pid in (None, found.heartbeat.pid):
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} is {found and found.state}, wanted {states}")


def cli(settings: Settings, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return tradectl(*args, env=service_env(settings), timeout=timeout)


def status_json(settings: Settings) -> dict[str, dict]:
    shown = cli(settings, "worker", "status", "--json")
    assert shown.returncode in (0, 1), shown.stderr
    return {w["name"]: w for w in json.loads(shown.stdout)}


async def test_worker_stop_name_drains_that_worker_only(
    platform: Platform, client: DistributedClient
):
    env = {**CPU_ONLY, "TP_DRAIN_TIMEOUT_S": "30"}
    platform.start("scheduler", **env)
    first = start_worker(platform, "w-first", **env)
    await wait_worker(client, "w-first", {ServiceState.ONLINE})
    task = await client.submit("probe", {"sleep_s": 5, "steps": 10})
    assert (await wait_state(client, task.task_id, TaskState.RUNNING)).worker == "w-first"
    second = start_worker(platform, "w-second", **env)
    await wait_worker(client, "w-second", {ServiceState.ONLINE})

    stop = await asyncio.to_thread(cli, platform.settings, "worker", "stop", "w-first", "--no-wait")
    assert stop.returncode == 0, stop.stderr
    assert f"drain requested: w-first (running {task.task_id[:12]})" in stop.stdout
    await wait_worker(client, "w-first", {ServiceState.DRAINING})
    assert await asyncio.to_thread(first.proc.wait, 30) == 0

    # It let its task finish, as on SIGTERM, and only it stopped.
    record = await client.status(task.task_id)
    assert record.state is TaskState.COMPLETED and record.worker == "w-first"
    assert record.attempts == 1
    assert '"drain_requested"' in first.log_text() and '"requested_by": "client:' in (
        first.log_text()
    )
    assert second.proc.poll() is None and '"drain_requested"' not in second.log_text()
    later = [await client.submit("probe", {"sleep_s": 0.1}) for _ in range(3)]
    done = [await client.wait(t.task_id, timeout_s=WAIT_S) for t in later]
    assert [(r.state, r.worker) for r in done] == [(TaskState.COMPLETED, "w-second")] * 3
    await wait_worker(client, "w-second", {ServiceState.ONLINE})  # its last task's beat passed
    states = {w.heartbeat.name: w.state for w in await client.workers()}
    assert states == {"w-first": ServiceState.OFFLINE, "w-second": ServiceState.ONLINE}


async def test_worker_stop_all_drains_every_worker_and_hands_back_a_long_task(
    platform: Platform, client: DistributedClient
):
    env = {**CPU_ONLY, "TP_DRAIN_TIMEOUT_S": "1", "TP_CANCEL_GRACE_S": "3"}
    platform.start("scheduler", **env)
    workers = [start_worker(platform, name, **env) for name in ("w-a", "w-b")]
    for name in ("w-a", "w-b"):
        await wait_worker(client, name, {ServiceState.ONLINE})
    long = await client.submit("probe", {"sleep_s": 30, "steps": 60})
    await wait_progress(client, long.task_id, 0.05)

    stop = await asyncio.to_thread(
        cli, platform.settings, "worker", "stop", "--all", "--timeout", "60", timeout=90
    )
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert "stopped: w-a, w-b" in stop.stdout
    assert [await asyncio.to_thread(w.proc.wait, 30) for w in workers] == [0, 0]
    # Past its drain timeout the running task was stopped and handed back, attempt not counted.
    handed = await client.status(long.task_id)
    assert handed.state is TaskState.QUEUED and handed.attempts == 0
    reasons = [h.get("reason", "") for h in await client.history(long.task_id)]
    assert "handed back by a draining worker (attempt not counted)" in reasons
    assert {w.state for w in await client.workers()} == {ServiceState.OFFLINE}
    assert platform.procs["scheduler"].proc.poll() is None


async def test_worker_stop_refuses_unknown_worker_and_bad_arguments(settings: Settings):
    unknown = cli(settings, "worker", "stop", "no-such-worker")
    assert unknown.returncode == 4
    assert "no worker named 'no-such-worker' is online" in unknown.stderr
    assert cli(settings, "worker", "stop").returncode == 2
    assert cli(settings, "worker", "stop", "w", "--all").returncode == 2
    nobody = cli(settings, "worker", "stop", "--all")
    assert nobody.returncode == 0 and "nothing to drain" in nobody.stderr


async def test_worker_status_busy_offline_after_sigkill_online_after_restart(
    platform: Platform, client: DistributedClient
):
    platform.start("scheduler", **CPU_ONLY)
    commit = head_commit(ROOT)
    worker = start_worker(platform, "w-status", **CPU_ONLY)
    await wait_worker(client, "w-status", {ServiceState.ONLINE})

    shown = status_json(platform.settings)["w-status"]
    beat = shown["heartbeat"]
    assert shown["state"] == "online" and beat["pid"] == worker.proc.pid
    assert beat["host"] == socket.gethostname() and beat["version"]
    assert beat["code_commit"] in {commit, head_commit(ROOT)} and shown["uptime_s"] >= 0
    assert beat["worker"]["slots"] == {"cpu": 1} and beat["worker"]["running"] == []
    gpu = beat["worker"]["gpu"]
    assert gpu["gpus"] or gpu["error"].startswith("no GPU"), gpu

    task = await client.submit("probe", {"sleep_s": 6, "steps": 12})
    await wait_state(client, task.task_id, TaskState.RUNNING)
    await wait_worker(client, "w-status", {ServiceState.BUSY})
    busy = status_json(platform.settings)["w-status"]
    assert busy["state"] == "busy"
    assert [t["task_id"] for t in busy["heartbeat"]["worker"]["running"]] == [task.task_id]
    table = cli(platform.settings, "worker", "status")
    assert table.returncode == 0, table.stderr
    text = " ".join(table.stdout.split())
    assert "w-status" in text and "busy" in text and str(worker.proc.pid) in text
    assert task.task_id[:12] in text and "cpu 1 (1 busy)" in text
    assert ("no GPU" in text) or any(g["name"] in text for g in gpu["gpus"])

    os.kill(worker.proc.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    await asyncio.to_thread(worker.proc.wait, 10)
    await wait_worker(client, "w-status", {ServiceState.OFFLINE}, timeout=HEARTBEAT_TTL_S + 1)
    assert time.monotonic() - killed_at <= HEARTBEAT_TTL_S + 1
    offline = cli(platform.settings, "worker", "status", "--json")
    assert offline.returncode == 1  # no worker alive
    assert json.loads(offline.stdout)[0]["state"] == "offline"

    again = start_worker(platform, "w-status", **CPU_ONLY)
    back = await wait_worker(client, "w-status", {ServiceState.ONLINE}, pid=again.proc.pid)
    assert back.heartbeat.pid != worker.proc.pid
    assert status_json(platform.settings)["w-status"]["state"] == "online"


async def test_worker_start_runs_a_worker_in_the_foreground(
    settings: Settings, client: DistributedClient, tmp_path: Path
):
    log = (tmp_path / "foreground.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "shared.cli", "worker", "start", "--name", "fg-worker"],
        cwd=ROOT,
        env=service_env(settings, **CPU_ONLY),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        # exec: the worker is the tradectl process itself (same pid), with its environment.
        online = await wait_worker(client, "fg-worker", {ServiceState.ONLINE}, pid=proc.pid)
        assert online.heartbeat.worker is not None
        assert online.heartbeat.worker.slots == {"cpu": 1}
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def fake_systemctl(folder: Path, exit_code: int) -> Path:
    """A ``systemctl`` that records its arguments and fails as systemd does without the unit."""
    folder.mkdir()
    script = folder / "systemctl"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" > "{folder}/args"\n'
        'echo "Failed to start $4: Unit $4 not found." >&2\n'
        f"exit {exit_code}\n"
    )
    script.chmod(0o755)
    return folder


def test_worker_start_systemd_fails_clearly_without_or_with_a_failing_systemctl(
    settings: Settings, tmp_path: Path
):
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = tradectl(
        "worker", "start", "--systemd", env=service_env(settings, PATH=str(empty)), timeout=60
    )
    assert missing.returncode == 1
    assert "systemctl not found" in " ".join(missing.stderr.split())

    folder = fake_systemctl(tmp_path / "bin", 5)
    failing = tradectl(
        "worker", "start", "--systemd", env=service_env(settings, PATH=str(folder)), timeout=60
    )
    message = " ".join(failing.stderr.split())
    assert failing.returncode == 1
    assert "systemctl start trading-worker@0.service failed (exit 5)" in message
    assert "Unit trading-worker@0.service not found." in message
    assert (folder / "args").read_text().split() == [
        "--no-ask-password",
        "start",
        "--",
        "trading-worker@0.service",
    ]


@pytest.mark.skipif(
    not any((Path(p) / "systemctl").exists() for p in os.get_exec_path()),
    reason="no systemctl on this machine",
)
def test_worker_start_systemd_reports_the_real_systemctl_failure(settings: Settings):
    # No such unit anywhere: with systemd running it is "not found", without systemd it is
    # "not booted with systemd"; either way the command fails with systemctl's own words.
    unit = f"tradeplat-test-{uuid.uuid4().hex[:8]}.service"
    started = tradectl(
        "worker", "start", "--systemd", "--unit", unit, env=service_env(settings), timeout=150
    )
    assert started.returncode == 1
    assert f"systemctl start {unit} failed (exit" in " ".join(started.stderr.split())


async def test_worker_stop_of_a_paused_worker_says_lost_not_stopped(
    platform: Platform, client: DistributedClient
) -> None:
    """A worker SIGSTOPped mid-drain lets its heartbeat expire: that is not a clean stop."""
    s = platform.settings
    worker = start_worker(platform, "paused", **CPU_ONLY)
    await wait_worker(client, "paused", {ServiceState.ONLINE})
    os.kill(worker.proc.pid, signal.SIGSTOP)
    try:
        stopped = await asyncio.to_thread(cli, s, "worker", "stop", "paused", "--timeout", "15")
        assert stopped.returncode == 1, (stopped.stdout, stopped.stderr)
        assert "lost, not stopped: paused" in " ".join(stopped.stderr.split())
        assert "stopped: paused" not in stopped.stdout
    finally:
        os.kill(worker.proc.pid, signal.SIGCONT)


async def test_a_second_worker_with_the_same_name_is_refused(
    platform: Platform, client: DistributedClient
) -> None:
    """Two workers named alike would share one heartbeat and hide each other's death."""
    first = start_worker(platform, "dup", **CPU_ONLY)
    await wait_worker(client, "dup", {ServiceState.ONLINE})
    second = start_worker(platform, "dup", **CPU_ONLY)
    assert await asyncio.to_thread(second.proc.wait, 30) == 2
    assert "another gpu-worker named 'dup' is alive" in second.log_text()
    # A worker restarted right after a crash is not refused by its predecessor's leftover key.
    os.kill(first.proc.pid, signal.SIGKILL)
    first.proc.wait(10)
    third = start_worker(platform, "dup", **CPU_ONLY)
    await wait_worker(client, "dup", {ServiceState.ONLINE}, pid=third.proc.pid)
