"""The reaper and the dispatch pump: the scheduler's periodic duties.

Every ``reaper_interval_s``:
    1. tasks whose lease expired (worker killed, machine off, network gone) are reaped in one
       Lua step each: ``running -> queued`` (due for dispatch now), or ``failed`` "worker lost N
       times" once ``max_attempts`` runs were started, or ``cancelling -> cancelled``;
    2. queued tasks whose dispatch is due (retries after their back-off, reaped tasks, tasks a
       draining worker handed back) are published to their queue, then crossed off. Due times
       live in Redis, never as unacked messages held in memory.
"""

from __future__ import annotations

import asyncio

import structlog

from shared.broker import Broker
from shared.errors import BrokerError, StoreError, TaskError, TaskNotFoundError
from shared.events import state_event
from shared.messages import TaskState
from shared.periodic import Periodic
from shared.settings import Settings
from shared.store import StatusStore
from shared.task_types import route_of

log = structlog.get_logger(__name__)


class Reaper:
    """Runs the reaper and the dispatch pump in the scheduler's event loop."""

    def __init__(self, settings: Settings, store: StatusStore, broker: Broker) -> None:
        self.settings = settings
        self.store = store
        self.broker = broker
        self._periodic = Periodic("reaper", settings.reaper_interval_s, self.run_once)
        # One dispatch at a time in this process: the pump and a release's immediate dispatch
        # must not both publish a task before either crossed it off.
        self._dispatching = asyncio.Lock()

    def start(self) -> None:
        self._periodic.start()

    async def stop(self) -> None:
        await self._periodic.stop()

    async def run_once(self) -> None:
        """One pass: reap expired leases, then dispatch what is due."""
        await self.reap_expired()
        await self.dispatch_due()

    async def reap_expired(self) -> None:
        """Act on every expired lease (a task that fails to reap does not block the others)."""
        for task_id in await self.store.expired_leases():
            try:
                await self._reap_one(task_id)
            except (StoreError, BrokerError) as e:
                log.error("reap_failed", task_id=task_id, error=str(e))

    async def _reap_one(self, task_id: str) -> None:
        outcome, attempts = await self.store.reap(task_id, self.settings.max_attempts)
        if outcome in ("alive", "gone"):
            return
        log.warning("lease_expired", task_id=task_id, outcome=outcome, attempts=attempts)
        if outcome != "queued":
            record = await self.store.get(task_id)
            await self._announce(task_id, TaskState(outcome), record.error)

    async def dispatch_due(self) -> None:
        """Publish every queued task whose dispatch is due (one failure does not block others)."""
        async with self._dispatching:
            for task_id in await self.store.due_dispatches():
                try:
                    await self._dispatch_one(task_id)
                except (StoreError, BrokerError) as e:
                    log.error("dispatch_failed", task_id=task_id, error=str(e))

    async def dispatch(self, task_id: str) -> None:
        """Publish one task now if its dispatch is still pending (a task just released).

        Raises:
            StoreError, BrokerError: it stays due, and the pump publishes it on its next pass.
        """
        async with self._dispatching:
            if await self.store.dispatch_pending(task_id):
                await self._dispatch_one(task_id)

    async def _dispatch_one(self, task_id: str) -> None:
        try:
            record = await self.store.get(task_id)
        except TaskNotFoundError:
            await self.store.dispatched(task_id)
            return
        if record.state is TaskState.QUEUED:
            submission = record.to_submission()
            try:
                route = route_of(submission.task_type, submission.config)
            except TaskError as e:  # cannot happen for a task that was queued once
                log.error("dispatch_impossible", task_id=task_id, error=str(e))
                return
            await self.broker.publish_submission(submission, route)
            if not record.waiting:  # a held-back task offered again is not news
                await self._announce(task_id, TaskState.QUEUED, None)
            log.info("task_dispatched", task_id=task_id, attempts=record.attempts)
        await self.store.dispatched(task_id)

    async def _announce(self, task_id: str, state: TaskState, error: str | None) -> None:
        await self.broker.announce(state_event(task_id, state, error=error))
