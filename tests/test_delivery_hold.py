"""A running task's delivery stays unacked until the task ends, or until the hold bound.

The end of a short task acks its delivery, and the broker's next push is the next task (no
consumer cancel and re-consume per task). A task that runs past ``TP_WORKER_ACK_HOLD_S`` has its
delivery acked then, with the lane's consumer cancelled first, so the broker's
``consumer_timeout`` never closes the channel under a long training and nothing skips ahead of
a higher-priority task. Unacked counts come from ``rabbitmqctl list_queues``.
"""

from __future__ import annotations

import asyncio
import subprocess
import time

from shared.client import DistributedClient
from shared.messages import TaskState
from shared.settings import Settings
from shared.topology import Topology
from tests.conftest import LIGHT_WORKER, Platform
from tests.faults.test_outages import consumer_counts
from tests.test_pipeline import wait_state

WAIT_S = 60


def unacked(queue: str) -> int:
    """Deliveries of ``queue`` handed out and not yet acked (rabbitmqctl)."""
    out = subprocess.run(
        [
            "rabbitmqctl",
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "messages_unacknowledged",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    counts = dict(line.split() for line in out.splitlines() if line.strip())
    return int(counts.get(queue, "0"))


async def test_a_short_task_holds_its_delivery_until_it_ends(
    settings: Settings, platform: Platform, client: DistributedClient
) -> None:
    gpu = Topology(settings.namespace).queue("gpu")
    await platform.start_all(TP_WORKER_ACK_HOLD_S="60", TP_WORKER_CPU_SLOTS="0", **LIGHT_WORKER)
    task = await client.submit("probe", {"sleep_s": 4, "steps": 4, "needs_gpu": True})
    await wait_state(client, task.task_id, TaskState.RUNNING)
    held = await asyncio.to_thread(unacked, gpu)
    counts = await consumer_counts(settings, [gpu])
    assert held == 1, f"{held} unacked deliveries on {gpu} while its task runs"
    assert counts == {gpu: 1}, counts  # still consuming: prefetch 1 holds the next task back
    record = await client.wait(task.task_id, timeout_s=WAIT_S)
    assert record.state is TaskState.COMPLETED, record
    assert await asyncio.to_thread(unacked, gpu) == 0
    assert "delivery_released" not in platform.procs["gpu_worker"].log_text()


async def test_a_task_past_the_hold_bound_is_acked_with_its_consumer_cancelled_first(
    settings: Settings, platform: Platform, client: DistributedClient
) -> None:
    gpu = Topology(settings.namespace).queue("gpu")
    await platform.start_all(TP_WORKER_ACK_HOLD_S="1", TP_WORKER_CPU_SLOTS="0", **LIGHT_WORKER)
    task = await client.submit("probe", {"sleep_s": 8, "steps": 8, "needs_gpu": True})
    await wait_state(client, task.task_id, TaskState.RUNNING)
    deadline = time.monotonic() + 6
    while "delivery_released" not in platform.procs["gpu_worker"].log_text():
        assert time.monotonic() < deadline, platform.procs["gpu_worker"].log_text()[-2000:]
        await asyncio.sleep(0.2)
    assert (await client.status(task.task_id)).state is TaskState.RUNNING
    assert await asyncio.to_thread(unacked, gpu) == 0
    assert await consumer_counts(settings, [gpu]) == {gpu: 0}  # the slot is busy: not consuming
    # A task queued meanwhile waits in the queue (not inside the worker) and runs next.
    second = await client.submit("probe", {"sleep_s": 0.1, "needs_gpu": True})
    for t in (task, second):
        assert (await client.wait(t.task_id, timeout_s=WAIT_S)).state is TaskState.COMPLETED
    assert await consumer_counts(settings, [gpu]) == {gpu: 1}  # consuming again
    assert await asyncio.to_thread(unacked, gpu) == 0
