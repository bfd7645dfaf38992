"""Deleting everything a soak left in Redis and RabbitMQ."""

from __future__ import annotations

import asyncio

from shared.admin import delete_namespace
from shared.settings import Settings


def cleanup_namespace(s: Settings) -> None:
    """Delete the namespace's queues, exchanges and Redis keys (``shared.admin``)."""
    asyncio.run(delete_namespace(s))
