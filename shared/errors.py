"""One error tree for the whole platform.

``TradePlatError`` is the root. Branches: broker, status store, decoding, task refusals. A refused
claim or a duplicate submit is not an error: it is a decision, logged where it is taken. Every
error carries structured fields so a log line or a dead-letter reason can name what went wrong.
"""

from __future__ import annotations

from typing import Any


class TradePlatError(Exception):
    """Root of every error this platform raises on purpose.

    Args:
        message: human-readable summary.
        **fields: structured context (task id, field name, queue...) kept in ``self.fields``.
    """

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields

    def __str__(self) -> str:
        return self.message


class NotConnectedError(TradePlatError):
    """A connection-backed object was used before ``start()``/``connect()`` or after ``stop()``."""


class BrokerError(TradePlatError):
    """RabbitMQ refused or lost an operation (publish not confirmed, channel closed...)."""


class StoreError(TradePlatError):
    """Redis refused or lost an operation on the status store."""


class TaskNotFoundError(StoreError):
    """No task record exists for this id."""


class DecodeError(TradePlatError):
    """A body could not be turned into a wire model; the message is the dead-letter reason."""


class MessageTooLargeError(DecodeError):
    """A message body is larger than the configured limit (``TP_MAX_MESSAGE_BYTES``)."""


class SchemaError(DecodeError):
    """A message decoded as JSON but does not match the wire schema."""


class TaskError(TradePlatError):
    """A task cannot be accepted or did not succeed."""


class UnknownTaskTypeError(TaskError):
    """The task type is not one this platform knows."""


class TaskConfigError(TaskError):
    """A task config failed validation; ``fields["errors"]`` lists ``(field, message)`` pairs."""


class LocalRunExistsError(TaskError):
    """This machine already ran (or is running) the task locally: it is not run again."""


class IdempotencyConflictError(TaskError):
    """A submit reused a task id (or idempotency key) that names a task with another spec."""


class CommitCheckError(TaskError):
    """A submit refused because the checkout it is pinned to is dirty or its commit unpushed."""


class DeadLetterNotFoundError(TradePlatError):
    """No message in the dead-letter queue has the id asked for (``queue dead --requeue``)."""


class DependencyError(TaskError):
    """A task's ``depends_on`` or config references are refused (unknown parent, self, bad path).

    ``fields["field"]`` names what is wrong (``depends_on``, ``config.model_task``).
    """


class PipelineError(TaskError):
    """A pipeline file is refused (unknown step, cycle, bad reference), naming the field."""


class ScheduleError(TaskError):
    """A schedule is refused: bad cron expression or time zone, name taken, bad task config."""


class ScheduleNotFoundError(TradePlatError):
    """No schedule has this name."""


class DuplicateServiceError(TradePlatError):
    """Another live process already beats under this service's kind and name."""
