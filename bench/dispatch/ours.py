"""Our side: the scheduler and a gpu_worker as processes, driven by an in-process client."""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from aio_pika.abc import AbstractIncomingMessage

from bench.soak.queues import wait_for_consumers
from shared.admin import delete_namespace
from shared.client import DistributedClient
from shared.errors import DecodeError
from shared.messages import TaskEvent, TaskState, decode
from shared.settings import Settings, service_environment
from shared.store import TaskRecord
from shared.topology import Topology

from .constants import (
    CANCEL_STEP_S,
    CANCEL_TASK_SLEEP_S,
    CANCEL_TIMEOUT_S,
    PID_POLL_S,
    RESULT_TIMEOUT_S,
    START_POLL_S,
    START_TIMEOUT_S,
    SlotConfig,
)
from .processes import Service, pid_gone
from .timing import Batch, Cancels, Timing

#: The terminal states' events a batch listens to (``task.<state>.<id>``).
TERMINAL_KEYS = ("task.completed.*", "task.failed.*", "task.cancelled.*")


def timing_of(submitted: float, record: TaskRecord, received: float) -> Timing | None:
    """The task's timing from its record's result; None if it did not complete."""
    result = record.result or {}
    if record.state is not TaskState.COMPLETED or "started_at" not in result:
        return None
    return Timing(submitted, float(result["started_at"]), float(result["returned_at"]), received)


class ResultWatcher:
    """Follows every task's end in the namespace on one queue, as ``wait_on`` does for one.

    On each terminal state event it takes the task's record from the event (the worker pushes
    it, read in the same step as the move) or, for one without, reads it from Redis, as the
    client's ``wait`` does; ``received`` is the clock once the record is in hand.
    """

    def __init__(self, client: DistributedClient) -> None:
        self.client = client
        self.submitted: dict[str, float] = {}
        self.records: dict[str, tuple[TaskRecord, float]] = {}
        self.expected = 0
        self.done = asyncio.Event()
        self._reads: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> ResultWatcher:
        broker = self.client.broker
        self._channel = await broker.connection.channel()
        queue = await self._channel.declare_queue(
            broker.topology.private_queue("bench"), exclusive=True, auto_delete=True
        )
        events = await self._channel.get_exchange(broker.topology.events_exchange)
        for key in TERMINAL_KEYS:
            await queue.bind(events, routing_key=key)
        await queue.consume(self._on_message, no_ack=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._channel.close()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            event = decode(
                message.body, TaskEvent, max_bytes=self.client.settings.max_message_bytes
            )
        except DecodeError:
            return
        if event.task_id not in self.submitted or event.task_id in self.records:
            return
        if event.record:
            self._keep(event.task_id, TaskRecord.from_hash(event.record))
        else:
            read = asyncio.create_task(self._read(event.task_id))
            self._reads.add(read)
            read.add_done_callback(self._reads.discard)

    async def _read(self, task_id: str) -> None:
        self._keep(task_id, await self.client.store.get(task_id))

    def _keep(self, task_id: str, record: TaskRecord) -> None:
        if record.state.is_terminal and task_id not in self.records:
            self.records[task_id] = (record, time.time())
            if len(self.records) >= self.expected:
                self.done.set()


class Ours:
    """Our scheduler and worker in one configuration, in a namespace of their own."""

    name = "ours"

    def __init__(
        self, cfg: SlotConfig, settings: Settings, log_dir: Path, *, submit_concurrency: int
    ) -> None:
        self.cfg = cfg
        self.settings = settings
        self.log_dir = log_dir
        self.submit_concurrency = submit_concurrency
        self.services: list[Service] = []
        self.client = DistributedClient(settings, name="bench-dispatch")

    def probe(
        self, sleep_s: float, steps: int = 1, *, report_steps: bool = False
    ) -> dict[str, Any]:
        """A probe config: by default the plain no-op of Celery's side (no progress, checkpoint)."""
        return {
            "sleep_s": sleep_s,
            "steps": steps,
            "needs_gpu": self.cfg.needs_gpu,
            "report_steps": report_steps,
        }

    async def start(self) -> None:
        env = service_environment(
            self.settings,
            os.environ,
            TP_WORKER_NAME=f"bench-{self.cfg.name}",
            TP_FALLBACK="never",
            **self.cfg.worker_env,
        )
        for module in ("scheduler", "gpu_worker"):
            argv = [sys.executable, "-m", f"services.{module}"]
            log_path = self.log_dir / f"ours-{self.cfg.name}-{module}.log"
            self.services.append(Service(argv, env, log_path))
        topo = Topology(self.settings.namespace)
        want = {topo.queue("submit"): 1, topo.queue(self.cfg.name): 1}
        try:
            await wait_for_consumers(self.settings, want, START_TIMEOUT_S)
        except TimeoutError as e:
            tails = "\n".join(f"--- {s.log_path.name}\n{s.tail()}" for s in self.services)
            raise RuntimeError(f"our services did not start: {e}\n{tails}") from e
        await self.client.connect()

    async def stop(self) -> None:
        try:
            await self.client.close()
        except Exception as e:  # say so; the processes and the namespace must still go
            print(f"!! closing our client failed: {e}", flush=True)
        for service in self.services:
            await asyncio.to_thread(service.stop)
        await delete_namespace(self.settings)

    async def batch(self, n: int, sleep_s: float) -> Batch:
        sem = asyncio.Semaphore(self.submit_concurrency)
        async with ResultWatcher(self.client) as watcher:
            watcher.expected = n

            async def submit(task_id: str) -> None:
                async with sem:
                    watcher.submitted[task_id] = time.time()
                    await self.client.submit("probe", self.probe(sleep_s), task_id=task_id)

            t0 = time.perf_counter()
            await asyncio.gather(*(submit(str(uuid.uuid4())) for _ in range(n)))
            async with asyncio.timeout(RESULT_TIMEOUT_S):
                await watcher.done.wait()
            wall = time.perf_counter() - t0
        timings = [
            timing_of(watcher.submitted[tid], record, received)
            for tid, (record, received) in watcher.records.items()
        ]
        done = [t for t in timings if t is not None]
        return Batch(wall, done, failed=n - len(done))

    async def _one_waited(self, out: list[Timing | None]) -> None:
        """Subscribe, submit and wait for one task with the client's public calls."""
        task_id = str(uuid.uuid4())
        async with self.client.subscribed(task_id) as queue:
            submitted = time.time()
            await self.client.submit("probe", self.probe(0.0), task_id=task_id)
            record = await self.client.wait_on(queue, task_id, None)
            out.append(timing_of(submitted, record, time.time()))

    async def spaced(self, n: int, gap_s: float) -> list[Timing]:
        out: list[Timing | None] = []
        running: list[asyncio.Task[None]] = []
        t0 = time.perf_counter()
        for i in range(n):
            await asyncio.sleep(max(0.0, t0 + i * gap_s - time.perf_counter()))
            running.append(asyncio.create_task(self._one_waited(out)))
        async with asyncio.timeout(RESULT_TIMEOUT_S):
            await asyncio.gather(*running)
        return [t for t in out if t is not None]

    async def _running_pid(self, task_id: str) -> int:
        """Wait until the task runs and its child's pid is recorded; the pid."""
        async with asyncio.timeout(START_TIMEOUT_S):
            while True:
                record = await self.client.status(task_id)
                if record.state is TaskState.RUNNING and record.child_pid:
                    return record.child_pid
                if record.state.is_terminal:
                    raise RuntimeError(f"cancel task {task_id} ended first: {record.state}")
                await asyncio.sleep(START_POLL_S)

    async def cancels(self, n: int) -> Cancels:
        out = Cancels()
        steps = round(CANCEL_TASK_SLEEP_S / CANCEL_STEP_S)
        for _ in range(n):
            task_id = str(uuid.uuid4())
            await self.client.submit(
                # Stepped, as Celery's cancel task is: a stop is seen between two steps.
                "probe",
                self.probe(CANCEL_TASK_SLEEP_S, steps, report_steps=True),
                task_id=task_id,
            )
            pid = await self._running_pid(task_id)
            t0 = time.time()
            try:
                async with asyncio.timeout(CANCEL_TIMEOUT_S):
                    state_at, gone_at = await asyncio.gather(
                        self._cancelled_at(task_id), wait_gone(pid)
                    )
            except TimeoutError:
                out.timed_out += 1
                out.notes.append(f"{task_id}: not cancelled and gone in {CANCEL_TIMEOUT_S:g} s")
                continue
            out.state_s.append(state_at - t0)
            out.gone_s.append(gone_at - t0)
            out.latencies_s.append(max(state_at, gone_at) - t0)
        return out

    async def _cancelled_at(self, task_id: str) -> float:
        result = await self.client.cancel(task_id, wait_s=CANCEL_TIMEOUT_S)
        if result.outcome != "cancelled":
            raise RuntimeError(f"cancel of {task_id}: {result.outcome}")
        return time.time()


async def wait_gone(pid: int) -> float:
    """Poll until ``pid`` is gone (every ``PID_POLL_S``); the wall clock then."""
    while not pid_gone(pid):  # noqa: ASYNC110 - nothing to wait on but /proc
        await asyncio.sleep(PID_POLL_S)
    return time.time()
