"""End to end through real processes: scheduler and worker against the real RabbitMQ and Redis."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage

from shared.broker import REASON_HEADER
from shared.client import DistributedClient
from shared.errors import TaskNotFoundError
from shared.events import state_event
from shared.gitinfo import head_commit
from shared.messages import TaskEvent, TaskState, decode, encode
from shared.topology import Topology
from tests.conftest import LIGHT_WORKER, ROOT, Platform, service_env, tradectl

WAIT_S = 60


async def wait_state(client: DistributedClient, task_id: str, state: TaskState, timeout=30):
    """Poll until the task is in ``state`` (it may not exist yet when published raw)."""
    deadline = asyncio.get_running_loop().time() + timeout
    record = None
    while asyncio.get_running_loop().time() < deadline:
        try:
            record = await client.status(task_id)
        except TaskNotFoundError:
            record = None
        if record is not None and record.state is state:
            return record
        await asyncio.sleep(0.05)
    raise AssertionError(f"{task_id} is {record and record.state}, wanted {state}")


@pytest.mark.parametrize("direct", [True, False], ids=["direct-dispatch", "via-intake"])
async def test_lifecycle_timestamps_and_cli_result(
    platform: Platform, client: DistributedClient, direct: bool
):
    """Direct dispatch (the default): the client queues the task and publishes it to its lane;
    otherwise the scheduler's intake queues and routes it. Same lifecycle either way."""
    await platform.start_all(**LIGHT_WORKER)
    submitter = DistributedClient(
        client.settings.model_copy(update={"direct_dispatch": direct}), name="submitter"
    )
    async with submitter:
        submitted = await submitter.submit("probe", {"sleep_s": 0.3, "steps": 3})
    assert submitted.state is (TaskState.QUEUED if direct else TaskState.SUBMITTED)
    record = await client.wait(submitted.task_id, timeout_s=WAIT_S)

    assert record.state is TaskState.COMPLETED
    if direct:  # recorded and queued in one step
        assert record.submitted_at == record.queued_at < record.running_at < record.completed_at
    else:
        assert record.submitted_at < record.queued_at < record.running_at < record.completed_at
    assert record.result["metrics"]["steps"] == 3.0
    history = await client.history(record.task_id)
    assert [h["to"] for h in history] == ["submitted", "queued", "running", "completed"]
    assert history[1]["by"] == ("client" if direct else "scheduler")
    assert record.worker == "test-worker" and record.attempts == 1
    # Nothing is left for the dispatch pump: the confirmed publish crossed the listing off.
    assert not await client.store.dispatch_pending(record.task_id)

    cli = tradectl("task", "result", record.task_id, env=service_env(platform.settings), timeout=60)
    assert cli.returncode == 0, cli.stderr
    assert record.task_id in cli.stdout and "completed" in cli.stdout and "slept_s" in cli.stdout
    as_json = tradectl(
        "task", "result", record.task_id, "--json", env=service_env(platform.settings), timeout=60
    )
    assert json.loads(as_json.stdout)["state"] == "completed"


async def test_priority_9_runs_before_earlier_priority_1(
    platform: Platform, client: DistributedClient
):
    await platform.start_all(TP_WORKER_CPU_SLOTS="0", **LIGHT_WORKER)
    blocker = await client.submit("probe", {"sleep_s": 2.0, "steps": 4, "needs_gpu": True})
    await wait_state(client, blocker.task_id, TaskState.RUNNING)
    low = [
        (await client.submit("probe", {"sleep_s": 0.05, "needs_gpu": True}, priority=1)).task_id
        for _ in range(5)
    ]
    # Let the scheduler route all five before the urgent one is even submitted.
    for task_id in low:
        await wait_state(client, task_id, TaskState.QUEUED)
    urgent = await client.submit("probe", {"sleep_s": 0.05, "needs_gpu": True}, priority=9)
    records = [await client.wait(t, timeout_s=WAIT_S) for t in [urgent.task_id, *low]]

    assert all(r.state is TaskState.COMPLETED for r in records)
    started = sorted(records, key=lambda r: r.running_at)
    assert started[0].task_id == urgent.task_id, [r.priority for r in started]
    # The broker sees the worker's real prefetch: one per free GPU slot.
    assert consumer_prefetch(Topology(platform.settings.namespace).queue("gpu")) == [1]


def consumer_prefetch(queue: str) -> list[int]:
    """prefetch_count of each consumer on ``queue`` as RabbitMQ reports it."""
    out = subprocess.run(
        [
            "rabbitmqctl",
            "list_consumers",
            "-q",
            "--no-table-headers",
            "queue_name",
            "prefetch_count",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return [int(line.split()[1]) for line in out.splitlines() if line.split()[:1] == [queue]]


async def test_same_task_id_twice_is_one_task_one_run(
    platform: Platform, client: DistributedClient
):
    await platform.start_all(**LIGHT_WORKER)
    first = await client.submit("probe", {"sleep_s": 0.2}, task_id="dup-task-1")
    second = await client.submit("probe", {"sleep_s": 0.2}, task_id="dup-task-1")
    # The same submission also published twice straight to the intake queue.
    raw = json.dumps(
        {
            "task_id": "dup-task-1",
            "task_type": "probe",
            "config": {"sleep_s": 0.2},
            "priority": 5,
            "submitted_at": 1.0,
        }
    ).encode()
    for _ in range(2):
        await client.broker.declared.tasks.publish(aio_pika.Message(raw), "submit")
    record = await client.wait("dup-task-1", timeout_s=WAIT_S)
    await asyncio.sleep(1.0)  # give any duplicate delivery the time to (wrongly) run

    assert first.task_id == second.task_id == "dup-task-1"
    history = await client.history("dup-task-1")
    assert [h["to"] for h in history].count("running") == 1
    assert record.attempts == 1
    assert (await client.status("dup-task-1")).state is TaskState.COMPLETED
    key_twice = [
        await client.submit("probe", {}, idempotency_key="nightly-2026-11-29") for _ in range(2)
    ]
    assert key_twice[0].task_id == key_twice[1].task_id


async def test_bad_messages_are_dead_lettered_and_scheduler_keeps_serving(
    platform: Platform, client: DistributedClient
):
    await platform.start_all(**LIGHT_WORKER)
    tasks = client.broker.declared.tasks
    await tasks.publish(aio_pika.Message(b"\xff\xfe not json at all"), "submit")
    await tasks.publish(aio_pika.Message(json.dumps({"task_type": "probe"}).encode()), "submit")
    limit = client.settings.max_message_bytes  # the message size limit (TP_MAX_MESSAGE_BYTES)
    oversized = b'{"task_id": "big", "pad": "' + b"x" * limit + b'"}'
    await tasks.publish(aio_pika.Message(oversized), "submit")
    record = await client.wait((await client.submit("probe", {})).task_id, timeout_s=WAIT_S)
    assert record.state is TaskState.COMPLETED

    dead = await dead_letters(client, 3)
    by_reason = {m.headers[REASON_HEADER]: m for m in dead}
    reasons = sorted(by_reason)
    assert reasons[0].startswith("invalid TaskSubmission: task_id: Field required"), reasons
    assert reasons[1] == f"message of {len(oversized)} bytes exceeds limit of {limit}", reasons
    assert by_reason[reasons[1]].body == oversized  # kept whole in the dead-letter queue
    assert reasons[2].startswith("undecodable body"), reasons
    assert platform.procs["scheduler"].proc.poll() is None


async def dead_letters(client: DistributedClient, n: int, timeout: float = 10):
    queue = client.broker.declared.queues[Topology(client.settings.namespace).dead_letter_queue]
    found = []
    deadline = asyncio.get_running_loop().time() + timeout
    while len(found) < n and asyncio.get_running_loop().time() < deadline:
        message = await queue.get(fail=False)
        if message is None:
            await asyncio.sleep(0.1)
            continue
        await message.ack()
        found.append(message)
    assert len(found) == n, f"expected {n} dead letters, got {len(found)}"
    return found


async def test_unknown_type_or_invalid_config_from_raw_publish_fails_the_task(
    platform: Platform, client: DistributedClient
):
    await platform.start_all(**LIGHT_WORKER)
    tasks = client.broker.declared.tasks
    for task_id, task_type, config in [
        ("bad-type", "train_modle", {}),
        ("bad-cfg", "train_model", {"epochs": -3}),
    ]:
        body = json.dumps(
            {"task_id": task_id, "task_type": task_type, "config": config, "submitted_at": 1.0}
        ).encode()
        await tasks.publish(aio_pika.Message(body), "submit")
    # Published raw, so the record exists only once the scheduler has read the message.
    bad_type = await wait_state(client, "bad-type", TaskState.FAILED)
    bad_cfg = await wait_state(client, "bad-cfg", TaskState.FAILED)
    assert (
        bad_type.state is TaskState.FAILED and "unknown task type 'train_modle'" in bad_type.error
    )
    assert bad_cfg.state is TaskState.FAILED and "epochs" in bad_cfg.error


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["train_modle"], "unknown task type 'train_modle'"),
        (["train_model", "--set", "epochs=0"], "epochs"),
        (["train_model", "--set", "learning_rate=fast"], "learning_rate"),
        (["train_model", "--set", "dataset=prices.xlsx"], "dataset"),
    ],
)
async def test_cli_refuses_bad_input_and_queues_nothing(settings, client, args, needle):
    cli = tradectl("task", "submit", *args, env=service_env(settings), timeout=60)
    assert cli.returncode == 2, cli.stdout + cli.stderr
    assert needle in " ".join(cli.stderr.split())
    intake = client.broker.declared.queues[Topology(settings.namespace).queue("submit")]
    assert (
        await intake.channel.declare_queue(intake.name, passive=True)
    ).declaration_result.message_count == 0
    assert await client.list_tasks() == []


async def test_raising_task_fails_with_its_error(platform: Platform, client: DistributedClient):
    await platform.start_all(**LIGHT_WORKER)
    record = await client.wait(
        (await client.submit("probe", {"fail_with": "model exploded"})).task_id, timeout_s=WAIT_S
    )
    assert record.state is TaskState.FAILED
    assert record.error == "RuntimeError: model exploded"
    assert "probe.py" in record.traceback and record.traceback.endswith(
        "RuntimeError: model exploded\n"
    )


async def test_sigkilled_child_fails_and_worker_serves_next(
    platform: Platform, client: DistributedClient
):
    await platform.start_all(**LIGHT_WORKER)
    long = await client.submit("probe", {"sleep_s": 60, "steps": 600})
    running = await wait_state(client, long.task_id, TaskState.RUNNING)
    for _ in range(100):
        running = await client.status(long.task_id)
        if running.child_pid:
            break
        await asyncio.sleep(0.05)
    worker_pid = platform.procs["gpu_worker"].proc.pid
    assert running.child_pid and running.child_pid != worker_pid
    os.kill(running.child_pid, signal.SIGKILL)

    record = await client.wait(long.task_id, timeout_s=WAIT_S)
    assert record.state is TaskState.FAILED
    assert record.error == "child process died: killed by SIGKILL"
    following = await client.wait((await client.submit("probe", {})).task_id, timeout_s=WAIT_S)
    assert following.state is TaskState.COMPLETED
    assert platform.procs["gpu_worker"].proc.poll() is None


@pytest.mark.slow
async def test_cli_trains_on_goog_end_to_end_with_mlflow_run(platform: Platform):
    """The main job: tradectl submit --wait on GOOG daily through real processes."""
    await platform.start_all()
    cli = tradectl(
        "task",
        "submit",
        "train_model",
        "--config",
        "configs/train_goog.yaml",
        "--set",
        "epochs=3",
        "--wait",
        "--json",
        env=service_env(platform.settings),
        timeout=300,
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
    record = json.loads(cli.stdout)
    assert record["state"] == "completed"
    metrics = record["result"]["metrics"]
    for key in ("val_loss", "val_accuracy", "baseline_val_loss", "baseline_val_accuracy"):
        assert isinstance(metrics[key], float)
    assert (
        record["submitted_at"]
        <= record["queued_at"]  # one instant under direct dispatch
        < record["running_at"]
        < record["completed_at"]
        == record["finished_at"]
    )
    artifacts = platform.settings.tasks_dir / record["task_id"] / "artifacts"
    assert {p.name for p in artifacts.iterdir()} >= {"model.pt", "metrics.json", "loss_curve.png"}

    shown = subprocess.run(
        [sys.executable, "examples/show_mlflow_run.py", record["task_id"]],
        env=service_env(platform.settings),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    assert "FINISHED" in shown.stdout and "epochs=3" in shown.stdout and "val_loss=" in shown.stdout
    # Submitted without a commit: the worker records the commit of the code it runs.
    commit = head_commit(ROOT)
    assert commit is not None and record["result"]["git_commit"] == commit
    from mlflow.tracking import MlflowClient

    run = MlflowClient(platform.settings.tracking_uri).get_run(record["result"]["mlflow_run_id"])
    assert run.data.tags["mlflow.source.git.commit"] == commit


async def test_sync_client_and_failed_task_exit_code(platform: Platform):
    await platform.start_all(**LIGHT_WORKER)
    from shared.client import SyncClient

    def use_sync() -> tuple:
        with SyncClient(platform.settings) as sync:
            ok = sync.submit_and_wait("probe", {"steps": 2}, timeout_s=WAIT_S)
            bad = sync.submit_and_wait("probe", {"fail_with": "nope"}, timeout_s=WAIT_S)
            return ok, bad

    ok, bad = await asyncio.to_thread(use_sync)
    assert ok.state is TaskState.COMPLETED and bad.state is TaskState.FAILED
    cli = tradectl(
        "task",
        "submit",
        "probe",
        "--set",
        "fail_with=x",
        "--wait",
        env=service_env(platform.settings),
        timeout=120,
    )
    assert cli.returncode == 1 and "RuntimeError: x" in cli.stdout


async def test_the_result_is_pushed_to_the_waiting_client_in_the_terminal_event(
    platform: Platform, client: DistributedClient
):
    """The worker's completed event carries the record its outcome write left (same atomic
    step), so ``wait`` has the result without reading Redis; it equals the stored record."""
    await platform.start_all(**LIGHT_WORKER)
    task_id = "pushed-result-1"
    events = []
    async with client.subscribed(task_id) as queue:
        await client.submit("probe", {"steps": 2}, task_id=task_id)
        waited = await client.wait_on(queue, task_id, events.append)
    ended = [e for e in events if e.state.is_terminal]
    assert [e.state for e in ended] == [TaskState.COMPLETED], events
    assert ended[0].record is not None, ended
    stored = await client.status(task_id)
    assert waited == stored and waited.result["metrics"]["steps"] == 2.0, (waited, stored)


async def test_an_event_too_big_for_its_readers_goes_without_its_metrics_and_record(
    client: DistributedClient,
):
    """Every reader refuses a message over ``max_message_bytes``: such an event is sent lean."""
    limit = client.settings.max_message_bytes
    metrics = {f"m{i}": float(i) for i in range(limit // 10)}
    event = state_event(
        "big-event-1", TaskState.COMPLETED, metrics=metrics, record={"task_id": "big-event-1"}
    )
    assert len(encode(event)) > limit
    async with client.subscribed("big-event-1") as queue:
        # Events go without publisher confirms, so the publish returns before the broker has
        # routed it: wait for the delivery (a basic.get right away can find the queue empty).
        inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        await queue.consume(inbox.put, no_ack=True)
        await client.broker.publish_event(event)
        async with asyncio.timeout(10):
            message = await inbox.get()
    got = decode(message.body, TaskEvent, max_bytes=limit)
    assert got.state is TaskState.COMPLETED and got.metrics == {} and got.record is None


async def test_a_directly_dispatched_task_whose_publish_never_happened_runs_via_the_pump(
    platform: Platform, client: DistributedClient
):
    """A client that queued a task and died before publishing it (or whose publish failed):
    the scheduler's dispatch pump publishes it once the listing is due, and it runs once."""
    await platform.start_all(TP_REAPER_INTERVAL_S="0.5", **LIGHT_WORKER)
    submission = await client.prepare("probe", {"steps": 1}, task_id="orphan-1")
    created, record, due = await client.store.create_queued(
        submission, by="client", pump_after_s=1.0
    )
    assert created and record.state is TaskState.QUEUED and due is not None
    done = await client.wait("orphan-1", timeout_s=WAIT_S)
    assert done.state is TaskState.COMPLETED and done.attempts == 1
    assert done.running_at >= due  # not before the pump's turn
    assert not await client.store.dispatch_pending("orphan-1")


async def test_crossing_off_a_dispatch_listing_leaves_a_later_listing_alone(
    client: DistributedClient,
):
    submission = await client.prepare("probe", {}, task_id="listed-1")
    _, _, due = await client.store.create_queued(submission, by="client", pump_after_s=60)
    assert due is not None
    # Meanwhile the task ran, failed retryably and was listed again (another due time).
    await client.store.redis.zadd(client.store.keys.retries, {"listed-1": due + 5})
    assert not await client.store.unlist_dispatch("listed-1", due)
    assert await client.store.dispatch_pending("listed-1")
    await client.store.redis.zadd(client.store.keys.retries, {"listed-1": due})
    assert await client.store.unlist_dispatch("listed-1", due)
    assert not await client.store.dispatch_pending("listed-1")
    again, record, no_due = await client.store.create_queued(
        submission, by="client", pump_after_s=60
    )
    assert not again and no_due is None and record.task_id == "listed-1"  # idempotent
