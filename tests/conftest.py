"""Fixtures: real RabbitMQ and Redis, one namespace per test, services as real processes.

A test that needs RabbitMQ or Redis and cannot reach them fails under ``CI=true`` and is skipped
otherwise (dramatiq's ``check_rabbitmq`` pattern).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import aio_pika
import pytest

from shared.admin import delete_namespace
from shared.client import DistributedClient
from shared.settings import Settings, service_environment
from shared.topology import Topology

#: Fixtures of real git repositories and of a real S3 server, for the tests that use them.
pytest_plugins = ["tests.gitrepos", "tests.s3server"]

ROOT = Path(__file__).resolve().parent.parent
AMQP_URL = os.environ.get("TP_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("TP_REDIS_URL", "redis://127.0.0.1:6379/0")
#: A worker whose forkserver preloads the probe task only (no torch, pandas or mlflow): it is
#: ready in about a second instead of 3-6 s and stops in 0.2 s instead of 1.2 s on 2 cores. For
#: tests that run probes only; those running train_model, backtest or hyperopt keep the default.
LIGHT_WORKER = {"TP_WORKER_PRELOAD": '["services.gpu_worker.tasks.probe"]'}


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), 2
        ):
            return True
    except OSError:
        return False


def require(name: str, url: str, port: int) -> None:
    """Fail under CI, skip elsewhere, when a required server is not listening."""
    if _reachable(url, port):
        return
    message = f"{name} not reachable at {url}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def settings(namespace: str, tmp_path: Path) -> Iterator[Settings]:
    require("RabbitMQ", AMQP_URL, 5672)
    require("Redis", REDIS_URL, 6379)
    s = Settings(
        amqp_url=AMQP_URL,
        redis_url=REDIS_URL,
        namespace=namespace,
        data_dir=tmp_path / "data",
        mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        worker_name="test-worker",
        _env_file=None,
    )
    yield s
    cleanup(s)


def cleanup(s: Settings) -> None:
    """Delete the namespace's queues, exchanges and Redis keys."""
    asyncio.run(delete_namespace(s))


def service_env(s: Settings, **extra: str) -> dict[str, str]:
    """Environment for a service process using the test's namespace, folders and worker name."""
    # TP_FALLBACK=never: a tradectl that cannot reach a test's desktop fails, as the tests of
    # errors expect; tests of the local fallback set it (or drop it for the default).
    base = {"TP_WORKER_NAME": s.worker_name, "TP_FALLBACK": "never"}
    return service_environment(s, os.environ, **{**base, **extra})


def tradectl(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class ServiceProcess:
    """A service started as ``python -m services.<module>`` with its log in a file."""

    def __init__(self, module: str, env: dict[str, str], log_path: Path) -> None:
        self.module = module
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", f"services.{module}"],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self) -> None:
        """Send SIGTERM (if still running) without waiting; ``stop`` then waits."""
        if self.proc.poll() is None:
            self.proc.terminate()

    def stop(self, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


async def wait_for_consumers(s: Settings, queues: dict[str, int], timeout: float = 60) -> None:
    """Wait until each named queue has at least the given number of consumers."""
    connection = await aio_pika.connect(s.amqp_url)
    deadline = time.monotonic() + timeout
    async with connection:
        while True:
            channel = await connection.channel()
            counts = {}
            for name in queues:
                try:
                    q = await channel.declare_queue(name, passive=True)
                    counts[name] = q.declaration_result.consumer_count
                except aio_pika.exceptions.ChannelClosed:
                    channel = await connection.channel()
                    counts[name] = 0
            await channel.close()
            if all(counts[n] >= want for n, want in queues.items()):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"consumers not ready: {counts}")
            await asyncio.sleep(0.2)


class Platform:
    """Scheduler and worker processes for one test."""

    def __init__(self, s: Settings, tmp: Path) -> None:
        self.settings = s
        self.tmp = tmp
        self.procs: dict[str, ServiceProcess] = {}

    def start(self, module: str, **env: str) -> ServiceProcess:
        proc = ServiceProcess(module, service_env(self.settings, **env), self.tmp / f"{module}.log")
        self.procs[module] = proc
        return proc

    async def start_all(self, **env: str) -> None:
        """Scheduler and one worker, both with ``env`` (each reads the settings it uses)."""
        worker_env = env
        self.start("scheduler", **env)
        self.start("gpu_worker", **env)
        t = Topology(self.settings.namespace)
        want = {t.queue("submit"): 1}
        if worker_env.get("TP_WORKER_GPU_SLOTS", "1") != "0":
            want[t.queue("gpu")] = 1
        if worker_env.get("TP_WORKER_CPU_SLOTS", "1") != "0":
            want[t.queue("cpu")] = 1
        try:
            await wait_for_consumers(self.settings, want)
        except TimeoutError:
            for p in self.procs.values():
                print(p.module, p.log_text()[-3000:])
            raise

    def stop_all(self) -> dict[str, int]:
        """SIGTERM to every service at once, then wait for each (they stop in parallel)."""
        for p in self.procs.values():
            p.terminate()
        return {name: p.stop() for name, p in self.procs.items()}


@pytest.fixture
async def platform(settings: Settings, tmp_path: Path) -> AsyncIterator[Platform]:
    p = Platform(settings, tmp_path)
    yield p
    codes = p.stop_all()
    for name, code in codes.items():
        if code not in (0, -15):
            print(f"{name} exited {code}:\n{p.procs[name].log_text()[-3000:]}")


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[DistributedClient]:
    c = DistributedClient(settings, name="test-client")
    await c.connect()
    yield c
    await c.close()
