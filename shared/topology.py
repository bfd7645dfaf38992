"""The broker topology, declared in one place.

Exchanges (``<ns>`` is ``TP_NAMESPACE``, ``tp`` by default):
    ``<ns>.tasks``   direct: ``submit`` -> ``<ns>.tasks.submit`` (scheduler intake),
                     ``gpu`` -> ``<ns>.tasks.gpu``, ``cpu`` -> ``<ns>.tasks.cpu`` (priority queues),
                     ``artifacts`` -> ``<ns>.artifacts``
    ``<ns>.events``  topic: ``task.<state>.<id>``, ``task.progress.<id>``; followers bind
                     exclusive auto-delete queues
    ``<ns>.control`` topic: ``task.cancel``, ``worker.<name>.drain``, ``worker.all.drain``
    ``<ns>.dlx``     fanout -> ``<ns>.dead``: messages that could not be decoded or validated

All exchanges and queues are durable; work queues are classic queues with ``x-max-priority`` (quorum
queues ignore per-message priority in RabbitMQ 3.10) and dead-letter to ``<ns>.dlx``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue, ExchangeType

from shared.constants import (
    MAX_PRIORITY,
    ROUTE_ARTIFACTS,
    ROUTE_CPU,
    ROUTE_GPU,
    ROUTE_SUBMIT,
)


@dataclass(frozen=True)
class Topology:
    """Names of every exchange and queue for one namespace."""

    namespace: str

    @property
    def tasks_exchange(self) -> str:  # noqa: D102
        return f"{self.namespace}.tasks"

    @property
    def events_exchange(self) -> str:  # noqa: D102
        return f"{self.namespace}.events"

    @property
    def control_exchange(self) -> str:  # noqa: D102
        return f"{self.namespace}.control"

    @property
    def dead_letter_exchange(self) -> str:  # noqa: D102
        return f"{self.namespace}.dlx"

    @property
    def dead_letter_queue(self) -> str:  # noqa: D102
        return f"{self.namespace}.dead"

    def queue(self, route: str) -> str:
        """Queue name for a routing key of the tasks exchange (``submit``, ``gpu``, ``cpu``...)."""
        if route == ROUTE_ARTIFACTS:
            return f"{self.namespace}.artifacts"
        return f"{self.namespace}.tasks.{route}"

    def private_queue(self, role: str) -> str:
        """A fresh name for an exclusive auto-delete queue (``<ns>.<role>.<32 hex>``).

        Named under the namespace (not the library's ``amq_...``) so a broker user whose
        permissions cover only the names ``<ns>.*`` can declare it: see docs/deploy.md.
        """
        return f"{self.namespace}.{role}.{uuid.uuid4().hex}"

    @property
    def all_queues(self) -> list[str]:
        """Every durable queue (tests delete them to clean up)."""
        routes = (ROUTE_SUBMIT, ROUTE_GPU, ROUTE_CPU, ROUTE_ARTIFACTS)
        return [*(self.queue(r) for r in routes), self.dead_letter_queue]

    @property
    def all_exchanges(self) -> list[str]:
        """Every durable exchange."""
        return [
            self.tasks_exchange,
            self.events_exchange,
            self.control_exchange,
            self.dead_letter_exchange,
        ]


@dataclass(frozen=True)
class DeclaredTopology:
    """Handles to the declared exchanges and queues, as one channel sees them."""

    tasks: AbstractExchange
    events: AbstractExchange
    control: AbstractExchange
    dead_letter: AbstractExchange
    queues: dict[str, AbstractQueue]


async def declare(channel: AbstractChannel, topology: Topology) -> DeclaredTopology:
    """Declare every exchange, queue and binding (idempotent; safe from every process).

    Raises:
        aio_pika.exceptions.ChannelPreconditionFailed: a queue exists with other arguments.
    """
    tasks = await channel.declare_exchange(
        topology.tasks_exchange, ExchangeType.DIRECT, durable=True
    )
    events = await channel.declare_exchange(
        topology.events_exchange, ExchangeType.TOPIC, durable=True
    )
    control = await channel.declare_exchange(
        topology.control_exchange, ExchangeType.TOPIC, durable=True
    )
    dlx = await channel.declare_exchange(
        topology.dead_letter_exchange, ExchangeType.FANOUT, durable=True
    )
    dead = await channel.declare_queue(topology.dead_letter_queue, durable=True)
    await dead.bind(dlx, routing_key="")
    dead_letter_args = {"x-dead-letter-exchange": topology.dead_letter_exchange}
    queues = {topology.dead_letter_queue: dead}
    for route in (ROUTE_SUBMIT, ROUTE_GPU, ROUTE_CPU, ROUTE_ARTIFACTS):
        args: dict[str, aio_pika.abc.FieldValue] = dict(dead_letter_args)
        if route in (ROUTE_GPU, ROUTE_CPU):
            args["x-max-priority"] = MAX_PRIORITY
        queue = await channel.declare_queue(topology.queue(route), durable=True, arguments=args)
        await queue.bind(tasks, routing_key=route)
        queues[queue.name] = queue
    return DeclaredTopology(tasks, events, control, dlx, queues)
