"""The worker's lease heartbeat: renew every running task's lease.

Each beat (every ``lease_s / 3``) renews the lease of each task this worker runs (the worker's
own liveness report is its ``shared.health.Beacon``). The renewal
answers with the task's state, so the worker also learns here of a cancel whose control message
it missed (``cancelling``), and of a task that is no longer its own (reaped after a partition):
that one is stopped at once, so a task never runs twice.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from services.gpu_worker.execution import TaskExecution, WorkerEnv
from services.gpu_worker.outcome import StopReason
from shared.messages import TaskState
from shared.periodic import Periodic

log = structlog.get_logger(__name__)


class Heartbeat:
    """Periodic lease renewal for one worker's running tasks.

    Args:
        env: the worker's settings and connections.
        running: returns the worker's running executions by task id.
    """

    def __init__(self, env: WorkerEnv, running: Callable[[], dict[str, TaskExecution]]) -> None:
        self.env = env
        self._running = running
        #: True once the worker waits to restart on new code (it takes no new task).
        self.restart_pending = False
        # A beat every third of the lease, so two lost beats still keep it.
        self._periodic = Periodic("heartbeat", env.settings.lease_s / 3, self.beat)

    def start(self) -> None:
        self._periodic.start()

    async def stop(self) -> None:
        await self._periodic.stop()

    async def beat(self) -> None:
        """Renew leases, act on cancels and lost tasks."""
        s = self.env.settings
        running = self._running()
        for task_id, execution in list(running.items()):
            if execution.finishing:
                continue  # its outcome is being recorded; the lease ends with it
            state = await self.env.store.renew_lease(task_id, self.env.name, s.lease_s)
            if state is TaskState.CANCELLING:
                execution.request_stop(StopReason.CANCEL)
            elif state is None and not execution.finishing:
                log.warning("lease_lost", task_id=task_id)
                execution.request_stop(StopReason.LOST)
                execution.child.kill()
