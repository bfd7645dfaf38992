"""The client's recurring schedules (``tradectl schedule ...``), a part of ``DistributedClient``."""

from __future__ import annotations

import socket
from typing import Any

import structlog

from shared.broker import Broker
from shared.constants import DEFAULT_PRIORITY
from shared.schedules import CronClock, Schedule, ScheduleSpec, ScheduleStore
from shared.settings import Settings
from shared.store import StatusStore
from shared.task_types import validate_config

log = structlog.get_logger(__name__)


class ScheduleOps:
    """Create, list, pause, resume and remove schedules kept in Redis; see ``DistributedClient``."""

    settings: Settings
    store: StatusStore
    broker: Broker

    async def add_schedule(
        self,
        name: str,
        cron: str,
        task_type: str,
        config: dict[str, Any] | None = None,
        *,
        timezone: str = "UTC",
        priority: int = DEFAULT_PRIORITY,
        time_limit_s: float | None = None,
        max_attempts: int | None = None,
        paused: bool = False,
    ) -> Schedule:
        """Create a recurring submission, kept in Redis and fired by the scheduler.

        Args:
            name: unique name (``[A-Za-z0-9][A-Za-z0-9_.-]*``).
            cron: five fields, or six with seconds last (``* * * * * */10``).
            task_type: a registered type.
            config: the type's config, validated now.
            timezone: IANA zone the expression is read in (default UTC).
            priority: as ``submit``, for every task it submits.
            time_limit_s: as ``submit`` (s).
            max_attempts: as ``submit``.
            paused: create it paused (``resume_schedule`` starts it).

        Returns:
            The schedule with its first due time.

        Raises:
            ScheduleError: a bad cron expression or zone, or the name is taken (the message
                names the field).
            UnknownTaskTypeError, TaskConfigError: a bad task.
            pydantic.ValidationError: a bad name or priority.
        """
        clock = CronClock(cron, timezone)
        config = validate_config(task_type, dict(config or {})).model_dump(mode="json")
        spec = ScheduleSpec(
            name=name,
            cron=clock.expr,
            timezone=timezone,
            task_type=task_type,
            config=config,
            priority=priority,
            time_limit_s=time_limit_s,
            max_attempts=max_attempts,
            created_by=socket.gethostname(),
        )
        schedules = ScheduleStore(self.store)
        first = clock.next_after(await self.store.now())
        await schedules.add(spec, next_due_at=first, paused=paused)
        return await schedules.get(name)

    async def schedules(self) -> list[Schedule]:
        """Every schedule by name, with its state (paused, next due, last firing)."""
        return await ScheduleStore(self.store).list_all()

    async def schedule(self, name: str) -> Schedule:
        """One schedule (``ScheduleNotFoundError`` if there is none of that name)."""
        return await ScheduleStore(self.store).get(name)

    async def schedule_runs(self, name: str, limit: int = 20) -> list[dict[str, Any]]:
        """A schedule's recent firings, newest first: ``{occurrence, task_id, fired_at}``."""
        return await ScheduleStore(self.store).runs(name, limit)

    async def pause_schedule(self, name: str) -> Schedule:
        """Stop firing a schedule until ``resume_schedule``."""
        return await ScheduleStore(self.store).set_paused(name, True)

    async def resume_schedule(self, name: str) -> Schedule:
        """Fire a paused schedule again from its next occurrence.

        Runs missed while it was paused are not made up.
        """
        schedules = ScheduleStore(self.store)
        spec = (await schedules.get(name)).spec
        due = CronClock(spec.cron, spec.timezone).next_after(await self.store.now())
        return await schedules.set_paused(name, False, next_due_at=due)

    async def remove_schedule(self, name: str) -> None:
        """Delete a schedule (the tasks it submitted stay)."""
        await ScheduleStore(self.store).remove(name)
