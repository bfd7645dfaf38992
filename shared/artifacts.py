"""artifact-sync's wire models: the request a worker publishes, the state kept in Redis, events.

States: ``pending`` (requested, not started), ``syncing`` (bytes done/total move), ``synced``
(every file verified and the manifest written), ``failed`` (after ``TP_ARTIFACT_MAX_ATTEMPTS``
tries; ``error`` says why; a new request syncs again).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import Field

from shared.messages import TASK_ID_PATTERN, WireModel


class ArtifactState(StrEnum):
    """Where a task's artifact sync stands."""

    PENDING = "pending"
    SYNCING = "syncing"
    SYNCED = "synced"
    FAILED = "failed"


class ArtifactRequest(WireModel):
    """Sync a task's folder to shared storage (``<ns>.tasks`` with routing key ``artifacts``).

    ``final`` is True once the task ended (the manifest is then marked complete); a request sent
    for a checkpoint of a running task has it False.
    """

    task_id: str = Field(pattern=TASK_ID_PATTERN)
    reason: Literal["finished", "checkpoint", "requested"] = "finished"
    final: bool = True
    ts: float


class ArtifactStatus(WireModel):
    """A task's artifact sync as stored at ``Keys.artifacts(task_id)`` (JSON)."""

    task_id: str
    state: ArtifactState
    backend: str
    location: str = ""
    files: int = Field(0, ge=0)
    uploaded: int = Field(0, ge=0, description="Files copied in the last sync.")
    skipped: int = Field(0, ge=0, description="Files already stored with the same SHA-256.")
    bytes_done: int = Field(0, ge=0)
    bytes_total: int = Field(0, ge=0)
    attempts: int = Field(0, ge=0)
    complete: bool = False
    error: str | None = None
    updated_at: float


class ArtifactEvent(WireModel):
    """``artifact.<state>.<task_id>`` on the events exchange."""

    task_id: str = Field(pattern=TASK_ID_PATTERN)
    state: ArtifactState
    location: str = ""
    error: str | None = None
    ts: float

    @property
    def routing_key(self) -> str:
        """``artifact.<state>.<task_id>``: bind ``artifact.#`` for all."""
        return f"artifact.{self.state.value}.{self.task_id}"
