"""health-monitor against real processes: heartbeats, offline detection, alerts, /healthz, /metrics.

The monitor runs as ``python -m services.health_monitor`` with short heartbeats (0.5 s, TTL 2 s)
and a 0.5 s pass; workers and the scheduler as plain processes through the ``platform`` fixture.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.moto_server import free_port
from shared.client import DistributedClient
from shared.messages import TaskState
from shared.settings import Settings
from tests.conftest import LIGHT_WORKER, Platform, ServiceProcess
from tests.gitrepos import Repos, git
from tests.netproxy import TcpProxy
from tests.test_pipeline import wait_state

pytestmark = pytest.mark.slow

TTL_S = 2.0
FAST = {
    "TP_HEARTBEAT_INTERVAL_S": "0.5",
    "TP_HEARTBEAT_TTL_S": str(TTL_S),
    "TP_HEALTH_INTERVAL_S": "0.5",
    "TP_LEASE_S": "6",
    **LIGHT_WORKER,  # workers run probes only here; the other services ignore it
}


class Monitor:
    """The health-monitor process and an HTTP client to it."""

    def __init__(self, platform: Platform, **env: str) -> None:
        self.port = free_port()
        self.proc: ServiceProcess = platform.start(
            "health_monitor", TP_HEALTH_PORT=str(self.port), **FAST, **env
        )
        self.http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}", timeout=5)

    async def ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if (await self.http.get("/api/snapshot")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)
        raise AssertionError(f"monitor not ready:\n{self.proc.log_text()[-3000:]}")

    async def get(self, path: str) -> Any:
        response = await self.http.get(path)
        assert response.status_code == 200, (path, response.status_code, response.text)
        return response.json()

    async def worker_state(self, name: str) -> str | None:
        for w in await self.get("/api/workers"):
            if w["heartbeat"]["name"] == name:
                return str(w["state"])
        return None

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Samples of /metrics, parsed by prometheus_client's own text parser."""
        text = (await self.http.get("/metrics")).text
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }


@pytest.fixture
async def monitor(platform: Platform) -> AsyncIterator[Monitor]:
    m = Monitor(platform)
    await m.ready()
    yield m
    await m.http.aclose()


class AlertListener:
    """Collects ``health.alert.*`` events from the events exchange."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.alerts: list[dict[str, Any]] = []

    async def __aenter__(self) -> AlertListener:
        self.connection = await aio_pika.connect(self.settings.amqp_url)
        channel = await self.connection.channel()
        exchange = await channel.get_exchange(f"{self.settings.namespace}.events")
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, "health.alert.#")
        await queue.consume(self._on_message, no_ack=True)
        return self

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.alerts.append(json.loads(message.body))

    async def __aexit__(self, *exc: object) -> None:
        await self.connection.close()

    async def wait_for(self, kind: str, resolved: bool = False, timeout: float = 15) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for alert in self.alerts:
                if alert["kind"] == kind and alert["resolved"] is resolved:
                    return alert
            await asyncio.sleep(0.1)
        raise AssertionError(f"no {kind} alert (resolved={resolved}): {self.alerts}")


async def until(predicate: Any, timeout: float, step: float = 0.05) -> float:
    """Await ``predicate()`` until truthy; return the seconds it took."""
    started = time.monotonic()
    while not await predicate():
        assert time.monotonic() - started < timeout, "condition not met in time"
        await asyncio.sleep(step)
    return time.monotonic() - started


async def test_sigkilled_worker_goes_offline_alerts_503_then_back_online(
    platform: Platform, settings: Settings, monitor: Monitor
) -> None:
    await platform.start_all(**FAST)
    name = settings.worker_name
    await until(lambda: _is(monitor.worker_state(name), "online"), 30)
    health = await monitor.http.get("/healthz")
    assert health.status_code == 200, health.text
    worker = await monitor.get("/api/workers")
    assert worker[0]["heartbeat"]["worker"]["gpu"]["error"].startswith("no GPU")
    assert worker[0]["heartbeat"]["worker"]["slots"] == {"gpu": 1, "cpu": 1}

    async with AlertListener(settings) as listener:
        worker_proc = platform.procs["gpu_worker"].proc
        killed_at = time.monotonic()
        os.kill(worker_proc.pid, signal.SIGKILL)
        worker_proc.wait(10)
        await until(lambda: _is(monitor.worker_state(name), "offline"), TTL_S + 5)
        offline_after = time.monotonic() - killed_at
        assert offline_after <= TTL_S + 1, f"offline shown {offline_after:.2f} s after the kill"

        alert = await listener.wait_for("worker_offline")
        assert name in alert["subject"]
        health = await monitor.http.get("/healthz")
        assert health.status_code == 503
        assert any(name in p and "offline" in p for p in health.json()["problems"])
        metrics = await monitor.metrics()
        assert metrics[("tradeplat_worker_online", (("worker", name),))] == 0

        platform.start("gpu_worker", **FAST)
        await until(lambda: _is(monitor.worker_state(name), "online"), 60)
        await listener.wait_for("worker_offline", resolved=True)
    await until(lambda: _status(monitor, "/healthz", 200), 10)


async def test_busy_and_cleanly_stopped_worker_states(
    platform: Platform, settings: Settings, monitor: Monitor, client: DistributedClient
) -> None:
    await platform.start_all(TP_WORKER_GPU_SLOTS="0", **FAST)
    name = settings.worker_name
    task = await client.submit("probe", {"sleep_s": 4, "steps": 4})
    await until(lambda: _is(monitor.worker_state(name), "busy"), 20)
    workers = await monitor.get("/api/workers")
    assert [t["task_id"] for t in workers[0]["heartbeat"]["worker"]["running"]] == [task.task_id]
    snapshot = await monitor.get("/api/snapshot")
    assert [t["task_id"] for t in snapshot["active"]] == [task.task_id]
    await wait_state(client, task.task_id, TaskState.COMPLETED, timeout=30)

    assert platform.procs["gpu_worker"].stop() == 0  # SIGTERM: a clean, drained stop
    await until(lambda: _is(monitor.worker_state(name), "offline"), 5)
    await asyncio.sleep(1.5)  # a few passes: a clean stop raises nothing
    assert (await monitor.http.get("/healthz")).status_code == 200
    assert await monitor.get("/api/alerts") == []


async def test_queue_without_consumer_alerts_and_depth_equals_rabbitmq(
    platform: Platform, settings: Settings, monitor: Monitor, client: DistributedClient
) -> None:
    via_intake = settings.model_copy(update={"direct_dispatch": False})
    async with AlertListener(settings) as listener, DistributedClient(via_intake) as submitter:
        # No scheduler: submissions wait in the intake queue with nobody to consume them.
        for _ in range(3):
            await submitter.submit("probe", {"sleep_s": 0})
        alert = await listener.wait_for("queue_without_consumer")
        assert alert["subject"] == f"{settings.namespace}.tasks.submit"
        health = await monitor.http.get("/healthz")
        assert health.status_code == 503
        assert "has no consumer" in " ".join(health.json()["problems"])

        ours = await monitor.metrics()
        theirs = rabbitmq_depths(settings.namespace)
        for queue, messages in theirs.items():
            assert ours[("tradeplat_queue_messages", (("queue", queue),))] == messages, queue
        assert theirs[f"{settings.namespace}.tasks.submit"] == 3

        await platform.start_all(**FAST)
        await listener.wait_for("queue_without_consumer", resolved=True, timeout=30)


async def test_metrics_parse_and_count_the_tasks_that_ran(
    platform: Platform, settings: Settings, monitor: Monitor, client: DistributedClient
) -> None:
    await platform.start_all(**FAST)
    done = [await client.submit("probe", {"sleep_s": 0.2, "steps": 2}) for _ in range(3)]
    bad = await client.submit("probe", {"sleep_s": 0, "fail_with": "boom"})
    for task in done:
        await wait_state(client, task.task_id, TaskState.COMPLETED, timeout=60)
    await wait_state(client, bad.task_id, TaskState.FAILED, timeout=60)

    async def counted() -> bool:  # both: a pass may have run between the last two ends
        m = await monitor.metrics()
        return (
            m.get(("tradeplat_tasks_total", (("state", "completed"), ("task", "probe")))) == 3
            and ("tradeplat_tasks_total", (("state", "failed"), ("task", "probe"))) in m
        )

    await until(counted, 10)
    m = await monitor.metrics()
    assert m[("tradeplat_tasks_total", (("state", "failed"), ("task", "probe")))] == 1
    assert m[("tradeplat_task_runtime_seconds_count", (("task", "probe"),))] == 4
    assert m[("tradeplat_task_runtime_seconds_sum", (("task", "probe"),))] >= 3 * 0.2
    assert m[("tradeplat_tasks_in_state", (("state", "completed"),))] == 3
    assert m[("tradeplat_tasks_in_state", (("state", "failed"),))] == 1
    assert m[("tradeplat_workers_online", ())] == 1
    recent = (await monitor.get("/api/snapshot"))["recent"]
    assert {t["task_id"] for t in recent} == {t.task_id for t in [*done, bad]}


async def test_dead_letter_growth_alerts(
    platform: Platform, settings: Settings, monitor: Monitor
) -> None:
    await platform.start_all(**FAST)
    async with AlertListener(settings) as listener:
        connection = await aio_pika.connect(settings.amqp_url)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.get_exchange(f"{settings.namespace}.tasks")
            await exchange.publish(aio_pika.Message(b"not json"), routing_key="submit")
        alert = await listener.wait_for("dead_letters_growing")
        assert "grew by 1" in alert["message"]
        # A bad message is the sender's problem: listed as active, but the desktop is healthy.
        active = await monitor.get("/api/alerts?active=true")
        assert [a["kind"] for a in active] == ["dead_letters_growing"]
        assert (await monitor.http.get("/healthz")).status_code == 200


async def test_sigterm_ends_open_event_streams_and_exits(
    platform: Platform, monitor: Monitor
) -> None:
    """An open dashboard must not keep a stopping monitor alive (systemd would SIGKILL it)."""
    url = f"http://127.0.0.1:{monitor.port}/api/stream"
    async with httpx.AsyncClient(timeout=None) as http, http.stream("GET", url) as stream:
        lines = stream.aiter_lines()
        while "event: snapshot" not in await anext(lines):
            pass
        stopped_at = time.monotonic()
        proc = platform.procs["health_monitor"].proc
        proc.terminate()
        code = await asyncio.to_thread(proc.wait, 15)
        assert code == 0
        assert time.monotonic() - stopped_at < 5


@pytest.mark.usefixtures("isolated_git")
async def test_git_sync_problem_alerts_and_resolves(
    platform: Platform, settings: Settings, monitor: Monitor, repos: Repos
) -> None:
    repos.commit(repos.desktop, "strategy.py", "FAST = 7  # desktop experiment\n")
    repos.commit(repos.laptop, "strategy.py", "FAST = 8\n", push=True)
    async with AlertListener(settings) as listener:
        platform.start(
            "git_sync", TP_CODE_DIR=str(repos.desktop), TP_GIT_SYNC_INTERVAL_S="0.5", **FAST
        )
        alert = await listener.wait_for("sync_failed", timeout=30)
        assert alert["subject"] == f"git:{settings.worker_name}"
        assert "diverged" in alert["message"]
        assert (await monitor.http.get("/healthz")).status_code == 503
        sync = await monitor.get("/api/sync")
        assert sync["git"][0]["state"] == "diverged"
        # The person resolves it on the desktop; the next check clears the alert.
        git(repos.desktop, "reset", "-q", "--hard", "origin/main")
        await listener.wait_for("sync_failed", resolved=True, timeout=30)


async def _is(value: Any, expected: str) -> bool:
    return await value == expected


async def _status(monitor: Monitor, path: str, code: int) -> bool:
    return (await monitor.http.get(path)).status_code == code


def rabbitmq_depths(namespace: str) -> dict[str, int]:
    """``rabbitmqctl list_queues``: messages per queue of the namespace, as the broker counts."""
    out = subprocess.run(
        ["rabbitmqctl", "list_queues", "-q", "--no-table-headers", "name", "messages"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    depths = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].startswith(f"{namespace}."):
            depths[parts[0]] = int(parts[1])
    return depths


async def test_monitor_outlives_a_broker_outage_and_says_so(
    platform: Platform, settings: Settings
) -> None:
    """RabbitMQ cut off (a proxy in between): 503 naming it, then healthy again by itself."""
    proxy = TcpProxy("127.0.0.1", 5672)
    try:
        monitor = Monitor(platform, TP_AMQP_URL=f"amqp://guest:guest@127.0.0.1:{proxy.port}/")
        await monitor.ready()
        await until(lambda: _status(monitor, "/healthz", 200), 10)
        proxy.cut()

        async def broker_named() -> bool:
            r = await monitor.http.get("/healthz")
            return r.status_code == 503 and "RabbitMQ unreachable" in " ".join(r.json()["problems"])

        await until(broker_named, 15)
        proxy.restore()
        await until(lambda: _status(monitor, "/healthz", 200), 60)
        before = (await monitor.get("/api/snapshot"))["ts"]
        await asyncio.sleep(1.5)
        assert (await monitor.get("/api/snapshot"))["ts"] > before  # passes go on
        await monitor.http.aclose()
    finally:
        proxy.close()


async def test_restarted_monitor_neither_repeats_nor_forgets_an_alert(
    platform: Platform, settings: Settings
) -> None:
    await platform.start_all(**FAST)
    monitor = Monitor(platform)
    await monitor.ready()
    name = settings.worker_name
    await until(lambda: _is(monitor.worker_state(name), "online"), 30)
    async with AlertListener(settings) as listener:
        worker = platform.procs["gpu_worker"].proc
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(10)
        await listener.wait_for("worker_offline")
        monitor.proc.proc.kill()
        monitor.proc.proc.wait(10)
        await monitor.http.aclose()

        monitor = Monitor(platform)  # a new process, same namespace
        await monitor.ready()
        await asyncio.sleep(2)  # a few passes
        active = await monitor.get("/api/alerts?active=true")
        assert [a["kind"] for a in active] == ["worker_offline"]
        platform.start("gpu_worker", **FAST)
        await listener.wait_for("worker_offline", resolved=True, timeout=60)
        fired = [a for a in listener.alerts if not a["resolved"]]
        assert [a["kind"] for a in fired] == ["worker_offline"], fired  # once, not twice
        assert await monitor.get("/api/alerts?active=true") == []
        await monitor.http.aclose()
