"""Heartbeats of every service, and the states derived from them.

Each service (``scheduler``, ``gpu-worker``, ``git-sync``, ``artifact-sync``, ``health-monitor``)
runs a ``Beacon``: every ``TP_HEARTBEAT_INTERVAL_S`` it writes its ``Heartbeat`` to Redis under
``<ns>:service:<kind>:<name>`` with a TTL of ``TP_HEARTBEAT_TTL_S`` (arq's health key is the
model), records it in the ``<ns>:services`` hash (so a service whose key expired is still known,
and shown ``offline``), and publishes it on the events exchange (``worker.heartbeat.<name>`` for
workers, ``service.heartbeat.<kind>.<name>`` for the others).

A worker's heartbeat adds its slots, the tasks it runs, whether it drains, and its GPUs as NVML
reports them (``nvidia-ml-py``): NVML talks to the driver, not to CUDA, so reading it never
initialises CUDA in the worker's process (which would break its forkserver's children).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import Any, Literal, cast

import structlog
from pydantic import BaseModel, Field, ValidationError
from redis.exceptions import RedisError

from shared.broker import Broker
from shared.errors import BrokerError, DuplicateServiceError, NotConnectedError, StoreError
from shared.periodic import Periodic
from shared.settings import Settings
from shared.store import StatusStore

log = structlog.get_logger(__name__)

WORKER_KIND = "gpu-worker"
ServiceKind = Literal["scheduler", "gpu-worker", "git-sync", "artifact-sync", "health-monitor"]

#: A service offline for this long is dropped from the ``<ns>:services`` hash (s): a day, so a
#: worker that died overnight is still listed the next morning.
FORGET_OFFLINE_AFTER_S = 24 * 3600


class GpuInfo(BaseModel):
    """One GPU as NVML reports it. Memory in bytes, utilisation in percent, temperature in °C."""

    index: int
    name: str
    memory_used_bytes: int
    memory_total_bytes: int
    utilization_pct: float | None = None
    temperature_c: float | None = None


class GpuReport(BaseModel):
    """The machine's GPUs, or why there are none to report (``"no GPU: ..."``)."""

    gpus: list[GpuInfo] = Field(default_factory=list)
    error: str | None = None


class RunningTask(BaseModel):
    """A task a worker runs now."""

    task_id: str
    task_type: str
    lane: str
    started_at: float


class WorkerFacts(BaseModel):
    """What a gpu-worker adds to its heartbeat."""

    slots: dict[str, int]
    running: list[RunningTask] = Field(default_factory=list)
    draining: bool = False
    restart_pending: bool = False
    gpu: GpuReport = Field(default_factory=GpuReport)


class Heartbeat(BaseModel):
    """A service's liveness report. Times are Unix seconds (the service's clock)."""

    kind: str
    name: str
    host: str
    pid: int
    version: str
    code_commit: str | None = None
    started_at: float
    ts: float
    interval_s: float
    ttl_s: float
    #: True on the last heartbeat of a clean stop (SIGTERM, drain): offline, but not an alert.
    stopped: bool = False
    worker: WorkerFacts | None = None

    @property
    def uptime_s(self) -> float:
        """Seconds since the service started, as of this heartbeat."""
        return self.ts - self.started_at

    @property
    def routing_key(self) -> str:
        """Its routing key on the events exchange."""
        if self.kind == WORKER_KIND:
            return f"worker.heartbeat.{self.name}"
        return f"service.heartbeat.{self.kind}.{self.name}"


class ServiceState(StrEnum):
    """What a heartbeat says of its service: ``busy`` and ``draining`` only for workers."""

    ONLINE = "online"
    BUSY = "busy"
    DRAINING = "draining"
    OFFLINE = "offline"


class HealthAlert(BaseModel):
    """A ``health.alert.<kind>`` event: something a person should look at.

    ``kind`` is one of ``worker_offline``, ``queue_without_consumer``, ``sync_failed``,
    ``dead_letters_growing``, ``service_offline``; ``subject`` names what it is about (a worker,
    a queue, a task); ``resolved`` is True on the event that says it is over.
    """

    kind: str
    subject: str
    message: str
    ts: float
    resolved: bool = False

    @property
    def routing_key(self) -> str:
        """Its routing key on the events exchange."""
        return f"health.alert.{self.kind}"


class ServiceStatus(BaseModel):
    """A service as the laptop sees it: its last heartbeat and the state derived from it."""

    state: ServiceState
    age_s: float
    heartbeat: Heartbeat


def derive_state(heartbeat: Heartbeat, alive: bool) -> ServiceState:
    """The state a heartbeat implies.

    ``offline`` once the heartbeat key expired; a worker draining (or waiting to restart on new
    code) is ``draining``, one with every slot taken ``busy``; otherwise ``online``.
    """
    if not alive:
        return ServiceState.OFFLINE
    facts = heartbeat.worker
    if facts is not None:
        if facts.draining or facts.restart_pending:
            return ServiceState.DRAINING
        if facts.running and len(facts.running) >= sum(facts.slots.values()):
            return ServiceState.BUSY
    return ServiceState.ONLINE


async def load_services(store: StatusStore, kind: str | None = None) -> list[ServiceStatus]:
    """Every known service (of ``kind`` if given), sorted by kind and name.

    Alive means its TTL key still exists; the details come from the last heartbeat it wrote.
    Services offline for over a day are forgotten here.

    Raises:
        StoreError: Redis failed.
    """
    keys = store.keys
    try:
        known = cast(dict[str, str], await store.redis.hgetall(keys.services))
        members = sorted(m for m in known if kind is None or m.startswith(f"{kind}:"))
        async with store.redis.pipeline(transaction=False) as pipe:
            for member in members:
                pipe.exists(keys.service(*member.split(":", 1)))
            alive = await pipe.execute()
            now = time.time()
            found: list[ServiceStatus] = []
            stale: list[str] = []
            for member, is_alive in zip(members, alive, strict=True):
                try:
                    beat = Heartbeat.model_validate_json(known[member])
                except ValidationError:
                    stale.append(member)
                    continue
                age = max(0.0, now - beat.ts)
                if not is_alive and age > FORGET_OFFLINE_AFTER_S:
                    stale.append(member)
                    continue
                found.append(
                    ServiceStatus(
                        state=derive_state(beat, bool(is_alive)), age_s=age, heartbeat=beat
                    )
                )
            if stale:
                await store.redis.hdel(keys.services, *stale)
    except (RedisError, OSError) as e:
        raise StoreError(f"reading heartbeats failed: {e}") from e
    return found


def read_gpus() -> GpuReport:
    """The machine's GPUs through NVML, or ``error="no GPU: <why>"`` (no driver, no device).

    Blocking (NVML calls take milliseconds); call it from a thread.
    """
    try:
        import pynvml  # optional: the CLI never needs it
    except ImportError:
        return GpuReport(error="no GPU: nvidia-ml-py is not installed")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return GpuReport(error=f"no GPU: {e}")
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            gpus.append(
                GpuInfo(
                    index=index,
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    memory_used_bytes=int(memory.used),
                    memory_total_bytes=int(memory.total),
                    utilization_pct=_optional(pynvml.nvmlDeviceGetUtilizationRates, handle, "gpu"),
                    temperature_c=_optional(
                        pynvml.nvmlDeviceGetTemperature, handle, None, pynvml.NVML_TEMPERATURE_GPU
                    ),
                )
            )
        return GpuReport(gpus=gpus, error=None if gpus else "no GPU: NVML lists no device")
    except pynvml.NVMLError as e:
        return GpuReport(error=f"GPU facts unavailable: {e}")
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


def _optional(read: Callable[..., Any], handle: Any, attr: str | None, *args: Any) -> float | None:
    """``read(handle, *args)`` (its ``attr`` if given); None where a GPU lacks it."""
    import pynvml

    try:
        value = read(handle, *args)
        return float(getattr(value, attr) if attr else value)
    except pynvml.NVMLError:
        return None


def package_version() -> str:
    """The installed ``tradeplat`` version, or ``"0+unknown"`` when run from a bare checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tradeplat")
    except PackageNotFoundError:
        return "0+unknown"


class Beacon:
    """Writes and publishes one service's heartbeat every ``TP_HEARTBEAT_INTERVAL_S``.

    Args:
        settings: interval and TTL.
        store: where the heartbeat key and the services hash live.
        broker: publishes the heartbeat event (best effort: Redis holds the truth); may be None.
        kind: the service kind (``scheduler``...).
        name: unique per kind (a worker's ``TP_WORKER_NAME``; others default to the host name).
        code_commit: the commit the service's code was loaded from.
        extra: for workers, returns the ``WorkerFacts`` of this beat.
    """

    def __init__(
        self,
        settings: Settings,
        store: StatusStore,
        broker: Broker | None,
        *,
        kind: str,
        name: str | None = None,
        code_commit: str | None = None,
        extra: Callable[[], Awaitable[WorkerFacts]] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.broker = broker
        self.kind = kind
        self.name = name or socket.gethostname()
        self.code_commit = code_commit
        self._extra = extra
        self._started = time.time()
        self._version = package_version()
        self._periodic = Periodic(f"{kind}_heartbeat", settings.heartbeat_interval_s, self.beat)

    async def ensure_unique(self) -> None:
        """Refuse to start when another live process beats under this kind and name.

        A heartbeat key left by a process that died (its TTL not yet run out) is told apart
        from a live one by watching it for one and a half intervals: a live process refreshes
        it (new ``ts``), a dead one does not.

        Raises:
            DuplicateServiceError: another process keeps the name alive (two workers named
                alike would share one heartbeat and hide each other's death).
            StoreError: Redis failed.
        """
        key = self.store.keys.service(self.kind, self.name)
        try:
            first = await self.store.redis.get(key)
            if first is None:
                return
            seen = Heartbeat.model_validate_json(first)
            if (seen.host, seen.pid) == (socket.gethostname(), os.getpid()):
                return
            await asyncio.sleep(self.settings.heartbeat_interval_s * 1.5)
            later = await self.store.redis.get(key)
        except (RedisError, OSError) as e:
            raise StoreError(f"reading the heartbeat of {self.name} failed: {e}") from e
        except ValidationError:
            return
        if later is None or Heartbeat.model_validate_json(later).ts == seen.ts:
            return  # the earlier process is gone; its key just has not expired yet
        raise DuplicateServiceError(
            f"another {self.kind} named {self.name!r} is alive on {seen.host} (pid {seen.pid}): "
            "give each one its own TP_WORKER_NAME"
        )

    def start(self) -> None:
        """Beat now and then every interval."""
        self._periodic.start()

    async def stop(self) -> None:
        """Stop beating, and record a clean stop.

        The TTL key is deleted (the service shows offline now rather than when the TTL runs out)
        and the last heartbeat in the services hash is marked ``stopped``, so the monitor tells
        a stopped service from a lost one.
        """
        if not self._periodic.running:
            return
        await self._periodic.stop()
        beat = (await self.heartbeat()).model_copy(update={"stopped": True})
        keys = self.store.keys
        try:
            async with self.store.redis.pipeline(transaction=True) as pipe:
                pipe.delete(keys.service(self.kind, self.name))
                pipe.hset(keys.services, f"{self.kind}:{self.name}", beat.model_dump_json())
                await pipe.execute()
        except (RedisError, OSError, NotConnectedError) as e:
            log.warning("heartbeat_stop_not_recorded", error=str(e))

    async def heartbeat(self) -> Heartbeat:
        """This service's heartbeat as of now."""
        return Heartbeat(
            kind=self.kind,
            name=self.name,
            host=socket.gethostname(),
            pid=os.getpid(),
            version=self._version,
            code_commit=self.code_commit,
            started_at=self._started,
            ts=time.time(),
            interval_s=self.settings.heartbeat_interval_s,
            ttl_s=self.settings.heartbeat_ttl_s,
            worker=await self._extra() if self._extra is not None else None,
        )

    async def beat(self) -> None:
        """Write the heartbeat (key with TTL, services hash), then publish it (best effort).

        Raises:
            StoreError: Redis failed (``Periodic`` logs it and beats again next interval).
        """
        beat = await self.heartbeat()
        body = beat.model_dump_json()
        keys = self.store.keys
        ttl_ms = int(self.settings.heartbeat_ttl_s * 1000)
        try:
            async with self.store.redis.pipeline(transaction=True) as pipe:
                pipe.set(keys.service(self.kind, self.name), body, px=ttl_ms)
                pipe.hset(keys.services, f"{self.kind}:{self.name}", body)
                await pipe.execute()
        except (RedisError, OSError) as e:
            raise StoreError(f"writing the heartbeat failed: {e}") from e
        if self.broker is not None:
            try:
                await asyncio.wait_for(
                    self.broker.publish_raw_event(beat.routing_key, body.encode()),
                    self.settings.heartbeat_interval_s,
                )
            except (BrokerError, TimeoutError) as e:
                log.debug("heartbeat_event_not_published", error=str(e))
