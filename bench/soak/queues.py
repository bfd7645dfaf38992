"""Reading the namespace's RabbitMQ queues (the same logic as tests/conftest.py, not imported)."""

from __future__ import annotations

import asyncio
import time

import aio_pika

from shared.settings import Settings
from shared.topology import Topology


async def queue_counts(s: Settings) -> dict[str, dict[str, int]]:
    """Messages and consumers of each of the namespace's queues (missing ones are left out)."""
    out: dict[str, dict[str, int]] = {}
    connection = await aio_pika.connect(s.amqp_url)
    async with connection:
        for name in Topology(s.namespace).all_queues:
            channel = await connection.channel()
            try:
                q = await channel.declare_queue(name, passive=True)
            except aio_pika.exceptions.ChannelClosed:
                continue
            result = q.declaration_result
            out[name] = {
                "messages": result.message_count or 0,
                "consumers": result.consumer_count or 0,
            }
            await channel.close()
    return out


async def wait_for_consumers(s: Settings, queues: dict[str, int], timeout_s: float) -> None:
    """Wait until each named queue has at least the given number of consumers."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            counts = await queue_counts(s)
        except (aio_pika.exceptions.AMQPError, OSError):
            counts = {}
        have = {n: counts.get(n, {}).get("consumers", 0) for n in queues}
        if all(have[n] >= want for n, want in queues.items()):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"consumers not ready after {timeout_s:g} s: {have}")
        await asyncio.sleep(0.3)
