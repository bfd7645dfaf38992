"""One pass of the health-monitor: read heartbeats, queues, tasks and syncs into a snapshot.

Sources: heartbeats and task records from Redis (the truth), queue depths and consumer counts from
RabbitMQ itself (a passive ``queue.declare`` returns the broker's own counts, the same numbers the
management UI and ``rabbitmqctl list_queues`` show), git-sync and artifact-sync reports from Redis.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from aio_pika.abc import AbstractChannel

from services.health_monitor.snapshot import HealthSnapshot, QueueInfo, SyncSummary, TaskSummary
from shared.artifacts import ArtifactState, ArtifactStatus
from shared.broker import BROKER_FAILURES, Broker
from shared.constants import ROUTE_ARTIFACTS, ROUTE_CPU, ROUTE_GPU, ROUTE_SUBMIT
from shared.errors import BrokerError
from shared.events import finite_metrics
from shared.gitsync import SyncStatus
from shared.health import load_services
from shared.messages import TERMINAL_STATES, TaskState
from shared.queues import queue_depths
from shared.settings import Settings
from shared.store import StatusStore, TaskRecord

#: Queues the monitor reports, by role ("dead" is the dead-letter queue).
ROUTES = (ROUTE_SUBMIT, ROUTE_GPU, ROUTE_CPU, ROUTE_ARTIFACTS, "dead")
#: Lengths of the dashboard's lists: enough to read at a glance, bounded per pass.
ACTIVE_MAX, QUEUED_MAX, RECENT_MAX, METRICS_MAX = 50, 100, 20, 12
#: Artifact sync states are found by a SCAN (one key per task), so they are re-read only this
#: often (s); everything else is read every pass.
ARTIFACT_SCAN_EVERY_S = 10.0


def summarise(record: TaskRecord, tasks_dir: Path | None = None) -> TaskSummary:
    """The dashboard's view of a task record; ``plots`` lists PNGs in its local artifact folder."""
    end = record.finished_at
    started = record.running_at
    metrics = _key_metrics(record.result)
    plots: list[str] = []
    if tasks_dir is not None and record.state is TaskState.COMPLETED:
        folder = tasks_dir / record.task_id / "artifacts"
        if folder.is_dir():
            plots = sorted(p.name for p in folder.glob("*.png"))
    return TaskSummary(
        task_id=record.task_id,
        task_type=record.task_type,
        state=record.state.value,
        priority=record.priority,
        worker=record.worker,
        attempts=record.attempts,
        submitted_at=record.submitted_at,
        queued_at=record.queued_at,
        running_at=started,
        finished_at=end,
        runtime_s=(end - started) if end is not None and started is not None else None,
        progress=record.progress,
        progress_message=record.progress_message,
        waiting=record.waiting,
        error=record.error,
        metrics=metrics,
        plots=plots,
    )


def _key_metrics(result: dict[str, Any] | None) -> dict[str, float]:
    """The numeric results: ``result["metrics"]`` when the task reports one, else top level."""
    if not result:
        return {}
    source = result.get("metrics") if isinstance(result.get("metrics"), dict) else result
    return dict(list(finite_metrics(source).items())[:METRICS_MAX])


class Collector:
    """Builds a ``HealthSnapshot`` (without alerts: ``AlertTracker`` adds them).

    Args:
        settings: namespace, data folder (for plots).
        store: a started status store.
        broker: a started broker (queue depths through a channel of its connection).
    """

    def __init__(self, settings: Settings, store: StatusStore, broker: Broker) -> None:
        self.settings = settings
        self.store = store
        self.broker = broker
        self._channel: AbstractChannel | None = None
        self._artifacts: list[ArtifactStatus] = []
        self._artifacts_at = 0.0

    async def close(self) -> None:
        """Close the channel used for queue depths."""
        await self.broker.close_channel(self._channel)
        self._channel = None

    async def collect(self) -> HealthSnapshot:
        """Read everything once.

        Raises:
            StoreError: Redis failed (the pass is skipped and logged by the caller).
        """
        now = time.time()
        store = self.store
        counts = await store.count_by_state()
        oldest = await store.oldest_in_state(TaskState.QUEUED)
        return HealthSnapshot(
            ts=now,
            healthy=True,
            services=await load_services(store),
            queues=await self.queues(),
            tasks_by_state={state.value: n for state, n in counts.items()},
            oldest_queued_age_s=max(0.0, now - oldest) if oldest is not None else None,
            active=await self._active(),
            queued=await self._queued(),
            recent=await self._recent(),
            sync=await self._sync(now),
        )

    async def queues(self) -> list[QueueInfo]:
        """Message and consumer counts of every queue, as RabbitMQ reports them.

        An unreachable broker gives an empty list (the snapshot says so through its problems).
        """
        topology = self.broker.topology
        routes = {topology.queue(r): r for r in ROUTES if r != "dead"}
        routes[topology.dead_letter_queue] = "dead"
        try:
            if self._channel is None or self._channel.is_closed:
                self._channel = await self.broker.connection.channel()
            depths = await queue_depths(self._channel, topology)
        except (*BROKER_FAILURES, BrokerError, RuntimeError):
            # A missing queue closes the channel; a dropped connection makes aiormq raise a
            # plain RuntimeError ("... closed"). Either way: a new channel next pass.
            self._channel = None
            return []
        return [
            QueueInfo(name=d.name, route=routes[d.name], messages=d.messages, consumers=d.consumers)
            for d in depths
        ]

    async def _active(self) -> list[TaskSummary]:
        records = [
            *await self.store.in_state(TaskState.RUNNING, ACTIVE_MAX),
            *await self.store.in_state(TaskState.CANCELLING, ACTIVE_MAX),
        ]
        return [summarise(r) for r in records[:ACTIVE_MAX]]

    async def _queued(self) -> list[TaskSummary]:
        """Queued tasks in dispatch order: priority high to low, then first queued first.

        Read from the per-state index, up to four times the list's length, so a flood of low
        priority tasks cannot hide a high-priority one queued later.
        """
        records = await self.store.in_state(TaskState.QUEUED, QUEUED_MAX * 4)
        records.sort(key=lambda r: (-r.priority, r.queued_at or 0.0))
        return [summarise(r) for r in records[:QUEUED_MAX]]

    async def _recent(self) -> list[TaskSummary]:
        records: list[TaskRecord] = []
        for state in TERMINAL_STATES:
            records += await self.store.in_state(state, RECENT_MAX, newest_first=True)
        records.sort(key=lambda r: r.finished_at or 0.0, reverse=True)
        tasks_dir = self.settings.tasks_dir
        return [summarise(r, tasks_dir) for r in records[:RECENT_MAX]]

    async def _sync(self, now: float) -> SyncSummary:
        keys = self.store.keys
        git = await self.store.load_reports(SyncStatus, index=keys.git_sync_index)
        if now - self._artifacts_at >= ARTIFACT_SCAN_EVERY_S:
            self._artifacts = await self.store.load_reports(
                ArtifactStatus, pattern=keys.artifacts_pattern
            )
            self._artifacts_at = now
        by_state = {s: 0 for s in ArtifactState}
        for status in self._artifacts:
            by_state[status.state] += 1
        unsynced = [a for a in self._artifacts if a.state is not ArtifactState.SYNCED]
        unsynced.sort(key=lambda a: a.updated_at, reverse=True)
        return SyncSummary(
            git=sorted(git, key=lambda g: g.host),
            artifacts_pending=by_state[ArtifactState.PENDING],
            artifacts_syncing=by_state[ArtifactState.SYNCING],
            artifacts_failed=by_state[ArtifactState.FAILED],
            artifacts=unsynced[:50],
        )

    def refresh_artifacts(self) -> None:
        """Re-read artifact sync states on the next pass (an ``artifact.*`` event arrived)."""
        self._artifacts_at = 0.0
