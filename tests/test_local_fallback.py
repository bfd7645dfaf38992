"""The local fallback: the laptop runs a task itself when the desktop cannot, and never twice.

Real RabbitMQ and Redis; "down" is a port nothing listens on, or a private redis-server started
only afterwards; the scheduler and workers are real processes.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from services.gpu_worker.local import LocalRun
from shared.client import DistributedClient
from shared.local_runs import LocalJournal, LocalRecord, local_worker_name, publish_local_runs
from shared.messages import TaskState, TaskSubmission
from shared.settings import Settings
from shared.store import StatusStore
from shared.topology import Topology
from tests.conftest import ROOT, Platform, service_env, tradectl, wait_for_consumers
from tests.faults.test_outages import PrivateRedis, dump_logs
from tests.test_artifacts import s3_client, s3_settings, storage_env
from tests.test_worker_control import start_worker

__all__ = ["s3_settings"]  # a fixture, used by name

LIGHT_WORKER = {"TP_WORKER_PRELOAD": '["services.gpu_worker.tasks.probe"]'}
#: A small hyperopt submit (a search over train_model's epochs).
HYPEROPT = ["task", "submit", "hyperopt", "--set", "target=train_model", "--set", "n_trials=2"]
HYPEROPT += ["--set", "search_space={epochs: {type: int, low: 1, high: 2}}"]
HYPEROPT += ["--set", "metric=val_loss"]
#: train_model small enough for a few seconds on GOOG, with a smaller local profile.
TRAIN = {"feature_window": 8, "hidden_size": 16, "epochs": 4, "device": "cpu"}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ran_on(history: list[dict]) -> list[str]:
    """Who took the task to ``running``, once per run."""
    return [h["by"] for h in history if h["to"] == "running"]


def cli_env(settings: Settings, **extra: str) -> dict[str, str]:
    """tradectl's environment with the default TP_FALLBACK (local) and commit pinning off."""
    env = service_env(settings, TP_COMMIT_CHECK="off", TP_LOG_FORMAT="console", **extra)
    env.pop("TP_FALLBACK")
    return env


async def queued_task(store: StatusStore, task_id: str) -> TaskSubmission:
    """A probe task recorded and moved to ``queued``, as the scheduler leaves it."""
    sub = TaskSubmission(task_id=task_id, task_type="probe", config={}, submitted_at=time.time())
    assert await store.create(sub)
    moved = await store.transition(task_id, [TaskState.SUBMITTED], TaskState.QUEUED, by="test")
    assert moved.applied
    return sub


@pytest.mark.slow
async def test_broker_down_submit_wait_trains_on_goog_locally(
    settings: Settings, client: DistributedClient
):
    port = closed_port()
    env = cli_env(settings, TP_AMQP_URL=f"amqp://guest:guest@127.0.0.1:{port}/")
    # device auto: cuda when this machine has it, else the CPU, as on the desktop.
    sets = [f"{k}={v}" for k, v in TRAIN.items()] + ["device=auto", "local={epochs: 2}"]
    args = [a for kv in sets for a in ("--set", kv)]
    cli = tradectl("task", "submit", "train_model", *args, "--wait", env=env, timeout=180)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    expected = f"ran locally: broker unreachable at amqp://guest:***@127.0.0.1:{port}/"
    assert expected in cli.stdout, cli.stdout
    assert "val_accuracy" in cli.stdout and "completed" in cli.stdout, cli.stdout
    task_id = cli.stdout.split()[1]
    # Redis was reachable: the record is there, run once, by this machine, profile applied.
    record = await client.status(task_id)
    assert record.state is TaskState.COMPLETED and record.worker == local_worker_name()
    assert record.fallback_reason.startswith("broker unreachable at"), record
    assert record.config["epochs"] == 4 and "local" not in record.config, record.config
    assert record.result is not None
    assert record.result["epochs_run"] == 2, record.result
    assert record.result["ran_locally"]["profile"] == {"epochs": 2}
    assert record.result["dataset"]["name"] == "GOOG"
    assert record.result["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert ran_on(await client.history(task_id)) == [local_worker_name()]
    assert (settings.tasks_dir / task_id / "artifacts" / "model.pt").is_file()
    journal = LocalJournal(settings).load(task_id)
    assert journal is not None and journal.published and journal.state is TaskState.COMPLETED
    # Reading a task needs Redis only: status and logs work with the broker still down.
    status = tradectl("task", "status", task_id, env=env)
    assert status.returncode == 0 and "completed" in status.stdout, status.stderr
    logs = tradectl("task", "logs", task_id, env=env)
    assert logs.returncode == 0 and "started on local:" in logs.stdout, logs.stdout + logs.stderr


async def test_no_worker_online_runs_locally_and_a_late_worker_refuses_the_claim(
    settings: Settings, platform: Platform
):
    platform.start("scheduler")
    t = Topology(settings.namespace)
    await wait_for_consumers(settings, {t.queue("submit"): 1})
    reasons: list[str] = []
    async with DistributedClient(settings, fallback_local=True, start_timeout_s=1.5) as client:
        began = time.monotonic()
        record = await client.submit_and_wait(
            "probe", {"steps": 2, "sleep_s": 0.2}, on_local=reasons.append, timeout_s=60
        )
        took = time.monotonic() - began
        assert record.state is TaskState.COMPLETED and record.worker == local_worker_name()
        assert reasons == ["no cpu worker online; not started within 1.5 s"], reasons
        assert 1.5 <= took < 10, took
        # Its delivery is still in the cpu queue: a worker started now takes it and drops it.
        worker = start_worker(platform, "late-worker", **LIGHT_WORKER)
        deadline = time.monotonic() + 60
        while "claim_refused" not in worker.log_text():
            assert time.monotonic() < deadline, dump_logs(platform)
            await asyncio.sleep(0.2)
        refused = next(
            json.loads(line) for line in worker.log_text().splitlines() if "claim_refused" in line
        )
        assert refused["task_id"] == record.task_id and refused["state"] == "completed"
        history = await client.history(record.task_id)
        assert ran_on(history) == [local_worker_name()], history
        assert (await client.status(record.task_id)).state is TaskState.COMPLETED


def test_worker_and_local_fallback_claim_at_once_exactly_one_wins_100_times(settings: Settings):
    """Two threads, each with its own event loop and Redis connection, meet at a barrier before
    each claim: the desktop worker's claim and the local run's claim race for real."""
    rounds = 100
    ids = [f"race-{i}" for i in range(rounds)]
    barrier = threading.Barrier(2, timeout=30)
    results: dict[str, list[bool]] = {"worker": [], "local": []}

    async def prepare() -> list[TaskSubmission]:
        store = StatusStore(settings)
        await store.start()
        try:
            return [await queued_task(store, task_id) for task_id in ids]
        finally:
            await store.stop()

    submissions = asyncio.run(prepare())

    def party(side: str) -> None:
        async def claims() -> None:
            store = StatusStore(settings)
            await store.start()
            try:
                for sub in submissions:
                    if side == "worker":  # exactly the worker's claim (Lane._handle)
                        barrier.wait()
                        claim = await store.claim(sub.task_id, "desktop-1", lease_s=60)
                        results[side].append(claim.applied)
                    else:
                        run = LocalRun(settings, sub, reason="race test", store=store, broker=None)
                        barrier.wait()
                        results[side].append(await run.claim())
            finally:
                await store.stop()

        asyncio.run(claims())

    threads = [threading.Thread(target=party, args=(side,)) for side in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert all(len(r) == rounds for r in results.values()), results
    winners = [w + loc for w, loc in zip(results["worker"], results["local"], strict=True)]
    assert winners == [1] * rounds, winners
    print(f"wins: worker {sum(results['worker'])}, local {sum(results['local'])} of {rounds}")

    async def check() -> None:
        store = StatusStore(settings)
        await store.start()
        try:
            for sub, worker_won in zip(submissions, results["worker"], strict=True):
                record = await store.get(sub.task_id)
                want = "desktop-1" if worker_won else local_worker_name()
                assert record.state is TaskState.RUNNING and record.worker == want, record
                assert ran_on(await store.history(sub.task_id)) == [want]
        finally:
            await store.stop()

    asyncio.run(check())


async def test_wait_timeout_runs_a_queued_task_locally_but_never_one_running_on_the_desktop(
    settings: Settings, platform: Platform
):
    # One cpu slot, no gpu slot: a long probe occupies the worker, so the next one stays queued.
    await platform.start_all(TP_WORKER_GPU_SLOTS="0", TP_WORKER_CPU_SLOTS="1", **LIGHT_WORKER)
    async with DistributedClient(settings, fallback_local=True, start_timeout_s=0.5) as client:
        long = asyncio.create_task(
            client.submit_and_wait("probe", {"steps": 8, "sleep_s": 6}, timeout_s=2.5)
        )
        await asyncio.sleep(1.0)
        # Queued behind it: the worker is online, so only the wait's timeout sends it here.
        reasons: list[str] = []
        queued = await client.submit_and_wait(
            "probe", {"steps": 1, "sleep_s": 0.1}, timeout_s=2, on_local=reasons.append
        )
        assert queued.worker == local_worker_name(), queued
        assert reasons == ["still queued after 2 s"], reasons
        # The long one was running on the desktop when its wait timed out: not started here.
        with pytest.raises(TimeoutError):
            await long
        running = await client.list_tasks(state=TaskState.RUNNING)
        assert [r.worker for r in running] == [settings.worker_name], running
        long_id = running[0].task_id
        assert LocalJournal(settings).load(long_id) is None
        final = await client.wait(long_id, timeout_s=30)
        assert final.state is TaskState.COMPLETED and final.worker == settings.worker_name
        assert ran_on(await client.history(long_id)) == [settings.worker_name]
        # The worker later drops the locally-run task's delivery: one run in its history.
        deadline = time.monotonic() + 30
        while ran_on(await client.history(queued.task_id)) != [local_worker_name()] or (
            "claim_refused" not in platform.procs["gpu_worker"].log_text()
        ):
            assert time.monotonic() < deadline, dump_logs(platform)
            await asyncio.sleep(0.2)


@pytest.mark.slow
async def test_redis_down_at_submit_runs_locally_and_sync_local_publishes_it(
    settings: Settings, tmp_path: Path
):
    server = PrivateRedis(tmp_path / "redis", persist=False)  # not started yet: Redis is down
    private = settings.model_copy(update={"redis_url": server.url})
    env = cli_env(private)
    cli = tradectl("task", "submit", "probe", "--set", "steps=2", "--set", "print_lines=3", env=env)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert f"ran locally: Redis unreachable at {server.url}" in cli.stdout, cli.stdout
    task_id = cli.stdout.split()[1]
    assert "run `tradectl task sync-local` once Redis is reachable" in cli.stderr, cli.stderr
    journal = LocalJournal(private).load(task_id)
    assert journal is not None and journal.state is TaskState.COMPLETED, (cli.stdout, task_id)
    assert not journal.in_redis and not journal.published
    # Redis still down: nothing to publish to (exit 3), nothing lost; status reads the journal.
    down = tradectl("task", "sync-local", env=env)
    assert down.returncode == 3 and "Redis unreachable" in down.stderr, down.stderr
    offline = tradectl("task", "status", task_id[:8], env=env)
    assert offline.returncode == 0 and "completed" in offline.stdout, offline.stdout
    assert "journal of local runs" in offline.stderr, offline.stderr
    time.sleep(1)  # the publish comes visibly later than the run
    server.start()
    try:
        synced = tradectl("task", "sync-local", env=env)
        assert synced.returncode == 0, synced.stdout + synced.stderr
        assert task_id in synced.stdout and "published" in synced.stdout, synced.stdout
        status = tradectl("task", "status", task_id, "--json", env=env)
        assert status.returncode == 0, status.stderr
        shown = json.loads(status.stdout)
        assert shown["state"] == "completed" and shown["worker"] == local_worker_name()
        # The run's own times (this machine's clock), not the time of the publish.
        assert shown["running_at"] == pytest.approx(journal.started_at, abs=0.01)
        assert shown["completed_at"] == pytest.approx(journal.finished_at, abs=0.01)
        assert shown["submitted_at"] <= shown["running_at"] < shown["history"][-1]["ts"] - 0.5
        assert shown["result"]["metrics"]["steps"] == 2
        assert ran_on(shown["history"]) == [local_worker_name()]
        logs = tradectl("task", "logs", task_id, env=env)
        assert logs.stdout.count("probe line") == 3, logs.stdout
        # Again: nothing left to do, nothing doubled.
        again = tradectl("task", "sync-local", env=env)
        assert again.returncode == 0 and "nothing to publish" in again.stdout, again.stdout
    finally:
        server.kill()


async def test_cancel_stops_a_local_run(settings: Settings):
    """The broker is unreachable for this laptop, so its local run sends no events; a cancel
    from another client (as `tradectl task cancel`) still stops the child within the lease
    renewal, records `cancelled`, and the cancelling client learns it within a second."""
    fast = settings.model_copy(update={"lease_s": 3.0, "cancel_grace_s": 1.0})
    offline = fast.model_copy(update={"amqp_url": f"amqp://guest:guest@127.0.0.1:{closed_port()}/"})
    async with (
        DistributedClient(offline, fallback_local=True) as client,
        DistributedClient(fast) as other,
    ):
        assert client.unreachable is not None and "broker unreachable" in client.unreachable
        run = asyncio.create_task(
            client.submit_and_wait("probe", {"steps": 60, "sleep_s": 30}, task_id="cancel-me")
        )
        deadline = time.monotonic() + 30
        while True:
            with_record = await other.list_tasks(state=TaskState.RUNNING)
            if with_record:
                break
            assert time.monotonic() < deadline and not run.done()
            await asyncio.sleep(0.1)
        began = time.monotonic()
        outcome = await other.cancel("cancel-me", wait_s=15)
        record = await run
        assert outcome.outcome == "cancelled" and record.state is TaskState.CANCELLED, record
        assert time.monotonic() - began < 5
        assert record.worker == local_worker_name()
        # From the laptop itself, whose broker is unreachable: only Redis is needed.
        run = asyncio.create_task(
            client.submit_and_wait("probe", {"steps": 60, "sleep_s": 30}, task_id="cancel-me-2")
        )
        while not await other.list_tasks(state=TaskState.RUNNING):
            assert not run.done()
            await asyncio.sleep(0.1)
        env = cli_env(offline, TP_CANCEL_GRACE_S="1", TP_LEASE_S="3")
        cancel = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "shared.cli",
            "task",
            "cancel",
            "cancel-me-2",
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(cancel.communicate(), 30)
        assert cancel.returncode == 0, (out, err)
        assert b"cancel-me-2 cancelled" in out, out
        assert (await run).state is TaskState.CANCELLED


def test_bad_local_profile_and_runs_that_may_not_run_locally_are_refused(
    settings: Settings, tmp_path: Path
):
    dead_redis = f"redis://127.0.0.1:{closed_port()}/0"
    dead_amqp = f"amqp://guest:guest@127.0.0.1:{closed_port()}/"
    env = cli_env(settings, TP_AMQP_URL=dead_amqp)
    bad = tradectl("task", "submit", "probe", "--set", "local={steps: 0}", env=env)
    assert bad.returncode == 2 and "local.steps" in bad.stderr, bad.stderr
    wrong = tradectl("task", "submit", "probe", "--set", "steps=0", "--fallback", "never", env=env)
    assert wrong.returncode == 2 and "steps" in wrong.stderr, wrong.stderr  # before connecting
    notmap = tradectl("task", "submit", "probe", "--set", "local=5", env=env)
    assert notmap.returncode == 2 and "local: must be a mapping" in notmap.stderr, notmap.stderr
    never = tradectl("task", "submit", "probe", "--fallback", "never", "--wait", env=env)
    assert never.returncode == 3 and "broker unreachable" in never.stderr, never.stderr
    # ask without a terminal: not run, says why, exit 3.
    ask = tradectl("task", "submit", "probe", "--fallback", "ask", env=env)
    assert ask.returncode == 3 and "no terminal to ask on" in ask.stderr, ask.stderr
    no_redis = cli_env(settings, TP_REDIS_URL=dead_redis)
    held = tradectl("task", "submit", "probe", "--at", "+1h", env=no_redis)
    assert held.returncode == 3 and "--at need Redis" in held.stderr, held.stderr
    study = tradectl(
        *HYPEROPT,
        env=no_redis,
    )
    assert study.returncode == 3 and "keeps its study in Redis" in study.stderr, study.stderr
    assert not (settings.data_dir / "local").exists() or not os.listdir(settings.data_dir / "local")


@pytest.mark.parametrize(
    "signals",
    [[signal.SIGINT], [signal.SIGINT, signal.SIGINT], [signal.SIGTERM], [signal.SIGHUP]],
    ids=["ctrl-c", "ctrl-c-twice", "sigterm", "sighup"],
)
def test_ctrl_c_or_sigterm_cancels_a_local_run_and_its_child(
    settings: Settings, signals: list[signal.Signals]
):
    env = cli_env(settings, TP_AMQP_URL=f"amqp://guest:guest@127.0.0.1:{closed_port()}/")
    env["TP_CANCEL_GRACE_S"] = "2"
    args = ["task", "submit", "probe", "--set", "steps=30", "--set", "sleep_s=30"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "shared.cli", *args, "--wait", "--json"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    journal = LocalJournal(settings)
    deadline = time.monotonic() + 30
    while not (journal.root.is_dir() and list(journal.root.glob("*.log"))):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    time.sleep(1.5)  # into the task's steps
    for sig in signals:
        proc.send_signal(sig)
        time.sleep(0.3)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, out + err
    shown = json.loads(out)
    assert shown["state"] == "cancelled" and shown["worker"] == local_worker_name(), shown
    pid = int(shown["progress_message"].rsplit("pid ", 1)[1])
    assert not Path(f"/proc/{pid}").exists(), f"task child {pid} outlived the cancel"
    record = journal.load(shown["task_id"])
    assert record is not None and record.state is TaskState.CANCELLED and record.published


async def test_a_killed_local_run_is_handed_back_by_sync_local_and_the_desktop_runs_it(
    settings: Settings, platform: Platform, client: DistributedClient
):
    """The laptop's tradectl is SIGKILLed mid-run (broker down, Redis up): its child dies with
    it, the task stays `running` under the local claim's long lease, and `task sync-local`
    hands it back; the desktop's reaper requeues it and a worker runs it."""
    await platform.start_all(TP_REAPER_INTERVAL_S="0.5", **LIGHT_WORKER)
    env = cli_env(settings, TP_AMQP_URL=f"amqp://guest:guest@127.0.0.1:{closed_port()}/")
    # 0.5 s steps: killed just after its first one, with more than 5 s of its run to go.
    args = ["task", "submit", "probe", "--set", "steps=12", "--set", "sleep_s=6"]
    args += ["--task-id", "killed-1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "shared.cli", *args, "--json"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not (running := await client.list_tasks(state=TaskState.RUNNING)):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        await asyncio.sleep(0.1)
    task_id = running[0].task_id
    while "pid " not in ((await client.status(task_id)).progress_message or ""):
        # its first step reports the child's pid (a second or more on a loaded machine)
        assert time.monotonic() < deadline + 30 and proc.poll() is None, proc.communicate()
        await asyncio.sleep(0.1)
    child_pid = int((await client.status(task_id)).progress_message.rsplit("pid ", 1)[1])
    proc.kill()
    proc.communicate(timeout=10)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child_pid}").exists():
        assert time.monotonic() < deadline, f"task child {child_pid} outlived its tradectl"
        await asyncio.sleep(0.1)
    stuck = await client.status(task_id)
    assert stuck.state is TaskState.RUNNING and stuck.worker == local_worker_name()
    assert stuck.lease_until is not None and stuck.lease_until - time.time() > 3600
    synced = tradectl("task", "sync-local", env=env)
    assert synced.returncode == 0, synced.stdout + synced.stderr
    assert "handed back to the desktop" in synced.stdout, synced.stdout
    # Handed back: this laptop, now without Redis, must not run it again beside the desktop.
    offline = cli_env(settings, TP_REDIS_URL=f"redis://127.0.0.1:{closed_port()}/0")
    again_here = tradectl(*args, env=offline)
    assert again_here.returncode == 2 and "handed back" in again_here.stderr, again_here.stderr
    final = await client.wait(task_id, timeout_s=90)
    assert final.state is TaskState.COMPLETED and final.worker == settings.worker_name, final
    assert ran_on(await client.history(task_id)) == [local_worker_name(), settings.worker_name]
    again = tradectl("task", "sync-local", env=env)
    assert again.returncode == 0 and "nothing to publish" in again.stdout, again.stdout


@pytest.mark.slow
async def test_artifacts_of_a_run_without_redis_go_to_s3_and_sync_local_reports_them(
    s3_settings: Settings, tmp_path: Path
):
    server = PrivateRedis(tmp_path / "redis", persist=False)  # Redis down; S3 (moto) up
    private = s3_settings.model_copy(update={"redis_url": server.url})
    env = cli_env(private, **storage_env(private))
    sets = [f"{k}={v}" for k, v in TRAIN.items()] + ["epochs=1"]
    args = [a for kv in sets for a in ("--set", kv)]
    cli = tradectl("task", "submit", "train_model", *args, "--json", env=env, timeout=180)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    task_id = json.loads(cli.stdout)["task_id"]
    stored = {
        o["Key"].split(f"tasks/{task_id}/", 1)[1]
        for o in s3_client(private).list_objects_v2(
            Bucket=private.s3_bucket, Prefix=f"tasks/{task_id}/"
        )["Contents"]
    }
    assert {"manifest.json", "artifacts/model.pt", "artifacts/metrics.json"} <= stored, stored
    server.start()
    try:
        synced = tradectl("task", "sync-local", env=env)
        assert synced.returncode == 0, synced.stdout + synced.stderr
        location = f"s3://{private.s3_bucket}/tasks/{task_id}/"
        assert location in synced.stdout, synced.stdout
        shown = tradectl("artifacts", "status", task_id, "--json", env=env)
        assert shown.returncode == 0, shown.stderr
        status = json.loads(shown.stdout)
        status = status[0] if isinstance(status, list) else status
        assert status["state"] == "synced" and status["location"] == location, status
        # The laptop's own copy, fetched back from the bucket, verified.
        fetched = tradectl("task", "result", task_id, "--download", str(tmp_path / "r"), env=env)
        assert fetched.returncode == 0, fetched.stdout + fetched.stderr
        assert (tmp_path / "r" / "artifacts" / "model.pt").is_file()
    finally:
        server.kill()


@pytest.mark.slow
def test_the_python_example_trains_locally_once_when_the_broker_is_down(settings: Settings):
    env = cli_env(settings, TP_AMQP_URL=f"amqp://guest:guest@127.0.0.1:{closed_port()}/")
    ran = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "submit_with_fallback.py")],
        cwd=settings.data_dir.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "completed locally (broker unreachable at" in ran.stdout, ran.stdout
    runs = LocalJournal(settings).all()  # the child's import of the script started nothing
    assert [r.state for r in runs] == [TaskState.COMPLETED], runs
    assert runs[0].result is not None and runs[0].result["epochs_run"] == 5


async def test_an_expired_local_claim_is_failed_not_rerun_and_its_end_can_still_be_published(
    settings: Settings, client: DistributedClient
):
    """A laptop that finished offline and never came back in time: the reaper fails the task
    (a requeue could run it a second time) and the laptop's sync-local still records its end."""
    store = client.store
    sub = await queued_task(store, "offline-end")
    run = LocalRun(settings, sub, reason="test: broker unreachable", store=store, broker=None)
    claim = await store.claim(
        sub.task_id, run.name, lease_s=0.2, expected=(TaskState.QUEUED,), fields={}
    )
    assert claim.applied
    await asyncio.sleep(0.3)
    outcome, _ = await store.reap(sub.task_id, default_max_attempts=3)
    assert outcome == "failed"
    failed = await client.status(sub.task_id)
    assert failed.state is TaskState.FAILED and "not rerun on the desktop" in (failed.error or "")
    # The journal of that laptop holds the completed run: sync-local records it over the failure.
    record = LocalRecord(
        submission=sub,
        reason="test: broker unreachable",
        worker=run.name,
        state=TaskState.COMPLETED,
        attempt=claim.attempts,
        in_redis=True,
        logs_in_redis=True,
        started_at=time.time() - 5,
        finished_at=time.time() - 1,
        result={"metrics": {"steps": 1}},
        end_fields={"result": json.dumps({"metrics": {"steps": 1}}), "error": ""},
    )
    LocalJournal(settings).save(record)
    published = await publish_local_runs(settings, store, None)
    assert [p.outcome for p in published] == ["published"], published
    done = await client.status(sub.task_id)
    assert done.state is TaskState.COMPLETED and done.result == {"metrics": {"steps": 1}}
    assert ran_on(await client.history(sub.task_id)) == [run.name]
    # Redis restarted empty meanwhile: the record is made again from the journal, not stuck.
    lost = record.model_copy(update={"published": False})
    lost.submission = sub.model_copy(update={"task_id": "lost-in-redis"})
    LocalJournal(settings).save(lost)
    again = await publish_local_runs(settings, store, None, task_id="lost-in-redis")
    assert [p.outcome for p in again] == ["published"], again
    assert (await client.status("lost-in-redis")).state is TaskState.COMPLETED
    # Cancelled while the laptop was cut off, then reaped: the cancel stands, reported once.
    cancelled = await queued_task(store, "offline-cancel")
    claim = await store.claim(cancelled.task_id, run.name, lease_s=0.2, fields={})
    assert (await client.cancel(cancelled.task_id, wait_s=None)).outcome == "cancelling"
    await asyncio.sleep(0.3)
    assert (await store.reap(cancelled.task_id, default_max_attempts=3))[0] == "cancelled"
    LocalJournal(settings).save(
        record.model_copy(
            update={"submission": cancelled, "attempt": claim.attempts, "published": False}
        )
    )
    kept = await publish_local_runs(settings, store, None, task_id="offline-cancel")
    assert [p.outcome for p in kept] == [
        "not recorded: the task was cancelled meanwhile (the result stays here)"
    ], kept
    assert (await client.status(cancelled.task_id)).state is TaskState.CANCELLED
    assert await publish_local_runs(settings, store, None, task_id="offline-cancel") == []


def test_one_idempotency_key_runs_once_on_a_laptop_without_redis(settings: Settings):
    env = cli_env(settings, TP_REDIS_URL=f"redis://127.0.0.1:{closed_port()}/0")
    args = ["task", "submit", "probe", "--set", "steps=1", "--idempotency-key", "nightly-1"]
    first = tradectl(*args, "--json", env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    second = tradectl(*args, "--json", env=env)  # the same key again: the same task, not rerun
    assert second.returncode == 0, second.stdout + second.stderr
    assert json.loads(first.stdout)["task_id"] == json.loads(second.stdout)["task_id"]
    assert json.loads(first.stdout)["running_at"] == json.loads(second.stdout)["running_at"]
    assert "running locally" not in second.stderr, second.stderr
    other = tradectl(
        "task", "submit", "probe", "--set", "steps=2", "--idempotency-key", "nightly-1", env=env
    )
    assert other.returncode == 2 and "different probe task" in other.stderr, other.stderr
    # Two at once: one runs, the other is refused (exit 2), the journal holds one run.
    cmd = [sys.executable, "-m", "shared.cli", "task", "submit", "probe"]
    cmd += ["--set", "steps=3", "--set", "sleep_s=3", "--idempotency-key", "nightly-2"]
    both = [
        subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = sorted((p.wait(60), *p.communicate()) for p in both)
    assert [code for code, _, _ in results] == [0, 2], results
    loser = results[1][2]
    assert "running on this machine" in loser or "another process" in loser, loser
    runs = [r for r in LocalJournal(settings).all() if r.submission.idempotency_key == "nightly-2"]
    assert [r.state for r in runs] == [TaskState.COMPLETED], runs


def test_hyperopt_with_parallel_trials_is_not_run_locally_without_the_broker(settings: Settings):
    env = cli_env(settings, TP_AMQP_URL=f"amqp://guest:guest@127.0.0.1:{closed_port()}/")
    hyperopt = [*HYPEROPT, "--set", "parallel=2"]
    refused = tradectl(*hyperopt, env=env)
    assert refused.returncode == 3 and "parallel > 1" in refused.stderr, refused.stderr


def test_a_journal_that_cannot_be_written_runs_nothing_and_blocks_nothing(settings: Settings):
    env = cli_env(settings, TP_REDIS_URL=f"redis://127.0.0.1:{closed_port()}/0")
    args = ["task", "submit", "probe", "--set", "steps=1", "--task-id", "no-room"]

    def no_room() -> None:  # files may be created but not written: a full disk, as it looks
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))

    full = subprocess.run(
        [sys.executable, "-m", "shared.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=no_room,
    )
    assert full.returncode == 2 and "cannot be kept in" in full.stderr, full.stderr
    assert "Traceback" not in full.stderr and "running locally" not in full.stderr, full.stderr
    assert not LocalJournal(settings).path("no-room").exists()
    again = tradectl(*args, env=env)  # room again: the id is not blocked
    assert again.returncode == 0, again.stdout + again.stderr


def test_a_second_submit_while_the_offline_run_goes_on_is_refused(settings: Settings):
    offline = cli_env(settings, TP_REDIS_URL=f"redis://127.0.0.1:{closed_port()}/0")
    args = ["task", "submit", "probe", "--set", "steps=10", "--set", "sleep_s=10"]
    args += ["--idempotency-key", "report-7"]
    first = subprocess.Popen(
        [sys.executable, "-m", "shared.cli", *args],
        cwd=ROOT,
        env=offline,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        journal = LocalJournal(settings)
        deadline = time.monotonic() + 30
        while not any(r.state is TaskState.RUNNING for r in journal.all()):
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.1)
        # Redis is back for this one: the desktop would run it beside the laptop's run.
        online = cli_env(settings)
        second = tradectl(*args, "--fallback", "never", env=online)
        assert second.returncode == 2 and "running on this machine" in second.stderr, second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=30)
    assert first.returncode == 1 and "cancelled" in out, out + err
