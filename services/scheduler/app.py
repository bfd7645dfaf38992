"""Scheduler wiring: consume the intake queue, validate, record ``queued``, route by type.

Beside the intake it runs the reaper and dispatch pump (every ``reaper_interval_s``) and the
planner (every ``schedule_poll_s``): it fires due schedules and releases held tasks whose start
time came or whose parents' news was missed; parents' end events release children at once.
"""

from __future__ import annotations

import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from services.scheduler.dependencies import Dependencies
from services.scheduler.intake import IntakeDecision, decide
from services.scheduler.reaper import Reaper
from services.scheduler.schedules import ScheduleRunner
from shared.broker import Broker
from shared.constants import ROUTE_SUBMIT, SCHEDULER_PREFETCH
from shared.consuming import handle_delivery
from shared.events import state_event
from shared.gitinfo import head_commit
from shared.health import Beacon
from shared.periodic import Periodic
from shared.settings import Settings
from shared.store import StatusStore

log = structlog.get_logger(__name__)


class Scheduler:
    """The scheduler service.

    Ack policy: a delivery is acked only after its outcome is durable (task recorded and routed
    with a confirmed publish, or dead-lettered with its reason). A Redis or broker error nacks it
    back to the queue so nothing is lost; the scheduler never dies of a message.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.broker = Broker(settings, name="scheduler")
        self.store = StatusStore(settings)
        self._channel: AbstractChannel | None = None
        self.reaper = Reaper(settings, self.store, self.broker)
        self.dependencies = Dependencies(settings, self.store, self.broker, self.reaper.dispatch)
        self.schedules = ScheduleRunner(self.store, self.broker)
        self.planner = Periodic("planner", settings.schedule_poll_s, self.plan_once)
        self.beacon = Beacon(
            settings,
            self.store,
            self.broker,
            kind="scheduler",
            code_commit=head_commit(settings.checkout_dir),
        )

    async def start(self) -> None:
        await self.store.start()
        await self.broker.start()
        self._channel = await self.broker.consumer_channel(SCHEDULER_PREFETCH)
        queue = await self._channel.get_queue(self.broker.topology.queue(ROUTE_SUBMIT))
        await self.dependencies.start()
        await queue.consume(self.on_message)
        self.reaper.start()
        self.planner.start()
        self.beacon.start()

    async def stop(self) -> None:
        await self.beacon.stop()
        await self.planner.stop()
        await self.reaper.stop()
        await self.dependencies.stop()
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()
        self._channel = None
        await self.broker.stop()
        await self.store.stop()

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        await handle_delivery(
            message,
            self._handle,
            broker=self.broker,
            source_queue=self.broker.topology.queue(ROUTE_SUBMIT),
        )

    async def plan_once(self) -> None:
        """One planner pass: fire due schedules, then look at held tasks that are due."""
        await self.schedules.run_due()
        await self.dependencies.run_due()

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        decision = await decide(message, self.settings, self.store, self.dependencies)
        if decision.dead_letter_reason is not None:
            log.warning("message_dead_lettered", reason=decision.dead_letter_reason)
            await self.broker.dead_letter(
                message,
                decision.dead_letter_reason,
                source_queue=self.broker.topology.queue(ROUTE_SUBMIT),
            )
        else:
            if decision.route is not None and decision.submission is not None:
                await self.broker.publish_submission(decision.submission, decision.route)
            if decision.moved_to is not None:
                await self._announce(decision)
        await message.ack()

    async def _announce(self, decision: IntakeDecision) -> None:
        assert decision.submission is not None
        assert decision.moved_to is not None
        event = state_event(decision.submission.task_id, decision.moved_to, error=decision.error)
        await self.broker.announce(event)  # news: the record in Redis is already moved
        log.info(
            "task_" + decision.moved_to.value,
            task_id=decision.submission.task_id,
            task_type=decision.submission.task_type,
            route=decision.route,
            error=decision.error,
        )
