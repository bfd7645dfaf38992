"""Wire messages: every body on RabbitMQ is one of these pydantic models as JSON (never pickle).

Each carries ``schema_version``; ``decode`` refuses oversize bodies, non-JSON and schema mismatches
with a ``DecodeError`` whose message is the reason the dead-letter queue records.
"""

from __future__ import annotations

import uuid
from enum import StrEnum
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.constants import DEFAULT_PRIORITY, MAX_PRIORITY
from shared.errors import DecodeError, MessageTooLargeError, SchemaError

#: Task ids go into Redis keys, routing keys and folder names: keep them to a safe alphabet.
TASK_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
TASK_TYPE_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"

#: uuid5 namespace that turns an idempotency key into a task id (fixed forever: changing it would
#: give existing keys new ids).
IDEMPOTENCY_NAMESPACE = uuid.UUID("6f1c0c52-6a43-4b8e-9a55-0f1b1f0a7e21")


#: Latest accepted start time (Unix s): 9999-12-31 UTC, the last moment ``datetime`` can show.
MAX_START_TIME = 253_402_300_799.0


class TaskState(StrEnum):
    """Task lifecycle states (see docs/architecture.md for the transitions)."""

    SUBMITTED = "submitted"
    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        """True for states a task never leaves."""
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLED})


class WireModel(BaseModel):
    """Base of every message: explicit fields only, immutable, versioned."""

    # allow_inf_nan=False: JSON has no inf/NaN; accepting them would store values we cannot send.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    schema_version: Literal[1] = 1


#: Largest record (characters of its hash's keys and values) a terminal state event carries;
#: a larger one (a big config or result) is left for the client to read from Redis.
RECORD_IN_EVENT_MAX_CHARS = 64 * 1024

#: Most parents one task may wait for, and most config references it may carry.
MAX_DEPENDENCIES = 100


class ConfigRef(BaseModel):
    """A value of a child task's config taken from a parent task when the parents have completed.

    The scheduler resolves it after every parent completed, then validates the whole config.

    Attributes:
        target: dotted path of the config field to set (``model_task``, ``optimizer.lr``); with
            ``merge``, the mapping to merge into (``""``: the config itself).
        task_id: the parent task.
        source: ``task_id`` (the parent's id) or ``result`` / ``result.<dotted path>`` (a value
            of the parent's result, e.g. ``result.best_params`` or ``result.metrics.steps``).
        merge: the value is a mapping whose keys are merged into ``target`` (``config_from``)
            instead of replacing it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str = Field("", max_length=500, pattern=r"^([A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*)?$")
    task_id: str = Field(pattern=TASK_ID_PATTERN)
    source: str = Field("task_id", max_length=500, pattern=r"^(task_id|result(\.[A-Za-z0-9_-]+)*)$")
    merge: bool = False

    @property
    def text(self) -> str:
        """The reference as a pipeline file writes it: ``${tasks.<id>.<source>}``."""
        return f"${{tasks.{self.task_id}.{self.source}}}"


class TaskSubmission(WireModel):
    """A task as the client submits it and as the scheduler dispatches it to a work queue.

    ``config`` stays a plain mapping on the wire; the scheduler and the CLI validate it against the
    task type's config model (``shared.task_types``). A task with ``depends_on`` or
    ``not_before`` is held by the scheduler (state ``submitted``) until every parent completed
    and the start time passed; ``config_refs`` are then filled in from the parents.
    """

    task_id: str = Field(pattern=TASK_ID_PATTERN)
    task_type: str = Field(pattern=TASK_TYPE_PATTERN)
    config: dict[str, Any] = Field(default_factory=dict)
    priority: int = Field(DEFAULT_PRIORITY, ge=0, le=MAX_PRIORITY)
    submitted_at: float = Field(ge=0, description="Unix time (s) on the submitting machine.")
    submitted_by: str = Field("", max_length=200)
    idempotency_key: str | None = Field(None, max_length=200)
    git_commit: str | None = Field(None, pattern=r"^[0-9a-f]{7,64}$")
    timeout_s: float | None = Field(None, gt=0, description="Maximum run time (s).")
    max_attempts: int | None = Field(None, ge=1, le=100, description="Runs before giving up.")
    depends_on: list[Annotated[str, Field(pattern=TASK_ID_PATTERN)]] = Field(
        default_factory=list,
        max_length=MAX_DEPENDENCIES,
        description="Parent task ids: held until every one completed; fails if one does not.",
    )
    config_refs: list[ConfigRef] = Field(default_factory=list, max_length=MAX_DEPENDENCIES)
    not_before: float | None = Field(
        None,
        ge=0,
        le=MAX_START_TIME,
        description="Not queued before this Unix time (s, the desktop's Redis clock).",
    )

    @property
    def held(self) -> bool:
        """Whether the scheduler holds it before queueing (parents or a start time)."""
        return bool(self.depends_on or self.config_refs) or self.not_before is not None


class EventKind(StrEnum):
    """What a ``TaskEvent`` reports."""

    STATE = "state"
    PROGRESS = "progress"


class TaskEvent(WireModel):
    """News about a task on ``<ns>.events`` with routing key ``task.<state|progress>.<task_id>``."""

    task_id: str = Field(pattern=TASK_ID_PATTERN)
    kind: EventKind
    state: TaskState
    ts: float
    worker: str | None = None
    progress: float | None = Field(None, ge=0.0, le=1.0)
    message: str = ""
    metrics: dict[str, float] = Field(default_factory=dict)
    error: str | None = None
    #: A terminal state's record (the Redis hash, as ``TaskRecord.from_hash`` takes it) read in
    #: the same atomic step as the move, so a waiting client has the result without a read;
    #: None on other events and when the record is larger than ``RECORD_IN_EVENT_MAX_CHARS``.
    record: dict[str, str] | None = None

    @property
    def routing_key(self) -> str:
        """Topic routing key: followers bind ``task.*.<id>`` for one task or ``task.#`` for all."""
        part = self.kind.value if self.kind is EventKind.PROGRESS else self.state.value
        return f"task.{part}.{self.task_id}"


class CancelRequest(WireModel):
    """``task.cancel`` on the control exchange: the worker running ``task_id`` stops it."""

    task_id: str = Field(pattern=TASK_ID_PATTERN)
    requested_by: str = Field("", max_length=200)


#: ``worker`` of a ``DrainRequest`` meant for every worker, and the word in its routing key.
ALL_WORKERS = "all"


def drain_routing_key(worker: str | None) -> str:
    """Control routing key of a drain request: ``worker.<name>.drain`` or ``worker.all.drain``.

    A worker binds both its own key and the ``all`` key. Names are bound literally, so a name
    with dots is one exact key; the worker also checks the request's ``worker`` field, so a name
    holding a topic wildcard (``*``, ``#``) cannot drain the wrong worker.
    """
    return f"worker.{worker or ALL_WORKERS}.drain"


class DrainRequest(WireModel):
    """``worker.<name>.drain`` / ``worker.all.drain`` on the control exchange.

    The worker(s) drain exactly as on SIGTERM (stop consuming, let running tasks finish within
    ``TP_DRAIN_TIMEOUT_S``, else hand them back) and then exit 0.
    """

    worker: str | None = Field(
        None, min_length=1, max_length=200, description="Worker name; None for every worker."
    )
    requested_by: str = Field("", max_length=200)
    ts: float = Field(ge=0, description="Unix time (s) on the requesting machine.")

    @property
    def routing_key(self) -> str:
        """``worker.<name>.drain``, or ``worker.all.drain`` for every worker."""
        return drain_routing_key(self.worker)

    def is_for(self, worker: str) -> bool:
        """True when ``worker`` must drain: the request names it, or names no one (all)."""
        return self.worker is None or self.worker == worker


M = TypeVar("M", bound=WireModel)


def encode(message: WireModel) -> bytes:
    """Serialise a wire model to UTF-8 JSON bytes."""
    return message.model_dump_json().encode()


def decode(body: bytes, model: type[M], *, max_bytes: int) -> M:
    """Parse ``body`` into ``model``.

    Args:
        body: raw message body.
        model: the wire model expected on this queue.
        max_bytes: size limit; larger bodies are refused unread.

    Raises:
        MessageTooLargeError: ``len(body) > max_bytes``.
        DecodeError: not UTF-8 JSON.
        SchemaError: JSON that does not match ``model`` (the reason lists the fields).
    """
    if len(body) > max_bytes:
        raise MessageTooLargeError(f"message of {len(body)} bytes exceeds limit of {max_bytes}")
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        if any(err["type"] == "json_invalid" for err in e.errors()):
            raise DecodeError(f"undecodable body: {e.errors()[0]['msg']}") from e
        raise SchemaError(f"invalid {model.__name__}: {describe_validation_error(e)}") from e
    except UnicodeDecodeError as e:
        raise DecodeError(f"undecodable body: {e}") from e


def describe_validation_error(error: ValidationError) -> str:
    """One line naming each failing field: ``epochs: Input should be greater than 0; ...``."""
    parts = []
    for err in error.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def task_id_for_key(idempotency_key: str) -> str:
    """Deterministic task id for an idempotency key (uuid5), so a retried submit names one task."""
    return str(uuid.uuid5(IDEMPOTENCY_NAMESPACE, idempotency_key))
