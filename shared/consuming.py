"""Delivery handling every consumer shares: never die of a message, never lose one.

``handle_delivery`` runs a handler and turns what it raises into the right broker action:
    StoreError / BrokerError  -> wait, then nack back to the queue (a dependency is down; retry)
    any other exception       -> dead-letter with the reason, then ack (a bug or poison message)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog
from aio_pika.abc import AbstractIncomingMessage

from shared.broker import BROKER_FAILURES, Broker
from shared.errors import BrokerError, StoreError

log = structlog.get_logger(__name__)

#: Pause before handing a delivery back when Redis or the broker failed, so an outage does not
#: become a hot redelivery loop (s).
REDELIVERY_BACKOFF_S = 1.0


async def handle_delivery(
    message: AbstractIncomingMessage,
    handler: Callable[[AbstractIncomingMessage], Awaitable[None]],
    *,
    broker: Broker,
    source_queue: str,
) -> None:
    """Run ``handler(message)``; on failure nack (dependency down) or dead-letter (anything else).

    The handler itself acks what it handled. Nothing raised here escapes to aio-pika, so a
    consumer never dies of a message.
    """
    try:
        await handler(message)
    except (StoreError, BrokerError) as e:
        log.warning("delivery_deferred", error=str(e), queue=source_queue)
        await asyncio.sleep(REDELIVERY_BACKOFF_S)
        await settle(message, requeue=True)
    except Exception as e:
        log.exception("delivery_crashed", queue=source_queue)
        try:
            await broker.dead_letter(message, f"{type(e).__name__}: {e}", source_queue=source_queue)
        except BrokerError:
            await settle(message, requeue=True)
        else:
            await settle(message)


async def settle(message: AbstractIncomingMessage, *, requeue: bool | None = None) -> None:
    """Ack (``requeue=None``) or nack; a channel that is already gone settles it for us.

    When the channel closed, RabbitMQ requeues every unacked delivery itself, so there is
    nothing left to do.
    """
    with contextlib.suppress(*BROKER_FAILURES):
        if requeue is None:
            await message.ack()
        else:
            await message.nack(requeue=requeue)
