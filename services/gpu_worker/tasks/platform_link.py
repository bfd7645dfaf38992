"""A task's own line to the platform from its child process: task records, submits, cancels.

For tasks that work with the platform itself (``hyperopt`` submits its trial tasks and watches
them). The worker's settings reach the task as ``TaskContext.settings``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from shared.client import DistributedClient
from shared.events import state_event
from shared.messages import TaskState
from shared.settings import Settings
from shared.store import StatusStore, TaskRecord

T = TypeVar("T")


class PlatformLink:
    """A task's own line to the platform from its child process: task records and submits.

    Redis is held open on a private event loop, used from the task's thread between trials.
    RabbitMQ is connected only for a submit or a cancel: an idle AMQP connection on a loop
    that does not run would miss its heartbeats.

    Args:
        settings: the worker's settings; the commit check is off (trial tasks are pinned to
            their hyperopt task's commit explicitly).
        by: who makes the changes, in the task histories (``hyperopt:<task id>``).
    """

    def __init__(self, settings: Settings, by: str) -> None:
        self.settings = settings.model_copy(update={"commit_check": "off"})
        self.by = by
        self._loop = asyncio.new_event_loop()
        self.store = StatusStore(self.settings)
        try:
            self._run(self.store.start())
        except BaseException:
            self._loop.close()
            raise

    def _run(self, step: Awaitable[T]) -> T:
        return self._loop.run_until_complete(step)

    def close(self) -> None:
        """Close Redis and the loop."""
        if not self._loop.is_closed():
            self._run(self.store.stop())
            self._loop.close()

    def record(self, task_id: str) -> TaskRecord:
        """A task's record (``TaskNotFoundError`` when there is none)."""
        return self._run(self.store.get(task_id))

    def states(self, task_ids: list[str]) -> dict[str, TaskState]:
        """The state of each task that has a record."""
        records = self._run(self.store.get_many(task_ids))
        return {r.task_id: r.state for r in records}

    def submit(self, task_type: str, configs: dict[str, dict[str, Any]], like: TaskRecord) -> None:
        """Submit one task per ``task id -> config``, idempotently, with ``like``'s settings.

        Priority, time limit, attempts and pinned commit are those of ``like``.
        """

        async def submit_all() -> None:
            async with DistributedClient(self.settings, name=self.by) as client:
                for task_id, config in configs.items():
                    await client.submit(
                        task_type,
                        config,
                        task_id=task_id,
                        priority=like.priority,
                        git_commit=like.git_commit,
                        time_limit_s=like.timeout_s,
                        max_attempts=like.max_attempts,
                    )

        self._run(submit_all())

    def cancel_unstarted(self, task_ids: list[str], reason: str) -> list[str]:
        """Cancel the tasks of ``task_ids`` not running yet (submitted or queued); returns them.

        A queued task's delivery is then dropped at its claim: it never runs.
        """

        async def cancel_all() -> list[str]:
            cancelled = []
            for task_id in task_ids:
                moved = await self.store.transition(
                    task_id,
                    [TaskState.SUBMITTED, TaskState.QUEUED],
                    TaskState.CANCELLED,
                    by=self.by,
                    reason=reason,
                    fields={"waiting": ""},
                )
                if moved.applied:
                    cancelled.append(task_id)
            if cancelled:
                async with DistributedClient(self.settings, name=self.by) as client:
                    for task_id in cancelled:
                        await client.broker.publish_event(state_event(task_id, TaskState.CANCELLED))
            return cancelled

        return self._run(cancel_all())
