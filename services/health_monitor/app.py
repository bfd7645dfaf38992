"""health-monitor wiring: a collection pass every ``TP_HEALTH_INTERVAL_S``, alerts, HTTP.

Each pass reads a ``HealthSnapshot`` (``collector``), updates alerts (``alerts``) and metrics
(``metrics``), then hands the snapshot to every live dashboard (server-sent events). Alerts are
published as ``health.alert.<kind>`` events and kept in ``<ns>:alerts`` (newest first, capped).
A pass that cannot reach Redis still produces an unhealthy snapshot saying so, so ``/healthz``
turns 503 instead of answering from stale data.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import deque
from typing import Any

import structlog
import uvicorn
from fastapi import HTTPException
from redis.exceptions import RedisError

from services.health_monitor.alerts import AlertTracker
from services.health_monitor.collector import Collector
from services.health_monitor.http import EmbeddedServer, create_app
from services.health_monitor.metrics import Metrics
from services.health_monitor.snapshot import HealthSnapshot
from shared import logstream
from shared.broker import Broker
from shared.errors import BrokerError, StoreError
from shared.gitinfo import head_commit
from shared.health import Beacon, HealthAlert
from shared.periodic import Periodic
from shared.settings import Settings
from shared.store import StatusStore

log = structlog.get_logger(__name__)

#: Alerts kept in Redis and shown on the dashboard.
ALERTS_KEPT = 200
#: Snapshots a slow dashboard connection may fall behind before it is skipped ahead.
SUBSCRIBER_BACKLOG = 8

#: Longest wait for open HTTP connections to finish at stop (s).
SHUTDOWN_GRACE_S = 3
#: The inbox message that ends an event stream (the monitor is stopping).
CLOSE = "close"

Inbox = asyncio.Queue[tuple[str, dict[str, Any]]]


class HealthMonitor:
    """The health-monitor service."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = StatusStore(settings)
        self.broker = Broker(settings, name="health-monitor")
        self.collector = Collector(settings, self.store, self.broker)
        self.alerts = AlertTracker(own=("health-monitor", socket.gethostname()))
        self.metrics = Metrics()
        self.beacon = Beacon(
            settings,
            self.store,
            self.broker,
            kind="health-monitor",
            code_commit=head_commit(settings.checkout_dir),
        )
        self.latest: HealthSnapshot | None = None
        self.recent_alerts: deque[HealthAlert] = deque(maxlen=ALERTS_KEPT)
        self._subscribers: set[Inbox] = set()
        self._closing = False
        self._started_at = 0.0
        self._periodic = Periodic("health_pass", settings.health_interval_s, self.run_pass)
        self.server = EmbeddedServer(
            uvicorn.Config(
                create_app(self),
                host=settings.health_host,
                port=settings.health_port,
                log_config=None,
                access_log=False,
                lifespan="off",
                timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
            )
        )
        self._serve: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.store.start()
        await self.broker.start()
        self._started_at = await self._redis_now()
        await self._load_alerts()
        self._periodic.start()
        self.beacon.start()
        self.server.should_exit = False
        self._serve = asyncio.create_task(self.server.serve(), name="http")
        while not self.server.started:
            if self._serve.done():
                await self._serve  # raises why it could not listen
                raise StoreError("HTTP server ended at start")
            await asyncio.sleep(0.05)
        log.info("health_monitor_ready", host=self.settings.health_host, port=self.server.port)

    async def stop(self) -> None:
        if self._serve is not None:
            # Open dashboards hold their event streams for ever: end them, or uvicorn would wait.
            self._closing = True
            self._deliver(CLOSE, {})
            self.server.should_exit = True
            await asyncio.gather(self._serve, return_exceptions=True)
            self._serve = None
        await self.beacon.stop()
        await self._periodic.stop()
        await self.collector.close()
        await self.broker.stop()
        await self.store.stop()

    async def run_pass(self) -> None:
        """Collect, alert, count, publish to dashboards. Never raises for Redis or the broker."""
        try:
            snapshot = await self.collector.collect()
        except StoreError as e:
            self._publish_snapshot(self._stale(f"Redis unreachable: {e}"))
            return
        except Exception as e:  # the loop must outlive any one pass: report it, not die
            log.exception("health_pass_failed")
            self._publish_snapshot(self._stale(f"health pass failed: {e!r}"))
            return
        changes = self.alerts.update(snapshot)
        for alert in changes:
            await self._raise(alert)
        problems = self.alerts.problems
        if not snapshot.queues:
            problems.append("RabbitMQ unreachable: queue depths unknown")
        snapshot = snapshot.model_copy(
            update={
                "problems": problems,
                "healthy": not problems,
                "alerts": list(self.recent_alerts)[:50],
                "active_alerts": sorted(self.alerts.active.values(), key=lambda a: a.ts),
            }
        )
        try:
            await self.metrics.count_finished(self.store, self._started_at)
        except StoreError as e:
            log.warning("metrics_count_failed", error=str(e))
        self.metrics.update(snapshot, len(self.alerts.active))
        self._publish_snapshot(snapshot)

    def _stale(self, problem: str) -> HealthSnapshot:
        """The last good snapshot, kept for reading but marked unhealthy and stale."""
        now = time.time()
        last = self.latest or HealthSnapshot(ts=now, healthy=False)
        return last.model_copy(
            update={
                "ts": now,
                "healthy": False,
                "problems": [problem],
                "stale_since": last.stale_since or last.ts,
            }
        )

    def require_snapshot(self) -> HealthSnapshot:
        """The latest snapshot (raises HTTP 503 before the first pass)."""
        if self.latest is None:
            raise HTTPException(503, "no health pass has completed yet")
        return self.latest

    def subscribe(self) -> Inbox:
        """An inbox that receives every later snapshot and alert (for one SSE connection)."""
        inbox: Inbox = asyncio.Queue(maxsize=SUBSCRIBER_BACKLOG)
        if self._closing:
            inbox.put_nowait((CLOSE, {}))
        else:
            self._subscribers.add(inbox)
        return inbox

    def unsubscribe(self, inbox: Inbox) -> None:
        """Stop delivering to ``inbox``."""
        self._subscribers.discard(inbox)

    async def log_tail(self, task_id: str, count: int) -> list[dict[str, Any]]:
        """The last ``count`` lines of the task's output, oldest first (``LogLine.as_dict``).

        Raises:
            TaskNotFoundError: no such task.
            StoreError: Redis failed.
        """
        await self.store.get(task_id)
        lines = await logstream.tail(self.store.redis, self.store.keys.task_logs(task_id), count)
        return [line.as_dict() for line in lines]

    def _publish_snapshot(self, snapshot: HealthSnapshot) -> None:
        self.latest = snapshot
        self._deliver("snapshot", snapshot.public())

    def _deliver(self, kind: str, data: dict[str, Any]) -> None:
        for inbox in list(self._subscribers):
            if inbox.full():  # a slow reader gets the newest news, not a growing backlog
                inbox.get_nowait()
            inbox.put_nowait((kind, data))

    async def _raise(self, alert: HealthAlert) -> None:
        """Log, keep, publish and push one alert (or its resolution)."""
        (log.info if alert.resolved else log.warning)(
            "health_alert",
            kind=alert.kind,
            subject=alert.subject,
            message=alert.message,
            resolved=alert.resolved,
        )
        self.recent_alerts.appendleft(alert)
        self._deliver("alert", alert.model_dump(mode="json"))
        body = alert.model_dump_json()
        keys = self.store.keys
        field = f"{alert.kind}|{alert.subject}"
        try:
            async with self.store.redis.pipeline(transaction=True) as pipe:
                pipe.lpush(keys.alerts, body)
                pipe.ltrim(keys.alerts, 0, ALERTS_KEPT - 1)
                if alert.resolved:
                    pipe.hdel(keys.alerts_active, field)
                else:
                    pipe.hset(keys.alerts_active, field, body)
                await pipe.execute()
        except (RedisError, OSError) as e:
            log.warning("alert_not_stored", error=str(e))
        try:
            await self.broker.publish_raw_event(alert.routing_key, body.encode())
        except BrokerError as e:
            log.warning("alert_not_published", error=str(e))

    async def _load_alerts(self) -> None:
        """The alerts kept in Redis, for the dashboard after a restart."""
        try:
            raw = await self.store.redis.lrange(self.store.keys.alerts, 0, ALERTS_KEPT - 1)
        except (RedisError, OSError) as e:
            raise StoreError(f"reading alerts failed: {e}") from e
        for item in reversed(raw):
            self.recent_alerts.appendleft(HealthAlert.model_validate_json(item))
        try:
            active = await self.store.redis.hvals(self.store.keys.alerts_active)
        except (RedisError, OSError) as e:
            raise StoreError(f"reading active alerts failed: {e}") from e
        self.alerts.restore(HealthAlert.model_validate_json(item) for item in active)

    async def _redis_now(self) -> float:
        seconds, micros = await self.store.redis.time()
        return float(seconds) + float(micros) / 1e6
