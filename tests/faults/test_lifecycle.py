"""Lifecycle faults through real processes: lost workers, cancel, retries, time limits, drain."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from shared.client import DistributedClient
from shared.messages import TaskState
from shared.topology import Topology
from tests.conftest import LIGHT_WORKER, Platform, service_env, tradectl, wait_for_consumers
from tests.test_pipeline import wait_state

WAIT_S = 90
#: Short leases so a lost worker is noticed in seconds: lease 2 s, reaper every 0.3 s.
FAST_LEASES = {"TP_LEASE_S": "2", "TP_REAPER_INTERVAL_S": "0.3"}
#: The same for workers that run probes only (probe-only preload: ready in about a second).
PROBE_LEASES = {**FAST_LEASES, **LIGHT_WORKER}


async def wait_progress(client: DistributedClient, task_id: str, at_least: float, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = await client.status(task_id)
        if record.progress is not None and record.progress >= at_least and record.child_pid:
            return record
        await asyncio.sleep(0.05)
    raise AssertionError(f"{task_id} never reached progress {at_least}")


def pid_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"  # a zombie is gone too
    except FileNotFoundError:
        return True


async def wait_pid_gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not pid_gone(pid):
        assert time.monotonic() < deadline, f"process {pid} still alive"
        await asyncio.sleep(0.05)


async def test_worker_sigkill_requeues_resumes_and_completes_once(
    platform: Platform, client: DistributedClient
):
    await platform.start_all(**PROBE_LEASES, TP_WORKER_GPU_SLOTS="0")
    task = await client.submit("probe", {"sleep_s": 6, "steps": 12})
    running = await wait_progress(client, task.task_id, 0.25)
    first = platform.procs["gpu_worker"]
    os.kill(first.proc.pid, signal.SIGKILL)
    first.proc.wait(10)
    killed_at = time.monotonic()
    await wait_pid_gone(running.child_pid)  # the task's child died with its worker

    requeued = await wait_state(client, task.task_id, TaskState.QUEUED, timeout=20)
    assert time.monotonic() - killed_at < 2 + 0.3 + 2  # lease + reaper interval + slack
    assert requeued.lost == 1
    platform.start("gpu_worker", **PROBE_LEASES, TP_WORKER_GPU_SLOTS="0", TP_WORKER_NAME="second")
    done = await client.wait(task.task_id, timeout_s=WAIT_S)
    assert done.state is TaskState.COMPLETED and done.worker == "second"
    assert done.attempts == 2
    assert done.result["metrics"]["resumed_from_step"] >= 3  # steps done before the kill kept
    history = await client.history(task.task_id)
    assert [h["to"] for h in history].count("completed") == 1
    reap = next(h for h in history if h["by"] == "reaper")
    assert reap["to"] == "queued" and "lost" in reap["reason"] and reap["attempt"] == 1


async def test_lost_max_attempts_times_fails_with_the_reason(
    platform: Platform, client: DistributedClient
):
    await platform.start_all(**PROBE_LEASES, TP_WORKER_GPU_SLOTS="0")
    task = await client.submit("probe", {"sleep_s": 60, "steps": 600}, max_attempts=2)
    for attempt in (1, 2):
        await wait_state(client, task.task_id, TaskState.RUNNING, timeout=20)
        worker = platform.procs["gpu_worker"]
        os.kill(worker.proc.pid, signal.SIGKILL)
        worker.proc.wait(10)
        if attempt == 1:
            await wait_state(client, task.task_id, TaskState.QUEUED, timeout=20)
            platform.start("gpu_worker", **PROBE_LEASES, TP_WORKER_GPU_SLOTS="0")
    record = await wait_state(client, task.task_id, TaskState.FAILED, timeout=20)
    assert record.error == "worker lost 2 times"
    assert record.attempts == 2
    # Never redelivered again: a fresh worker, consuming, finds nothing to run.
    platform.start("gpu_worker", **PROBE_LEASES, TP_WORKER_GPU_SLOTS="0")
    await wait_for_consumers(
        platform.settings, {Topology(platform.settings.namespace).queue("cpu"): 1}
    )
    await asyncio.sleep(1.5)
    assert (await client.status(task.task_id)).state is TaskState.FAILED


async def test_cancel_queued_never_runs(platform: Platform, client: DistributedClient):
    await platform.start_all(TP_WORKER_GPU_SLOTS="0", **LIGHT_WORKER)
    blocker = await client.submit("probe", {"sleep_s": 3, "steps": 3})
    await wait_state(client, blocker.task_id, TaskState.RUNNING)
    waiting = await client.submit("probe", {"sleep_s": 0.1})
    await wait_state(client, waiting.task_id, TaskState.QUEUED)
    result = await client.cancel(waiting.task_id)
    assert result.outcome == "cancelled"
    await client.wait(blocker.task_id, timeout_s=WAIT_S)
    await asyncio.sleep(1.0)  # the cancelled task's message was delivered and dropped
    record = await client.status(waiting.task_id)
    assert record.state is TaskState.CANCELLED and record.running_at is None
    assert "running" not in [h["to"] for h in await client.history(waiting.task_id)]


async def test_cancel_running_task_that_ignores_sigterm(
    platform: Platform, client: DistributedClient
):
    await platform.start_all(TP_CANCEL_GRACE_S="1", TP_WORKER_GPU_SLOTS="0", **LIGHT_WORKER)
    task = await client.submit("probe", {"sleep_s": 60, "steps": 600, "ignore_sigterm": True})
    running = await wait_progress(client, task.task_id, 0.001)
    started = time.monotonic()
    cli = await asyncio.to_thread(
        tradectl, "task", "cancel", task.task_id, env=service_env(platform.settings), timeout=60
    )
    elapsed = time.monotonic() - started
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert f"task {task.task_id} cancelled" in cli.stdout
    assert elapsed < 2 + 1.5  # grace 1 s; the CLI's own start-up is the rest
    record = await client.status(task.task_id)
    assert record.state is TaskState.CANCELLED
    await wait_pid_gone(running.child_pid, timeout=2)
    # The worker takes its next task.
    following = await client.submit_and_wait("probe", {}, timeout_s=WAIT_S)
    assert following.state is TaskState.COMPLETED
    # Cancelling a finished task says so and changes nothing.
    again = await asyncio.to_thread(
        tradectl, "task", "cancel", following.task_id, env=service_env(platform.settings)
    )
    assert again.returncode == 0 and "already completed; nothing changed" in again.stdout
    assert (await client.status(following.task_id)).state is TaskState.COMPLETED


async def test_cancel_latency_through_the_client(platform: Platform, client: DistributedClient):
    await platform.start_all(TP_CANCEL_GRACE_S="1", TP_WORKER_GPU_SLOTS="0", **LIGHT_WORKER)
    task = await client.submit("probe", {"sleep_s": 60, "steps": 600, "ignore_sigterm": True})
    await wait_progress(client, task.task_id, 0.001)
    started = time.monotonic()
    result = await client.cancel(task.task_id, wait_s=10)
    assert result.outcome == "cancelled"
    assert time.monotonic() - started < 2.0


async def test_cancel_just_after_start_is_not_lost(platform: Platform, client: DistributedClient):
    """A cancel that reaches a child still starting up must still ask it to stop (no waiting
    out the whole grace period for the SIGKILL)."""
    await platform.start_all(TP_CANCEL_GRACE_S="6", TP_WORKER_GPU_SLOTS="0", **LIGHT_WORKER)
    task = await client.submit("probe", {"sleep_s": 30, "steps": 300})
    await wait_state(client, task.task_id, TaskState.RUNNING)
    started = time.monotonic()
    result = await client.cancel(task.task_id, wait_s=20)
    assert result.outcome == "cancelled"
    assert time.monotonic() - started < 4  # well under the 6 s grace: SIGTERM was honoured


async def test_retryable_error_backs_off_and_succeeds_on_attempt_3(
    platform: Platform, client: DistributedClient
):
    await platform.start_all(TP_RETRY_BASE_S="0.4", TP_REAPER_INTERVAL_S="0.1", **LIGHT_WORKER)
    config = {"fail_with": "feed unreachable", "fail_times": 2, "retryable": True}
    record = await client.submit_and_wait("probe", config, max_attempts=3, timeout_s=WAIT_S)
    assert record.state is TaskState.COMPLETED and record.attempts == 3
    assert record.error is None and record.traceback is None  # earlier attempts' error cleared
    history = await client.history(record.task_id)
    retries = [h for h in history if h.get("reason", "").startswith("retrying in")]
    assert len(retries) == 2
    delays = [float(h.get("reason", "").split()[2]) for h in retries]
    assert 0.2 <= delays[0] <= 0.4 and 0.4 <= delays[1] <= 0.8, delays  # [d/2, d], d doubling
    runs = [h["ts"] for h in history if h["to"] == "running"]
    assert runs[1] - runs[0] >= delays[0] and runs[2] - runs[1] >= delays[1]
    assert "RetryableTaskError: feed unreachable" in retries[0]["reason"]


async def test_retryable_error_gives_up_and_plain_error_fails_at_once(
    platform: Platform, client: DistributedClient
):
    await platform.start_all(TP_RETRY_BASE_S="0.2", TP_REAPER_INTERVAL_S="0.1", **LIGHT_WORKER)
    always = {"fail_with": "feed unreachable", "retryable": True}
    exhausted = await client.submit_and_wait("probe", always, max_attempts=2, timeout_s=WAIT_S)
    assert exhausted.state is TaskState.FAILED and exhausted.attempts == 2
    assert exhausted.error.endswith("(gave up after 2 attempts)")
    plain = await client.submit_and_wait("probe", {"fail_with": "bad math"}, timeout_s=WAIT_S)
    assert plain.state is TaskState.FAILED and plain.attempts == 1
    assert plain.error == "RuntimeError: bad math"


async def test_time_limit_kills_and_fails(platform: Platform, client: DistributedClient):
    await platform.start_all(**LIGHT_WORKER)
    cli = await asyncio.to_thread(
        tradectl,
        "task",
        "submit",
        "probe",
        "--set",
        "sleep_s=30",
        "--set",
        "steps=30",
        "--time-limit",
        "1.5",
        "--wait",
        "--json",
        env=service_env(platform.settings),
        timeout=60,
    )
    assert cli.returncode == 1, cli.stderr
    import json

    record = json.loads(cli.stdout)
    assert record["state"] == "failed" and record["error"] == "timed out after 1.5 s"
    # Killed long before its 30 s of work (the first child also waits for the forkserver's
    # preload, a few seconds, before its limit starts counting).
    assert record["failed_at"] - record["running_at"] < 10


async def test_drain_lets_a_short_task_finish(platform: Platform, client: DistributedClient):
    await platform.start_all(TP_DRAIN_TIMEOUT_S="10", **LIGHT_WORKER)
    task = await client.submit("probe", {"sleep_s": 2, "steps": 4})
    await wait_state(client, task.task_id, TaskState.RUNNING)
    worker = platform.procs["gpu_worker"]
    worker.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(worker.proc.wait, 30) == 0
    record = await client.status(task.task_id)
    assert record.state is TaskState.COMPLETED and record.attempts == 1


async def test_drain_hands_a_long_task_back_with_its_checkpoint(
    platform: Platform, client: DistributedClient
):
    env = {"TP_DRAIN_TIMEOUT_S": "1", "TP_CANCEL_GRACE_S": "3", "TP_WORKER_GPU_SLOTS": "0"}
    env |= LIGHT_WORKER
    await platform.start_all(**env)
    task = await client.submit("probe", {"sleep_s": 8, "steps": 16})
    await wait_progress(client, task.task_id, 0.2)
    worker = platform.procs["gpu_worker"]
    worker.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(worker.proc.wait, 30) == 0
    handed = await client.status(task.task_id)
    assert handed.state is TaskState.QUEUED and handed.attempts == 0
    platform.start("gpu_worker", **env, TP_WORKER_NAME="next")
    done = await client.wait(task.task_id, timeout_s=WAIT_S)
    assert done.state is TaskState.COMPLETED and done.worker == "next" and done.attempts == 1
    assert done.result["metrics"]["resumed_from_step"] >= 3
    reasons = [h.get("reason", "") for h in await client.history(task.task_id)]
    assert "handed back by a draining worker (attempt not counted)" in reasons


async def test_status_shows_every_transition(platform: Platform, client: DistributedClient):
    await platform.start_all(TP_RETRY_BASE_S="0.2", TP_REAPER_INTERVAL_S="0.1", **LIGHT_WORKER)
    config = {"fail_with": "flaky", "fail_times": 1, "retryable": True}
    record = await client.submit_and_wait("probe", config, timeout_s=WAIT_S)
    cli = await asyncio.to_thread(
        tradectl, "task", "status", record.task_id, env=service_env(platform.settings)
    )
    assert cli.returncode == 0
    lines = cli.stdout
    assert "history" in lines and "retrying in" in lines and "test-worker" in lines
    as_json = await asyncio.to_thread(
        tradectl, "task", "status", record.task_id, "--json", env=service_env(platform.settings)
    )
    import json

    history = json.loads(as_json.stdout)["history"]
    assert [h["to"] for h in history] == [
        "submitted",
        "queued",
        "running",
        "queued",
        "queued",
        "running",
        "completed",
    ] or [h["to"] for h in history] == [
        "submitted",
        "queued",
        "running",
        "queued",
        "running",
        "completed",
    ]
    assert all({"ts", "to"} <= h.keys() for h in history)
    assert [h.get("attempt") for h in history if h["to"] == "running"] == [1, 2]


async def test_killed_training_resumes_from_its_checkpoint_on_another_worker(
    platform: Platform, client: DistributedClient
):
    """The acceptance case with a real training: epochs done before the kill are not redone."""
    await platform.start_all(**FAST_LEASES, TP_WORKER_CPU_SLOTS="0")
    config = {"dataset": "GOOG", "model": "mlp", "epochs": 40, "hidden_size": 32}
    task = await client.submit("train_model", config)
    await wait_progress(client, task.task_id, 0.2, timeout=120)
    first = platform.procs["gpu_worker"]
    os.kill(first.proc.pid, signal.SIGKILL)
    first.proc.wait(10)
    await wait_state(client, task.task_id, TaskState.QUEUED, timeout=20)
    platform.start("gpu_worker", **FAST_LEASES, TP_WORKER_CPU_SLOTS="0", TP_WORKER_NAME="second")
    done = await client.wait(task.task_id, timeout_s=180)
    assert done.state is TaskState.COMPLETED and done.worker == "second" and done.attempts == 2
    result = done.result
    assert result["resumed_from_epoch"] >= 8
    assert result["epochs_trained_this_attempt"] == 40 - result["resumed_from_epoch"]
    assert result["epochs_run"] == 40
    assert [h["to"] for h in await client.history(task.task_id)].count("completed") == 1
