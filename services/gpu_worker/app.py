"""Worker wiring: a lane per queue it serves, a warm forkserver, graceful stop."""

from __future__ import annotations

import asyncio
from pathlib import Path

import structlog

from services.gpu_worker import runner
from services.gpu_worker.execution import WorkerEnv
from services.gpu_worker.lane import Lane
from shared.broker import Broker
from shared.constants import CHILD_EXIT_GRACE_S, ROUTE_CPU, ROUTE_GPU
from shared.errors import BrokerError, StoreError
from shared.gitinfo import head_commit
from shared.messages import TaskState
from shared.settings import Settings
from shared.store import StatusStore

log = structlog.get_logger(__name__)

#: On stop, how long running tasks get to finish before they are handed back to the queue (s).
STOP_GRACE_S = 5.0


class Worker:
    """The gpu-worker: ``worker_gpu_slots`` slots on the gpu queue, ``worker_cpu_slots`` on cpu."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.name = settings.worker_name
        self.store = StatusStore(settings)
        self.broker = Broker(settings, name=f"worker:{self.name}")
        self.lanes: list[Lane] = []
        self.env = WorkerEnv(
            settings,
            self.store,
            self.broker,
            self.name,
            code_commit=head_commit(Path(__file__).resolve().parent),
        )

    async def start(self) -> None:
        runner.warm_up()
        await self.store.start()
        await self.broker.start()
        for route, slots in (
            (ROUTE_GPU, self.settings.worker_gpu_slots),
            (ROUTE_CPU, self.settings.worker_cpu_slots),
        ):
            if slots > 0:
                lane = Lane(route, slots, self.env)
                await lane.start()
                self.lanes.append(lane)
        log.info("worker_ready", worker=self.name, lanes={ln.route: ln.slots for ln in self.lanes})

    async def stop(self) -> None:
        """Stop consuming; give running tasks ``STOP_GRACE_S``, then hand them back to the queue.

        Every step is bounded, so a worker told to stop while RabbitMQ or Redis is down still
        exits; a task it could not hand back keeps its expiring lease.
        """
        for lane in self.lanes:
            await lane.stop()
        idle = asyncio.gather(*(lane.wait_idle() for lane in self.lanes))
        try:
            await asyncio.wait_for(asyncio.shield(idle), STOP_GRACE_S)
        except TimeoutError:
            await self._hand_back()
            try:
                await asyncio.wait_for(idle, STOP_GRACE_S + CHILD_EXIT_GRACE_S)
            except TimeoutError:
                log.error("tasks_did_not_stop")
        for lane in self.lanes:
            await lane.close()
        self.lanes = []
        await self.broker.stop()
        await self.store.stop()

    async def _hand_back(self) -> None:
        for lane in self.lanes:
            for task_id, execution in list(lane.running.items()):
                execution.child.kill()
                try:
                    moved = await self.store.transition(
                        task_id,
                        [TaskState.RUNNING],
                        TaskState.QUEUED,
                        by=self.name,
                        fields={"+attempts": -1, "worker": "", "child_pid": "", "progress": ""},
                    )
                    if moved.applied:
                        await self.broker.publish_submission(execution.submission, lane.route)
                        await execution.announce(TaskState.QUEUED)
                        log.info("task_handed_back", task_id=task_id)
                except (StoreError, BrokerError) as e:
                    log.error("task_hand_back_failed", task_id=task_id, error=str(e))
