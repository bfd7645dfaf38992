"""Firing recurring schedules: one task per occurrence, however many schedulers or restarts.

Every ``schedule_poll_s`` the scheduler reads the schedules (a handful of hashes) and fires each
one not paused whose ``next_due_at`` passed on the Redis clock:
    1. the occurrence fired is the latest one at or before now: occurrences missed while no
       scheduler ran are coalesced into this one run (APScheduler's ``coalesce``; the number
       skipped is logged and kept in the firing's record);
    2. the task's id is ``uuid5(schedule id, occurrence)``; it is recorded ``submitted`` and
       published to intake as a client would, republished only while still ``submitted`` (an
       earlier publish may have been lost), so a second firing of one occurrence, by another
       scheduler or after a crash, is the same task;
    3. only then the firing is recorded and ``next_due_at`` moves to the first occurrence after
       now, as one compare-and-set on the old ``next_due_at``: a crash before it fires the same
       occurrence (the same task) again, never a new one.
Schedule tasks are not pinned to a commit: a nightly job runs the desktop's current code.
"""

from __future__ import annotations

import time

import structlog
from pydantic import ValidationError

from shared.broker import Broker
from shared.errors import BrokerError, ScheduleError, StoreError
from shared.messages import TaskState, TaskSubmission
from shared.schedules import CronClock, Schedule, ScheduleStore, format_utc, schedule_task_id
from shared.store import StatusStore

log = structlog.get_logger(__name__)


class ScheduleRunner:
    """Fires due schedules (call ``start`` after the store is connected)."""

    def __init__(self, store: StatusStore, broker: Broker) -> None:
        self.store = store
        self.broker = broker
        self._schedules: ScheduleStore | None = None

    @property
    def schedules(self) -> ScheduleStore:
        """The schedule store (its scripts are registered on the started connection)."""
        if self._schedules is None:
            self._schedules = ScheduleStore(self.store)
        return self._schedules

    async def run_due(self) -> None:
        """Fire every due schedule (one failing does not block the others)."""
        now = await self.store.now()
        for schedule in await self.schedules.list_all():
            due = schedule.next_due_at
            if schedule.paused or due is None or due > now:
                continue
            try:
                await self.fire(schedule, now)
            except (StoreError, BrokerError) as e:
                log.error("schedule_fire_failed", schedule=schedule.name, error=str(e))
            except (ScheduleError, ValidationError) as e:  # a spec stored by an older version
                log.error("schedule_invalid", schedule=schedule.name, error=str(e))
            except Exception:  # one bad schedule must not end the planner for the others
                log.exception("schedule_fire_crashed", schedule=schedule.name)

    async def fire(self, schedule: Schedule, now: float) -> str:
        """Submit the task of the latest due occurrence and move the schedule on.

        Args:
            schedule: as read, with a ``next_due_at`` at or before ``now``.
            now: the Redis clock (Unix s).

        Returns:
            The task id of this occurrence.
        """
        spec = schedule.spec
        clock = CronClock(spec.cron, spec.timezone)
        due = schedule.next_due_at if schedule.next_due_at is not None else now
        occurrence = max(due, clock.latest_at_or_before(now))
        missed = clock.between(due, occurrence) - 1 if occurrence > due else 0
        task_id = schedule_task_id(spec, occurrence)
        submission = TaskSubmission(
            task_id=task_id,
            task_type=spec.task_type,
            config=spec.config,
            priority=spec.priority,
            submitted_at=time.time(),
            submitted_by=f"schedule:{spec.name}",
            idempotency_key=f"schedule:{spec.schedule_id}:{occurrence:.3f}",
            timeout_s=spec.time_limit_s,
            max_attempts=spec.max_attempts,
        )
        created = await self.store.create(submission)
        if created or (await self.store.get(task_id)).state is TaskState.SUBMITTED:
            await self.broker.publish_submission(submission)
        advanced = await self.schedules.advance(
            schedule,
            occurrence=occurrence,
            task_id=task_id,
            next_due_at=clock.next_after(max(now, occurrence)),
            fired_at=now,
            missed=missed,
        )
        log.info(
            "schedule_fired",
            schedule=spec.name,
            task_id=task_id,
            occurrence=format_utc(occurrence),
            late_s=round(now - occurrence, 3),
            missed=missed,
            recorded=advanced,
        )
        return task_id
