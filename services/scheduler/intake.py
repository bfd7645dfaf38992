"""Intake decisions: what to do with one message from the submit queue.

Kept apart from the AMQP wiring so every rule reads in one place:
    undecodable / schema-invalid      -> dead-letter with the reason
    unknown type / invalid config     -> task ``failed`` with the error
    new valid task                    -> ``submitted -> queued``, route by type
    task with parents or a start time -> held ``submitted`` (``dependencies``): queued, routed or
                                         failed there, now or when its parents end
    duplicate (same task id)          -> dropped (idempotent submit)
    redelivered after a crash mid-way -> routed again (the worker's claim dedups)
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog
from aio_pika.abc import AbstractIncomingMessage

from services.scheduler.dependencies import Dependencies
from shared.errors import DecodeError, TaskError
from shared.messages import TaskState, TaskSubmission, decode
from shared.references import validate_with_refs
from shared.settings import Settings
from shared.store import StatusStore
from shared.task_types import route_of

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class IntakeDecision:
    """The outcome: dead-letter, route to a queue, and/or announce a state change."""

    submission: TaskSubmission | None = None
    route: str | None = None
    moved_to: TaskState | None = None
    error: str | None = None
    dead_letter_reason: str | None = None


async def decide(
    message: AbstractIncomingMessage,
    settings: Settings,
    store: StatusStore,
    dependencies: Dependencies,
) -> IntakeDecision:
    """Decide and record (in Redis) what happens to one intake message."""
    try:
        submission = decode(message.body, TaskSubmission, max_bytes=settings.max_message_bytes)
    except DecodeError as e:
        return IntakeDecision(dead_letter_reason=str(e))
    held = submission.held
    # Validated before anything is written: the record is then created and moved in one round
    # trip (``create_and_transition``), each step as atomic as before.
    try:
        route = validate(submission, held=held)
    except TaskError as e:
        _, moved = await store.create_and_transition(
            submission, TaskState.FAILED, by="scheduler", reason=str(e), fields={"error": str(e)}
        )
        return IntakeDecision(
            submission, moved_to=TaskState.FAILED if moved.applied else None, error=str(e)
        )
    if held:
        await store.create(submission)
        parents = [*submission.depends_on, *(r.task_id for r in submission.config_refs)]
        outcome = await dependencies.hold(submission.task_id, list(dict.fromkeys(parents)))
        log.info("task_held", task_id=submission.task_id, outcome=outcome.value)
        return IntakeDecision(submission)  # queued, published or failed there, or later
    _, moved = await store.create_and_transition(submission, TaskState.QUEUED, by="scheduler")
    if moved.applied:
        return IntakeDecision(submission, route=route, moved_to=TaskState.QUEUED)
    if moved.previous is TaskState.QUEUED and message.redelivered:
        log.info("requeue_after_redelivery", task_id=submission.task_id)
        return IntakeDecision(submission, route=route)
    log.info("duplicate_submit_dropped", task_id=submission.task_id, state=moved.previous)
    return IntakeDecision(submission)


def validate(submission: TaskSubmission, *, held: bool) -> str:
    """The task's queue route ("" for a held task, routed when released).

    A held task's referenced fields are validated once its parents filled them in.

    Raises:
        TaskError: an unknown type or an invalid config (naming the field).
    """
    if held:
        validate_with_refs(submission.task_type, submission.config, submission.config_refs)
        return ""
    return route_of(submission.task_type, submission.config)
