"""structlog set-up: JSON lines in services, a readable console on a TTY."""

from __future__ import annotations

import logging
import sys

import structlog

from shared.settings import Settings


def configure_logging(settings: Settings, *, service: str) -> None:
    """Configure structlog and the standard library once per process.

    Args:
        settings: supplies ``log_level`` and ``log_format`` (``auto`` picks console on a TTY).
        service: bound into every line as ``service`` so merged logs stay readable.
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
    logging.basicConfig(level=max(level, logging.WARNING), stream=sys.stderr, format="%(message)s")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)
