"""Failure paths through real processes: outages, signals, poison messages, odd inputs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import aio_pika
import pytest

from shared.broker import REASON_HEADER, SOURCE_QUEUE_HEADER
from shared.client import DistributedClient
from shared.errors import IdempotencyConflictError
from shared.messages import TaskState
from shared.settings import Settings
from shared.topology import Topology
from tests.conftest import LIGHT_WORKER, Platform, ServiceProcess, service_env, tradectl
from tests.netproxy import TcpProxy
from tests.test_pipeline import dead_letters, wait_state
from tests.test_service_lifecycle import free_port

WAIT_S = 60


async def test_wait_outlives_quiet_periods(platform: Platform, client: DistributedClient):
    """No event for longer than the re-check interval must not end the wait."""
    await platform.start_all(**LIGHT_WORKER)
    client.recheck_s = 0.2
    record = await client.submit_and_wait("probe", {"sleep_s": 1.5}, timeout_s=WAIT_S)
    assert record.state is TaskState.COMPLETED


@pytest.mark.parametrize("idle_child", [False, True], ids=["fresh-child", "prepared-child"])
async def test_task_that_cannot_start_fails_instead_of_hanging(
    platform: Platform, client: DistributedClient, idle_child: bool
):
    """Its folders cannot be made: by a fresh child, or by an idle one during the claim."""
    await platform.start_all(**LIGHT_WORKER)
    if idle_child:
        warm = await client.submit_and_wait("probe", {}, timeout_s=WAIT_S)
        assert warm.state is TaskState.COMPLETED
    task_dir = platform.settings.tasks_dir / "blocked-dir-1"
    task_dir.parent.mkdir(parents=True, exist_ok=True)
    task_dir.write_text("a file where the task folder should go")
    record = await client.submit_and_wait("probe", {}, task_id="blocked-dir-1", timeout_s=WAIT_S)
    assert record.state is TaskState.FAILED
    assert record.error.startswith("worker could not start the task: NotADirectoryError")
    following = await client.submit_and_wait("probe", {}, timeout_s=WAIT_S)
    assert following.state is TaskState.COMPLETED


async def test_group_signal_hands_task_back_and_next_worker_finishes_it(
    platform: Platform, client: DistributedClient
):
    """SIGTERM to the worker's whole process group (systemd's stop, Ctrl-C's SIGINT) reaches the
    worker only: the task is handed back, not failed or half-completed.

    The signalled worker has the default preload (torch and the rest) on purpose: its forkserver
    must shrug off the group signal with everything a production worker loads; the next one only
    finishes the probe. 8 s in 0.1 s steps: the signal lands at about step 0 and the 1 s drain
    ends long before the task could; the next worker resumes from the checkpoint, so its run is
    the rest of the 8 s only."""
    await platform.start_all(TP_DRAIN_TIMEOUT_S="1", TP_CANCEL_GRACE_S="2")
    task = await client.submit("probe", {"sleep_s": 8, "steps": 80})
    await wait_state(client, task.task_id, TaskState.RUNNING)
    worker = platform.procs["gpu_worker"]
    os.killpg(worker.proc.pid, signal.SIGINT)
    assert worker.proc.wait(30) == 0, worker.log_text()[-2000:]

    record = await client.status(task.task_id)
    assert record.state is TaskState.QUEUED, record
    assert record.attempts == 0 and record.error is None
    platform.start("gpu_worker", **LIGHT_WORKER)
    done = await client.wait(task.task_id, timeout_s=WAIT_S)
    assert done.state is TaskState.COMPLETED and done.attempts == 1
    assert done.result["metrics"]["steps"] == 80.0
    transitions = [h["to"] for h in await client.history(task.task_id)]
    assert transitions == ["submitted", "queued", "running", "queued", "running", "completed"]


async def test_sigterm_to_the_child_alone_fails_the_task(
    platform: Platform, client: DistributedClient
):
    await platform.start_all()
    task = await client.submit("probe", {"sleep_s": 30, "steps": 300})
    await wait_state(client, task.task_id, TaskState.RUNNING)
    for _ in range(200):  # progress means the task's own code, with its handlers, is running
        record = await client.status(task.task_id)
        if record.child_pid and record.progress:
            break
        await asyncio.sleep(0.05)
    os.kill(record.child_pid, signal.SIGTERM)
    record = await client.wait(task.task_id, timeout_s=WAIT_S)
    assert record.state is TaskState.FAILED
    assert record.error == "stopped by SIGTERM before it finished"


async def test_work_message_without_a_record_is_dead_lettered(
    platform: Platform, client: DistributedClient
):
    await platform.start_all(**LIGHT_WORKER)
    body = json.dumps({"task_id": "ghost-1", "task_type": "probe", "submitted_at": 1.0}).encode()
    await client.broker.declared.tasks.publish(aio_pika.Message(body), "cpu")
    [dead] = await dead_letters(client, 1)
    assert dead.headers[REASON_HEADER] == "no task record for 'ghost-1'"
    assert dead.headers[SOURCE_QUEUE_HEADER] == Topology(client.settings.namespace).queue("cpu")


async def test_resubmitting_an_id_with_another_spec_is_refused(settings, client):
    await client.submit("probe", {"sleep_s": 1}, task_id="same-id")
    await client.submit("probe", {"sleep_s": 1}, task_id="same-id")  # the same spec is fine
    with pytest.raises(IdempotencyConflictError, match="already exists"):
        await client.submit("probe", {"sleep_s": 2}, task_id="same-id")
    cli = tradectl(
        "task",
        "submit",
        "probe",
        "--task-id",
        "same-id",
        "--set",
        "steps=3",
        env=service_env(settings),
        timeout=60,
    )
    assert cli.returncode == 2 and "already exists" in cli.stderr


def test_non_finite_values_are_refused_on_the_wire():
    from pydantic import ValidationError

    from shared.messages import TaskSubmission

    with pytest.raises(ValidationError, match="timeout_s"):
        TaskSubmission(task_id="a", task_type="probe", submitted_at=1, timeout_s=float("inf"))


async def test_broker_blip_mid_task_loses_nothing(platform: Platform, client: DistributedClient):
    """The worker's AMQP connection drops while a task runs: the task still completes, and the
    worker consumes again once the broker is back."""
    proxy = TcpProxy("127.0.0.1", 5672)
    try:
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
        await platform.start_all(TP_AMQP_URL=url, **LIGHT_WORKER)
        task = await client.submit("probe", {"sleep_s": 8, "steps": 16})
        await wait_state(client, task.task_id, TaskState.RUNNING)
        proxy.cut()
        await asyncio.sleep(3)
        proxy.restore()
        record = await client.wait(task.task_id, timeout_s=WAIT_S)
        assert record.state is TaskState.COMPLETED, record
        after = await client.submit_and_wait("probe", {}, timeout_s=WAIT_S)
        assert after.state is TaskState.COMPLETED
    finally:
        platform.stop_all()  # while the proxy still forwards: a stop through a dead one hangs
        proxy.close()


def start_private_redis(tmp: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp),
        ],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if (
            subprocess.run(
                ["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True
            ).stdout.strip()
            == "PONG"
        ):
            return proc
        time.sleep(0.05)
    raise TimeoutError("private redis did not start")


async def test_scheduler_waits_out_a_redis_outage_without_spinning(settings: Settings, tmp_path):
    port = free_port()
    redis_proc = start_private_redis(tmp_path, port)
    private = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{port}/0"})
    scheduler = ServiceProcess("scheduler", service_env(private), tmp_path / "scheduler.log")
    try:
        async with DistributedClient(private) as client:
            t = Topology(private.namespace)
            await wait_for_consumer(private, t.queue("submit"))
            redis_proc.kill()
            redis_proc.wait()
            body = json.dumps(
                {"task_id": "during-outage", "task_type": "probe", "submitted_at": 1.0}
            ).encode()
            await client.broker.declared.tasks.publish(aio_pika.Message(body), "submit")
            await asyncio.sleep(3)
            deferred = scheduler.log_text().count('"delivery_deferred"')
            assert 1 <= deferred <= 6, deferred  # about one a second, not thousands
            redis_proc = start_private_redis(tmp_path, port)
            record = await wait_until_recorded(client, "during-outage")
            assert record.state is TaskState.QUEUED
            assert scheduler.proc.poll() is None
    finally:
        scheduler.stop()
        redis_proc.kill()
        redis_proc.wait()


async def wait_for_consumer(s: Settings, queue: str) -> None:
    from tests.conftest import wait_for_consumers

    await wait_for_consumers(s, {queue: 1})


async def wait_until_recorded(client: DistributedClient, task_id: str, timeout: float = 30):
    from shared.errors import StoreError

    deadline = time.monotonic() + timeout
    while True:
        try:
            return await client.status(task_id)
        except StoreError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def test_periodic_stops_even_when_a_duty_swallows_the_cancel() -> None:
    """A duty that loses a cancellation (as 3.11's wait_for can) must not hang the stop."""
    from shared.periodic import Periodic

    swallowed = 0
    in_duty = asyncio.Event()

    async def duty() -> None:
        nonlocal swallowed
        in_duty.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            swallowed += 1  # lost, as a racing wait_for would lose it

    periodic = Periodic("swallow", 30.0, duty)
    periodic.start()
    await in_duty.wait()
    await asyncio.wait_for(periodic.stop(), 5)  # one cancel lost, the next one ends it
    assert swallowed == 1
