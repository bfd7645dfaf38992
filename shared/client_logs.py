"""The client's reading of task output (``tradectl task logs``), a part of ``DistributedClient``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import structlog

from shared.broker import Broker
from shared.errors import (
    StoreError,
    TaskNotFoundError,
)
from shared.logstream import LogLine, read_after
from shared.settings import Settings
from shared.store import StatusStore

log = structlog.get_logger(__name__)

#: Following a task's log, the longest ``XREAD BLOCK`` (s): how late the end of a silent task is
#: noticed (the record is read between two blocks). Well under the Redis socket timeout.
LOG_FOLLOW_BLOCK_S = 0.5
#: Following a task's log while Redis is away, the pause between two tries (s).
LOG_FOLLOW_RETRY_S = 1.0


class LogOps:
    """Read and follow a task's output lines; see ``DistributedClient``."""

    settings: Settings
    store: StatusStore
    broker: Broker

    async def follow_logs(self, task_id: str, *, follow: bool = False) -> AsyncIterator[LogLine]:
        """The task's output lines, oldest first (``tradectl task logs``).

        Lines are those its runs wrote to stdout and stderr and its log records, each with
        ``ts`` (Unix s), ``stream`` (``stdout``, ``stderr``, ``log``), ``attempt`` and ``text``;
        see ``shared.logstream``. The stream keeps about the last ``TP_TASK_LOG_MAX_LINES``.

        Args:
            task_id: the task (or a unique prefix).
            follow: keep reading new lines (``XREAD BLOCK``) until the task is ``completed``,
                ``failed`` or ``cancelled`` and every line is read; else stop at the last line
                stored now. While following, a Redis outage is waited out (tried again every
                ``LOG_FOLLOW_RETRY_S``), resuming after the last line read.

        Raises:
            TaskNotFoundError: no such task (checked first).
            StoreError: Redis failed (when not following).
        """
        task_id = await self.store.resolve_id(task_id)
        key, after = self.store.keys.task_logs(task_id), "0-0"
        ended, failing = not follow, False
        while True:
            try:
                ended, lines = await self._next_log_lines(task_id, key, after, ended=ended)
            except TaskNotFoundError:
                raise
            except StoreError as e:
                if not follow:
                    raise
                if not failing:  # once per outage
                    log.warning("log_follow_waiting_for_redis", task_id=task_id, error=str(e))
                failing = True
                await asyncio.sleep(LOG_FOLLOW_RETRY_S)
                continue
            failing = False
            for line in lines:
                yield line
            after = lines[-1].id if lines else after
            if ended and not lines:
                return

    async def _next_log_lines(
        self, task_id: str, key: str, after: str, *, ended: bool
    ) -> tuple[bool, list[LogLine]]:
        """``(ended, lines after `after`)``; blocks for new lines until the task has ended.

        The worker writes a run's last lines before it records the run's end, so once the record
        is terminal, reading on until no line is left drains the stream.
        """
        ended = ended or (await self.store.get(task_id)).state.is_terminal
        block_s = None if ended else LOG_FOLLOW_BLOCK_S
        return ended, await read_after(self.store.redis, key, after, block_s=block_s)
