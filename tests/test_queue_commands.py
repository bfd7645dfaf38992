"""``tradectl queue status|dead`` against the real RabbitMQ and Redis, with real services."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time

import aio_pika

from shared.client import DistributedClient
from shared.messages import TaskState
from shared.settings import Settings
from shared.topology import Topology
from tests.conftest import Platform, service_env, tradectl, wait_for_consumers
from tests.test_pipeline import wait_state

WAIT_S = 60
#: Probe-only workers start in a second; they keep their code if the checkout moves meanwhile.
LIGHT = {
    "TP_WORKER_PRELOAD": '["services.gpu_worker.tasks.probe"]',
    "TP_WORKER_CODE_UPDATE": "ignore",
}
UNDECODABLE = b"\xff\xfe not json at all"


def rabbitmq_queues(namespace: str) -> dict[str, tuple[int, int]]:
    """``name -> (messages, consumers)`` of the namespace's queues, as rabbitmqctl lists them."""
    listed = subprocess.run(
        ["rabbitmqctl", "list_queues", "-q", "--no-table-headers", "name", "messages", "consumers"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    wanted = set(Topology(namespace).all_queues)
    rows = (line.split() for line in listed.splitlines())
    return {r[0]: (int(r[1]), int(r[2])) for r in rows if len(r) == 3 and r[0] in wanted}


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return tradectl(*args, env=service_env(settings), timeout=60)


async def dead_count(client: DistributedClient) -> int:
    """Ready messages in the dead-letter queue, read on a fresh channel.

    Not on the client's publishing channel: aio-pika's robust channel answers a repeated
    declare of a queue it knows from its cache, with the count of the first declare.
    """
    name = Topology(client.settings.namespace).dead_letter_queue
    async with await client.broker.connection.channel() as channel:
        queue = await channel.declare_queue(name, passive=True)
        return queue.declaration_result.message_count


async def wait_dead_count(client: DistributedClient, n: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while (count := await dead_count(client)) != n:
        assert time.monotonic() < deadline, f"{count} dead letters, wanted {n}"
        await asyncio.sleep(0.1)


async def test_queue_status_equals_rabbitmq_counts_and_priorities(
    platform: Platform, client: DistributedClient
):
    await platform.start_all(**LIGHT, TP_WORKER_GPU_SLOTS="0")  # nobody consumes the gpu queue
    waiting = [await client.submit("probe", {"needs_gpu": True}, priority=p) for p in (1, 8, 1, 3)]
    for task in waiting:
        await wait_state(client, task.task_id, TaskState.QUEUED)
    await client.broker.declared.tasks.publish(aio_pika.Message(UNDECODABLE), "submit")
    await wait_dead_count(client, 1)
    done = await client.wait((await client.submit("probe", {})).task_id, timeout_s=WAIT_S)
    assert done.state is TaskState.COMPLETED  # the cpu queue is served

    shown = await asyncio.to_thread(cli, platform.settings, "queue", "status", "--json")
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    ours = {q["name"]: (q["messages"], q["consumers"]) for q in report["queues"]}
    assert ours == await asyncio.to_thread(rabbitmq_queues, platform.settings.namespace)
    t = Topology(platform.settings.namespace)
    assert ours[t.queue("gpu")] == (4, 0) and ours[t.queue("cpu")] == (0, 1)
    assert ours[t.queue("submit")] == (0, 1) and ours[t.dead_letter_queue] == (1, 0)
    assert list(ours) == t.all_queues
    tasks = report["tasks"]
    assert tasks["total"] == tasks["counted"] == 4
    assert [(p["priority"], p["tasks"]) for p in tasks["by_priority"]] == [(8, 1), (3, 1), (1, 2)]
    assert tasks["oldest_age_s"] >= 0 and report["dead_letters"] == 1

    table = await asyncio.to_thread(cli, platform.settings, "queue", "status")
    assert table.returncode == 0, table.stderr
    text = " ".join(table.stdout.split())
    assert t.queue("gpu") in text and "messages but no consumer" in text
    assert "queued tasks (Redis): 4" in text and "dead letters: 1" in text


async def test_queue_dead_lists_without_losing_and_requeues_one_message(
    platform: Platform, client: DistributedClient
):
    s = platform.settings
    t = Topology(s.namespace)
    # A scheduler with a 1 KiB limit dead-letters a larger (valid) submission.
    small = platform.start("scheduler", **LIGHT, TP_MAX_MESSAGE_BYTES="1024")
    platform.start("gpu_worker", **LIGHT, TP_WORKER_GPU_SLOTS="0", TP_RETRY_BASE_S="0.1")
    await wait_for_consumers(s, {t.queue("submit"): 1, t.queue("cpu"): 1})
    config = {"fail_with": "x" * 950, "fail_times": 1, "retryable": True}
    via_intake = s.model_copy(update={"direct_dispatch": False})  # through the 1 KiB scheduler
    async with DistributedClient(via_intake) as submitter:
        big = await submitter.submit("probe", config)
    await client.broker.declared.tasks.publish(aio_pika.Message(UNDECODABLE), "submit")
    await wait_dead_count(client, 2)

    # Listing twice shows the same two letters, with reasons and source, and loses none.
    listings = []
    for _ in range(2):
        shown = await asyncio.to_thread(cli, s, "queue", "dead", "--json")
        assert shown.returncode == 0, shown.stderr
        listings.append(json.loads(shown.stdout))
    assert listings[0] == listings[1]
    assert listings[0]["total"] == 2
    oversize, bad = listings[0]["letters"]
    assert oversize["id"] == big.task_id == oversize["task_id"]
    assert oversize["reason"].startswith("message of ")
    assert oversize["reason"].endswith("exceeds limit of 1024")
    # The id aio-pika gave the raw message; the same in both listings, so --requeue can use it.
    assert bad["id"] == bad["message_id"] and bad["task_id"] is None
    assert bad["reason"].startswith("undecodable body")
    assert {oversize["source_queue"], bad["source_queue"]} == {t.queue("submit")}
    assert oversize["requeues"] == bad["requeues"] == 0
    assert await dead_count(client) == 2
    dead_in_rabbit = await asyncio.to_thread(rabbitmq_queues, s.namespace)
    assert dead_in_rabbit[t.dead_letter_queue] == (2, 0)
    table = await asyncio.to_thread(cli, s, "queue", "dead")
    assert table.returncode == 0 and "2 of 2 dead letters" in table.stdout
    assert "undecodable body" in " ".join(table.stdout.split())

    # With the limit raised, the requeued submission runs (once retried, as configured).
    small.stop()
    platform.start("scheduler", **LIGHT, TP_REAPER_INTERVAL_S="0.2")
    requeued = await asyncio.to_thread(cli, s, "queue", "dead", "--requeue", big.task_id)
    assert requeued.returncode == 0, requeued.stderr
    assert f"requeued {big.task_id} to {t.queue('submit')}" in " ".join(requeued.stdout.split())
    record = await client.wait(big.task_id, timeout_s=WAIT_S)
    assert record.state is TaskState.COMPLETED and record.attempts == 2
    assert await dead_count(client) == 1

    # A bad message requeued is dead-lettered again with its reason: never lost.
    again = await asyncio.to_thread(cli, s, "queue", "dead", "--requeue", bad["id"], "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["queue"] == t.queue("submit")
    await wait_dead_count(client, 1)
    shown = await asyncio.to_thread(cli, s, "queue", "dead", "--json")
    (back,) = json.loads(shown.stdout)["letters"]
    assert back["id"] == bad["id"] and back["reason"] == bad["reason"]
    assert back["requeues"] == 1
    assert platform.procs["scheduler"].proc.poll() is None

    missing = await asyncio.to_thread(cli, s, "queue", "dead", "--requeue", "no-such-letter")
    assert missing.returncode == 4 and "no dead letter with id 'no-such-letter'" in missing.stderr
    assert await dead_count(client) == 1

    # A person who has read it drops it for good; then it is gone, and a second drop finds none.
    dropped = await asyncio.to_thread(cli, s, "queue", "dead", "--drop", bad["id"])
    assert dropped.returncode == 0, dropped.stderr
    assert f"dropped {bad['id']}" in dropped.stdout
    assert await dead_count(client) == 0
    twice = await asyncio.to_thread(cli, s, "queue", "dead", "--drop", bad["id"])
    assert twice.returncode == 4
