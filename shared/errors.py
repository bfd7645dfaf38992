"""One error tree for the whole platform.

``TradePlatError`` is the root. Branches: broker, status store, decoding, task failures, and
``ControlFlow`` (reject, skip) which logs and metrics do not count as failures. Every error carries
structured fields so a log line or a dead-letter reason can name what went wrong.
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


class ConfigError(TradePlatError):
    """A setting is missing or invalid (refused at start-up, before anything runs)."""


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


class IdempotencyConflictError(TaskError):
    """A submit reused a task id (or idempotency key) that names a task with another spec."""


class TaskFailedError(TaskError):
    """The task's code raised, or its child process died; ``fields`` holds error and traceback."""


class ControlFlow(TradePlatError):  # noqa: N818 - a branch name, not an error kind
    """Not a failure: a decision that changes how a delivery is handled (logged at info level)."""


class ClaimRefused(ControlFlow):
    """Another party already moved the task on (claimed, cancelled, finished): drop the delivery."""
