"""Worker wiring: a lane per queue it serves, a warm forkserver, graceful stop."""

from __future__ import annotations

import asyncio

import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from services.gpu_worker import runner
from services.gpu_worker.commits import CodeWatcher, CommitGate, short
from services.gpu_worker.execution import TaskExecution, WorkerEnv
from services.gpu_worker.heartbeat import Heartbeat
from services.gpu_worker.lane import Lane
from services.gpu_worker.outcome import StopReason
from shared.broker import Broker
from shared.constants import ROUTE_CPU, ROUTE_GPU
from shared.errors import DecodeError
from shared.gitinfo import head_commit
from shared.health import WORKER_KIND, Beacon, GpuReport, RunningTask, WorkerFacts, read_gpus
from shared.messages import CancelRequest, DrainRequest, decode, drain_routing_key
from shared.settings import CodeUpdate, Settings
from shared.store import StatusStore

log = structlog.get_logger(__name__)


class Worker:
    """The gpu-worker: ``worker_gpu_slots`` slots on the gpu queue, ``worker_cpu_slots`` on cpu."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.name = settings.worker_name
        self.store = StatusStore(settings)
        self.broker = Broker(settings, name=f"worker:{self.name}")
        self.lanes: list[Lane] = []
        self._control: AbstractChannel | None = None
        self.env = WorkerEnv(
            settings,
            self.store,
            self.broker,
            self.name,
            code_commit=head_commit(settings.checkout_dir),
        )
        self.heartbeat = Heartbeat(self.env, self.running)
        self.beacon = Beacon(
            settings,
            self.store,
            self.broker,
            kind=WORKER_KIND,
            name=self.name,
            code_commit=self.env.code_commit,
            extra=self.facts,
        )
        #: True from the moment the worker starts draining (stop signal or drain request).
        self.draining = False
        self.gate = CommitGate(self.env)
        self.code_watcher = CodeWatcher(self.env, self.on_new_commit)
        #: Set when the worker ends itself (new code, a drain request); ``exit_action`` says how
        #: to come back (None: it does not).
        self.finished = asyncio.Event()
        self.exit_action: CodeUpdate | None = None
        self._restart: asyncio.Task[None] | None = None

    def running(self) -> dict[str, TaskExecution]:
        """Every task this worker runs now, by id."""
        return {task_id: ex for lane in self.lanes for task_id, ex in lane.running.items()}

    async def facts(self) -> WorkerFacts:
        """What the worker's heartbeat adds: slots, running tasks, drain state, GPUs."""
        gpu: GpuReport = await asyncio.to_thread(read_gpus)
        return WorkerFacts(
            slots={lane.route: lane.slots for lane in self.lanes},
            running=[
                RunningTask(
                    task_id=task_id,
                    task_type=ex.submission.task_type,
                    lane=ex.route,
                    started_at=ex.started_at,
                )
                for task_id, ex in sorted(self.running().items())
            ],
            draining=self.draining,
            restart_pending=self.heartbeat.restart_pending,
            gpu=gpu,
        )

    async def start(self) -> None:
        runner.warm_up(self.settings.worker_preload)
        await asyncio.to_thread(runner.wait_until_warm)
        await self.store.start()
        await self.beacon.ensure_unique()
        await self.broker.start()
        for route, slots in (
            (ROUTE_GPU, self.settings.worker_gpu_slots),
            (ROUTE_CPU, self.settings.worker_cpu_slots),
        ):
            if slots > 0:
                lane = Lane(route, slots, self.env, self.gate)
                await lane.start()
                self.lanes.append(lane)
        self._control = await self.broker.follow_control(
            ["task.cancel", drain_routing_key(self.name), drain_routing_key(None)],
            self.on_control,
        )
        self.heartbeat.start()
        self.beacon.start()
        if self.settings.worker_code_update != "ignore":
            self.code_watcher.start()
        log.info(
            "worker_ready",
            worker=self.name,
            lanes={ln.route: ln.slots for ln in self.lanes},
            code_commit=self.env.code_commit,
        )

    async def on_new_commit(self, head: str) -> None:
        """The checkout moved: take no new task, let running ones finish, then end for a restart.

        Never mid-task: the running tasks have no time limit here beyond their own.
        """
        log.info(
            "code_updated_restart_pending",
            loaded=short(self.env.code_commit),
            checkout=short(head),
            running=sorted(self.running()),
        )
        self.heartbeat.restart_pending = True
        self._restart = asyncio.create_task(self._restart_when_idle(), name="restart")

    async def _restart_when_idle(self) -> None:
        for lane in self.lanes:
            await lane.stop()
        # Shielded: cancelling this wait (a stop signal) must never cancel the running tasks.
        await asyncio.shield(asyncio.gather(*(lane.wait_idle() for lane in self.lanes)))
        log.info("worker_restarting_for_new_code", how=self.settings.worker_code_update)
        self.finished.set()
        self.exit_action = self.settings.worker_code_update

    async def on_control(self, message: AbstractIncomingMessage) -> None:
        """A control command: ``task.cancel`` or a drain request (``worker.<name|all>.drain``)."""
        max_bytes = self.settings.max_message_bytes
        try:
            if message.routing_key == "task.cancel":
                self.on_cancel(decode(message.body, CancelRequest, max_bytes=max_bytes))
            else:
                self.on_drain(decode(message.body, DrainRequest, max_bytes=max_bytes))
        except DecodeError as e:
            log.warning("control_message_undecodable", key=message.routing_key, error=str(e))

    def on_cancel(self, request: CancelRequest) -> None:
        """Stop the task if it runs here (other workers ignore the request)."""
        execution = self.running().get(request.task_id)
        if execution is not None:
            execution.request_stop(StopReason.CANCEL)

    def on_drain(self, request: DrainRequest) -> None:
        """Drain as on SIGTERM, then exit 0: end the service through ``finished``.

        ``run_until_signalled`` then calls ``stop`` (the drain). A drain request overrides a
        pending restart on new code, as a stop signal does: the worker ends, it does not come back.
        Synchronous on purpose: nothing can run between cancelling the restart and clearing
        ``exit_action``.
        """
        if not request.is_for(self.name):
            return
        log.info("drain_requested", worker=self.name, requested_by=request.requested_by)
        if self._restart is not None and not self._restart.done():
            self._restart.cancel()
        self.exit_action = None
        self.finished.set()

    async def stop(self) -> None:
        """Drain, then close.

        Stops consuming, lets running tasks finish within ``drain_timeout_s``, then asks them to
        stop (SIGTERM, ``cancel_grace_s``, SIGKILL) and hands them back to the queue.

        Every step is bounded, so a worker told to stop while RabbitMQ or Redis is down still
        exits; a task it could not hand back keeps its expiring lease and the reaper requeues it.
        """
        s = self.settings
        if self._restart is not None and not self._restart.done():
            # A stop signal while a restart waits for running tasks wins: the worker drains and
            # exits (status 0) instead of coming back.
            self._restart.cancel()
            await asyncio.gather(self._restart, return_exceptions=True)
            self.exit_action = None
        self.draining = True
        await self.code_watcher.stop()
        for lane in self.lanes:
            await lane.stop()
        idle = asyncio.gather(*(lane.wait_idle() for lane in self.lanes))
        try:
            await asyncio.wait_for(asyncio.shield(idle), s.drain_timeout_s)
        except TimeoutError:
            for execution in self.running().values():
                execution.request_stop(StopReason.DRAIN)
            try:
                # The rest of the longest stop a supervisor waits for (worker_stop_bound_s).
                await asyncio.wait_for(idle, s.worker_stop_bound_s - s.drain_timeout_s)
            except TimeoutError:
                log.error("tasks_did_not_stop")
        await self.heartbeat.stop()
        await self.beacon.stop()
        for lane in self.lanes:
            await lane.close()
        self.lanes = []
        await self.broker.close_channel(self._control)
        self._control = None
        await self.broker.stop()
        await self.store.stop()
        await runner.close_idle()
        runner.shut_down()
