"""structlog set-up: JSON lines in services, a readable console on a TTY.

Our events (``structlog.get_logger(__name__)``) and the standard library's records (aio-pika,
aiormq, redis, MLflow, Python warnings) leave through one root handler whose
``structlog.stdlib.ProcessorFormatter`` renders both alike: one JSON object per line with
``event``, ``level``, ``timestamp``, ``logger`` and ``service`` in json mode, the console renderer
otherwise. Nothing is written to stderr around it, so every line of a service's log parses.
Every line passes :func:`redacting` last before rendering: no password, secret key or token of
the settings, and no password in any URL, reaches a log line (tracebacks included).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from shared.settings import Settings, redact_text

#: Top-level names of this project's loggers: they log at the configured level. Every other
#: (third-party) standard-library logger logs at WARNING and above.
OWN_LOGGERS = ("shared", "services", "__main__")


def redacting(settings: Settings) -> structlog.typing.Processor:
    """A processor replacing every secret in an event's strings with ``***`` (nested too).

    The secrets are :meth:`Settings.secret_values` (read once, here) and any
    ``scheme://user:password@`` password (:meth:`Settings.redact_text`); keys are kept.
    """
    secrets = settings.secret_values()

    def clean(value: Any) -> Any:
        if isinstance(value, str):
            return redact_text(value, secrets)
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(clean(v) for v in value)
        return value

    def processor(
        _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key, value in event_dict.items():
            event_dict[key] = clean(value)
        return event_dict

    return processor


class _RootHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The stderr handler :func:`configure_logging` installs (replaced, not added, on a re-run)."""


def configure_logging(settings: Settings, *, service: str) -> None:
    """Configure structlog and the standard library once per process.

    Args:
        settings: supplies ``log_level`` and ``log_format`` (``auto`` picks console on a TTY).
        service: set on every line as ``service`` so merged logs stay readable.
    """
    level = getattr(logging, settings.log_level.upper())
    fmt = settings.log_format
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )

    def add_service(
        _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        # Not only a context variable: records from other threads (MLflow, redis) carry it too.
        event_dict.setdefault("service", service)
        return event_dict

    # Run on our events when they are logged and on stdlib records when they are formatted.
    pre_chain: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        add_service,
        structlog.processors.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    handler = _RootHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=pre_chain,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                redacting(settings),
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _RootHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(max(level, logging.WARNING))
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(level)
    logging.captureWarnings(True)  # warnings.warn() becomes a py.warnings record, not raw text

    structlog.configure(
        processors=[*pre_chain, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)
