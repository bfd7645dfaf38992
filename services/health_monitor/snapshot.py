"""What the health-monitor knows at one moment: the models behind its JSON API and dashboard.

One ``HealthSnapshot`` is collected every ``TP_HEALTH_INTERVAL_S``; ``/api/snapshot`` returns it
whole, the other ``/api/*`` routes return parts of it, and ``/api/stream`` pushes each new one as
a server-sent event. Times are Unix seconds, ages and durations seconds, sizes bytes.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from shared.artifacts import ArtifactStatus
from shared.gitsync import SyncStatus
from shared.health import HealthAlert, ServiceStatus


class QueueInfo(BaseModel):
    """A RabbitMQ queue as the broker reports it (passive declare), with its role."""

    name: str
    route: str
    messages: int
    consumers: int


class TaskSummary(BaseModel):
    """A task as the dashboard lists it (active, queued or recent)."""

    task_id: str
    task_type: str
    state: str
    priority: int
    worker: str | None = None
    attempts: int = 0
    submitted_at: float | None = None
    queued_at: float | None = None
    running_at: float | None = None
    finished_at: float | None = None
    runtime_s: float | None = None
    progress: float | None = None
    progress_message: str = ""
    waiting: str = ""
    error: str | None = None
    #: Key numeric results (val_loss, sharpe...), at most a dozen.
    metrics: dict[str, float] = Field(default_factory=dict)
    #: Names of the plots the dashboard can show (``/api/tasks/{id}/plots/{name}``).
    plots: list[str] = Field(default_factory=list)


class SyncSummary(BaseModel):
    """git-sync per desktop and artifact-sync's backlog."""

    git: list[SyncStatus] = Field(default_factory=list)
    artifacts_pending: int = 0
    artifacts_syncing: int = 0
    artifacts_failed: int = 0
    #: The artifact syncs not (yet) ``synced``, newest first, at most 50.
    artifacts: list[ArtifactStatus] = Field(default_factory=list)


class HealthSnapshot(BaseModel):
    """Everything the monitor collected in one pass.

    ``healthy`` is False while any reason is listed in ``problems`` (a worker offline, a queue
    with messages and nobody to consume them, a failed sync, the dead-letter queue growing).
    """

    ts: float
    healthy: bool
    problems: list[str] = Field(default_factory=list)
    #: Set while a pass cannot read Redis: the data below is from that time (Unix s).
    stale_since: float | None = None
    services: list[ServiceStatus] = Field(default_factory=list)
    queues: list[QueueInfo] = Field(default_factory=list)
    tasks_by_state: dict[str, int] = Field(default_factory=dict)
    oldest_queued_age_s: float | None = None
    active: list[TaskSummary] = Field(default_factory=list)
    #: Queued tasks in the order workers will take them: priority high to low, then oldest first.
    queued: list[TaskSummary] = Field(default_factory=list)
    recent: list[TaskSummary] = Field(default_factory=list)
    sync: SyncSummary = Field(default_factory=SyncSummary)
    #: Recent alert events (fired and resolved), newest first.
    alerts: list[HealthAlert] = Field(default_factory=list)
    #: The alerts that hold now, oldest first.
    active_alerts: list[HealthAlert] = Field(default_factory=list)

    @property
    def workers(self) -> list[ServiceStatus]:
        """The gpu-workers among ``services``."""
        return [s for s in self.services if s.heartbeat.worker is not None]

    def public(self) -> dict[str, Any]:
        """As JSON types, for the API."""
        return self.model_dump(mode="json")
