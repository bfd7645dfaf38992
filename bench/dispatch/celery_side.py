"""Celery's side: a Celery 5 worker on the same RabbitMQ and Redis, driven from this process.

Celery's client calls block, so each measurement runs in a thread (``asyncio.to_thread``) while
nothing else runs on the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import redis

from .celery_app import CeleryRun, make_app
from .constants import (
    CANCEL_STEP_S,
    CANCEL_TASK_SLEEP_S,
    CANCEL_TIMEOUT_S,
    CELERY_TASK_NAME,
    PID_POLL_S,
    RESULT_TIMEOUT_S,
    START_POLL_S,
    START_TIMEOUT_S,
    SlotConfig,
)
from .processes import Service, pid_gone
from .timing import Batch, Cancels, Timing

#: Threads waiting for results in the spaced run (each task's wait is short: a few ms).
SPACED_WAITERS = 16


def timing_of(submitted: float, value: Any, received: float) -> Timing | None:
    """The task's timing from its result; None if it did not return one (it failed)."""
    if not isinstance(value, dict) or "started_at" not in value:
        return None
    return Timing(submitted, float(value["started_at"]), float(value["returned_at"]), received)


class CelerySide:
    """A Celery worker (prefork, ``cfg.slots`` processes) and the client app of this process."""

    name = "celery"

    def __init__(self, cfg: SlotConfig, run: CeleryRun, log_dir: Path) -> None:
        self.cfg = cfg
        self.run = run
        self.log_dir = log_dir
        self.app = make_app(run)
        self.worker: Service | None = None

    def _argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "bench.dispatch.celery_app",
            "worker",
            "--pool",
            "prefork",
            "--concurrency",
            str(self.cfg.slots),
            "--loglevel",
            "WARNING",
            "--without-gossip",
            "--without-mingle",
            "--hostname",
            f"{self.run.prefix}-{self.cfg.name}@%h",
        ]

    async def start(self) -> None:
        env = {**os.environ, **self.run.env(), "PYTHONUNBUFFERED": "1"}
        log_path = self.log_dir / f"celery-{self.cfg.name}-worker.log"
        self.worker = Service(self._argv(), env, log_path)
        await asyncio.to_thread(self._wait_ready)

    def _wait_ready(self) -> None:
        """Ping the worker over its control exchange until it answers."""
        assert self.worker is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if not self.worker.running():
                break
            if self.app.control.ping(timeout=0.5):
                return
        raise RuntimeError(f"the Celery worker did not start:\n{self.worker.tail()}")

    async def stop(self) -> None:
        if self.worker is not None:
            await asyncio.to_thread(self.worker.stop)
        await asyncio.to_thread(self.app.close)
        await delete_celery_run(self.run)

    def _send(self, sleep_s: float, steps: int = 1) -> Any:
        return self.app.send_task(CELERY_TASK_NAME, kwargs={"sleep_s": sleep_s, "steps": steps})

    async def batch(self, n: int, sleep_s: float) -> Batch:
        return await asyncio.to_thread(self._batch, n, sleep_s)

    def _batch(self, n: int, sleep_s: float) -> Batch:
        """Send ``n`` tasks in a loop, then ``join_native``: results arrive by Redis pub/sub."""
        from celery.result import ResultSet

        submitted: dict[str, float] = {}
        received: dict[str, tuple[Any, float]] = {}
        results = []
        t0 = time.perf_counter()
        for _ in range(n):
            ts = time.time()
            result = self._send(sleep_s)
            submitted[result.id] = ts
            results.append(result)

        def on_result(task_id: str, value: Any) -> None:
            received[task_id] = (value, time.time())

        ResultSet(results).join_native(
            timeout=RESULT_TIMEOUT_S, propagate=False, callback=on_result
        )
        wall = time.perf_counter() - t0
        timings = [timing_of(submitted[t], v, at) for t, (v, at) in received.items()]
        done = [t for t in timings if t is not None]
        return Batch(wall, done, failed=n - len(done))

    async def spaced(self, n: int, gap_s: float) -> list[Timing]:
        return await asyncio.to_thread(self._spaced, n, gap_s)

    def _spaced(self, n: int, gap_s: float) -> list[Timing]:
        """Send one task every ``gap_s``; a pool of threads waits for each with ``get``."""
        out: list[Timing | None] = []
        lock = threading.Lock()

        def wait_one(result: Any, submitted: float) -> None:
            value = result.get(timeout=RESULT_TIMEOUT_S, propagate=False)
            timing = timing_of(submitted, value, time.time())
            with lock:
                out.append(timing)

        with concurrent.futures.ThreadPoolExecutor(SPACED_WAITERS) as pool:
            futures = []
            t0 = time.perf_counter()
            for i in range(n):
                time.sleep(max(0.0, t0 + i * gap_s - time.perf_counter()))
                submitted = time.time()
                futures.append(pool.submit(wait_one, self._send(0.0), submitted))
            for future in futures:
                future.result()
        return [t for t in out if t is not None]

    async def cancels(self, n: int) -> Cancels:
        return await asyncio.to_thread(self._cancels, n)

    def _running_pid(self, result: Any) -> int:
        """Wait for the STARTED state (``task_track_started``); the pool process's pid."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if result.state == "STARTED" and isinstance(result.info, dict):
                return int(result.info["pid"])
            time.sleep(START_POLL_S)
        raise RuntimeError(f"Celery task {result.id} did not start")

    def _cancels(self, n: int) -> Cancels:
        """``revoke(terminate=True)``; latency until REVOKED is known and the process is gone."""
        out = Cancels()
        steps = round(CANCEL_TASK_SLEEP_S / CANCEL_STEP_S)
        for _ in range(n):
            result = self._send(CANCEL_TASK_SLEEP_S, steps)
            pid = self._running_pid(result)
            state: list[float] = []
            waiter = threading.Thread(target=_wait_revoked, args=(result, state))
            t0 = time.time()
            self.app.control.revoke(result.id, terminate=True)
            waiter.start()
            gone_at = _wait_gone(pid, t0 + CANCEL_TIMEOUT_S)
            waiter.join(CANCEL_TIMEOUT_S)
            if gone_at is None or not state:
                out.timed_out += 1
                out.notes.append(f"{result.id}: not revoked and gone in {CANCEL_TIMEOUT_S:g} s")
                continue
            out.state_s.append(state[0] - t0)
            out.gone_s.append(gone_at - t0)
            out.latencies_s.append(max(state[0], gone_at) - t0)
        return out


def _wait_revoked(result: Any, out: list[float]) -> None:
    """Wait (Redis pub/sub) for the task's end; append the clock if it ended REVOKED."""
    result.get(timeout=CANCEL_TIMEOUT_S, propagate=False)
    if result.state == "REVOKED":
        out.append(time.time())


def _wait_gone(pid: int, deadline: float) -> float | None:
    while time.time() < deadline:
        if pid_gone(pid):
            return time.time()
        time.sleep(PID_POLL_S)
    return None


async def delete_celery_run(run: CeleryRun) -> None:
    """Delete the run's queue and exchanges on the broker and its result keys in Redis."""
    client = redis.Redis.from_url(run.backend_url)
    try:
        keys = list(client.scan_iter(match=f"{run.key_prefix}*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
    finally:
        client.close()
    connection = await aio_pika.connect(run.broker_url)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(run.queue)
        for exchange in (
            run.queue,
            f"{run.control_exchange}.pidbox",
            f"reply.{run.control_exchange}.pidbox",
            run.event_exchange,
        ):
            await channel.exchange_delete(exchange)


def new_prefix() -> str:
    """A fresh name prefix for one run's Celery objects."""
    return f"benchcelery-{uuid.uuid4().hex[:8]}"
