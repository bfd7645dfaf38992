"""Intake decisions: what to do with one message from the submit queue.

Kept apart from the AMQP wiring so every rule reads in one place:
    undecodable / schema-invalid      -> dead-letter with the reason
    unknown type / invalid config     -> task ``failed`` with the error
    new valid task                    -> ``submitted -> queued``, route by type
    duplicate (same task id)          -> dropped (idempotent submit)
    redelivered after a crash mid-way -> routed again (the worker's claim dedups)
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog
from aio_pika.abc import AbstractIncomingMessage

from shared.errors import DecodeError, TaskError
from shared.messages import TaskState, TaskSubmission, decode
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
    message: AbstractIncomingMessage, settings: Settings, store: StatusStore
) -> IntakeDecision:
    """Decide and record (in Redis) what happens to one intake message."""
    try:
        submission = decode(message.body, TaskSubmission, max_bytes=settings.max_message_bytes)
    except DecodeError as e:
        return IntakeDecision(dead_letter_reason=str(e))
    await store.create(submission)
    try:
        route = route_of(submission.task_type, submission.config)
    except TaskError as e:
        moved = await store.transition(
            submission.task_id,
            [TaskState.SUBMITTED],
            TaskState.FAILED,
            by="scheduler",
            fields={"error": str(e)},
        )
        return IntakeDecision(
            submission, moved_to=TaskState.FAILED if moved.applied else None, error=str(e)
        )
    moved = await store.transition(
        submission.task_id, [TaskState.SUBMITTED], TaskState.QUEUED, by="scheduler"
    )
    if moved.applied:
        return IntakeDecision(submission, route=route, moved_to=TaskState.QUEUED)
    if moved.previous is TaskState.QUEUED and message.redelivered:
        log.info("requeue_after_redelivery", task_id=submission.task_id)
        return IntakeDecision(submission, route=route)
    log.info("duplicate_submit_dropped", task_id=submission.task_id, state=moved.previous)
    return IntakeDecision(submission)
