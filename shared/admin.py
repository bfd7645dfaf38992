"""Administrative operations on a whole namespace (tests, benchmarks, decommissioning)."""

from __future__ import annotations

import aio_pika
import redis.asyncio as aioredis

from shared.keys import Keys
from shared.settings import Settings
from shared.topology import Topology


async def delete_namespace(settings: Settings) -> int:
    """Delete every queue, exchange and Redis key of ``settings.namespace``.

    Destroys tasks and messages of that namespace for good; meant for test and benchmark
    namespaces. Returns the number of Redis keys deleted.
    """
    client = aioredis.Redis.from_url(settings.redis_url, **settings.redis_tls_kwargs())
    deleted = 0
    try:
        keys = [
            k async for k in client.scan_iter(match=Keys(settings.namespace).pattern, count=1000)
        ]
        for start in range(0, len(keys), 1000):
            deleted += await client.delete(*keys[start : start + 1000])
    finally:
        await client.aclose()
    topology = Topology(settings.namespace)
    connection = await aio_pika.connect(settings.amqp_url, ssl_context=settings.amqp_ssl_context())
    async with connection:
        channel = await connection.channel()
        for queue in topology.all_queues:
            await channel.queue_delete(queue)
        for exchange in topology.all_exchanges:
            await channel.exchange_delete(exchange)
    return deleted
