"""A duty run every few seconds in a service's event loop (heartbeat, reaper)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog

from shared.errors import BrokerError, StoreError

log = structlog.get_logger(__name__)


class Periodic:
    """Runs ``duty()`` every ``interval_s`` seconds until stopped.

    A pass that fails because Redis or the broker is away is logged (``<name>_failed``) and the
    next pass runs on schedule; any other exception is a bug and ends the loop loudly.

    Args:
        name: task name and log event prefix.
        interval_s: pause between passes (s).
        duty: the coroutine function run each pass.
    """

    def __init__(self, name: str, interval_s: float, duty: Callable[[], Awaitable[None]]) -> None:
        self.name = name
        self.interval_s = interval_s
        self._duty = duty
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def running(self) -> bool:
        """True between ``start`` and ``stop``."""
        return self._task is not None

    def start(self) -> None:
        """Begin the loop (first pass at once)."""
        self._stopping = False
        self._task = asyncio.create_task(self._loop(), name=self.name)

    async def stop(self) -> None:
        """End the loop and wait for it to end.

        The loop is cancelled again every second until it has ended: a cancellation can be
        lost inside a duty (Python 3.11's ``asyncio.wait_for`` drops one that arrives just as
        its inner call completes; 3.12 rewrote it), and the loop would then run on for ever.
        """
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)

    async def _loop(self) -> None:
        while not self._stopping:
            try:
                await self._duty()
            except (StoreError, BrokerError) as e:
                log.warning(f"{self.name}_failed", error=str(e))
            except Exception:
                log.exception(f"{self.name}_crashed")  # a bug: say so before the loop ends
                raise
            await asyncio.sleep(self.interval_s)
