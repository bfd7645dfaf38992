"""A broker reconnect while a full lane holds its running tasks' deliveries.

A lane whose slots are all busy keeps consuming (prefetch = slots, counted by the held
deliveries). When the worker's connection drops, RabbitMQ requeues the held deliveries, and the
robust channel restores the consumer with the same prefetch: nothing counts the running tasks any
more, so the broker pushes queued tasks to the full lane. Handing each back at once made a loop
(found by a breaker: over 10,000 requeues in ~10 s and the worker at ~55% CPU until a running
task ended); the lane now stops consuming until a slot frees, then hands the delivery back.
"""

from __future__ import annotations

import asyncio
import os
import time

import aio_pika

from shared.client import DistributedClient
from shared.messages import TaskState
from shared.settings import Settings
from shared.topology import Topology
from tests.conftest import Platform, ServiceProcess, service_env, wait_for_consumers
from tests.netproxy import TcpProxy
from tests.test_pipeline import wait_state


async def queue_state(s: Settings, name: str) -> tuple[int, int]:
    """``(messages ready, consumers)`` of a queue, by a passive declare."""
    connection = await aio_pika.connect(s.amqp_url)
    async with connection:
        channel = await connection.channel()
        result = (await channel.declare_queue(name, passive=True)).declaration_result
        return result.message_count, result.consumer_count


#: Probe-only workers start in about a second (no torch import).
LIGHT_WORKER = {"TP_WORKER_PRELOAD": '["services.gpu_worker.tasks.probe"]'}


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_a_full_lane_does_not_spin_on_redeliveries_after_a_broker_reconnect(
    settings: Settings, platform: Platform, client: DistributedClient
) -> None:
    proxy = TcpProxy("127.0.0.1", 5672)
    try:
        topology = Topology(settings.namespace)
        platform.start("scheduler")
        env = service_env(
            settings,
            TP_WORKER_CPU_SLOTS="2",
            TP_WORKER_GPU_SLOTS="0",
            TP_WORKER_ACK_HOLD_S="60",
            **LIGHT_WORKER,
        )
        env["TP_AMQP_URL"] = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
        worker = ServiceProcess("gpu_worker", env, platform.tmp / "gpu_worker.log")
        platform.procs["gpu_worker"] = worker
        await wait_for_consumers(settings, {topology.queue("cpu"): 1, topology.queue("submit"): 1})
        long = [await client.submit("probe", {"sleep_s": 40, "steps": 40}) for _ in range(2)]
        short = [await client.submit("probe", {"sleep_s": 0.1}) for _ in range(4)]
        for task in long:
            await wait_state(client, task.task_id, TaskState.RUNNING)
        proxy.cut()
        await asyncio.sleep(2)
        proxy.restore()
        # Back on the broker, the full lane stopped consuming: its held deliveries (2) and the
        # short tasks (4) wait in the queue, with no consumer.
        deadline = time.monotonic() + 30
        while await queue_state(settings, topology.queue("cpu")) != (6, 0):
            assert time.monotonic() < deadline, await queue_state(settings, topology.queue("cpu"))
            await asyncio.sleep(0.2)
        before, t0 = _cpu_s(worker.proc.pid), time.monotonic()
        await asyncio.sleep(3)
        busy = (_cpu_s(worker.proc.pid) - before) / (time.monotonic() - t0)
        for task in long:
            assert (await client.status(task.task_id)).state is TaskState.RUNNING
        for task in short:  # still waiting for a slot
            assert (await client.status(task.task_id)).state is TaskState.QUEUED
        assert busy < 0.2, f"worker at {busy:.0%} CPU while its lane is full (redelivery loop)"
        assert await queue_state(settings, topology.queue("cpu")) == (6, 0)
        for task in long:  # free the slots: the lane consumes again and runs the rest
            await client.cancel(task.task_id)
        for task in short:
            record = await client.wait(task.task_id, timeout_s=60)
            assert record.state is TaskState.COMPLETED, record
        for task in [*long, *short]:
            runs = [h for h in await client.history(task.task_id) if h["to"] == "running"]
            assert len(runs) == 1, runs
    finally:
        proxy.close()
