"""Acceptance tests for outages: a task longer than RabbitMQ's consumer_timeout, a broker restart,
a Redis restart, and a Redis pool far smaller than the load.

Everything runs against real processes. The machine's shared RabbitMQ and Redis are never stopped:
a broker outage is a ``TcpProxy`` cut in front of RabbitMQ, a Redis outage is a private
``redis-server`` (append-only file, fsync always) killed with SIGKILL and started again on the
same port and folder. The consumer_timeout test changes two broker settings for its duration and
always puts back the exact values it found.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import pytest
import redis

from shared.client import DistributedClient
from shared.errors import BrokerError
from shared.events import state_event
from shared.messages import EventKind, TaskEvent, TaskState, TaskSubmission
from shared.settings import Settings
from shared.store import StatusStore
from shared.topology import Topology
from tests.conftest import LIGHT_WORKER, Platform, wait_for_consumers
from tests.netproxy import TcpProxy
from tests.test_pipeline import wait_state
from tests.test_service_lifecycle import free_port

WAIT_S = 60

# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

#: Broker settings that must never be unset: RabbitMQ 3.10 channels read ``channel_tick_interval``
#: with ``{ok, Interval} = application:get_env(...)`` on every tick, so an unset value crashes
#: every open channel of the node. ``consumer_timeout`` is read with a fallback, so unsetting it
#: is how an originally undefined value is put back.
_UNSET_IS_SAFE = {"consumer_timeout"}


def _rabbitmqctl_eval(expr: str) -> str:
    done = subprocess.run(["rabbitmqctl", "eval", expr], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl eval {expr!r} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def _rabbit_envs(keys: list[str]) -> dict[str, str]:
    """The broker's ``rabbit`` application env values as Erlang term texts (``{ok,5000}`` or
    ``undefined``), read in one ``rabbitmqctl`` call (each call takes about a second)."""
    listed = ", ".join(f"application:get_env(rabbit, {key})" for key in keys)
    out = _rabbitmqctl_eval(f"[{listed}].")
    values = re.findall(r"\{ok,[^{}]*\}|undefined", out)
    if len(values) != len(keys) or not out.startswith("[") or not out.endswith("]"):
        raise RuntimeError(f"cannot read {keys} from rabbitmqctl's answer {out!r}")
    return dict(zip(keys, values, strict=True))


def _restore_expr(key: str, original: str) -> str:
    """The Erlang expression putting back ``original`` (a ``_rabbit_envs`` value) for ``key``."""
    match = re.fullmatch(r"\{ok,(.*)\}", original, flags=re.DOTALL)
    if match:
        return f"application:set_env(rabbit, {key}, {match.group(1)})"
    return f"application:unset_env(rabbit, {key})"  # 'undefined', only for _UNSET_IS_SAFE keys


@contextlib.contextmanager
def rabbit_app_env(**values: int) -> Iterator[dict[str, str]]:
    """Set ``rabbit`` application env keys for the block; always restore the exact originals.

    Yields the originals (``{ok,1800000}`` or ``undefined``). A key that was undefined is unset
    again afterwards only if that is safe (``_UNSET_IS_SAFE``); any other undefined key is left
    alone rather than risk crashing the shared broker's channels.

    Each ``rabbitmqctl`` call takes about a second, so the keys are read, set, put back and
    checked in one call each; should the batched put-back fail, each key is put back on its own.
    """
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl not installed")
    try:
        found = _rabbit_envs(list(values))
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"rabbitmqctl cannot reach the broker: {e}")
    for key, original in found.items():
        if original == "undefined" and key not in _UNSET_IS_SAFE:
            raise RuntimeError(f"rabbit {key} is undefined; refusing to change it")
    originals: dict[str, str] = {}
    try:
        originals.update(found)  # from here on, whatever happens, they are put back
        sets = ", ".join(
            f"application:set_env(rabbit, {key}, {int(value)})" for key, value in values.items()
        )
        _rabbitmqctl_eval(f"{sets}, ok.")
        yield originals
    finally:
        problems = []
        restores = [_restore_expr(key, original) for key, original in originals.items()]
        try:
            if restores:
                _rabbitmqctl_eval(", ".join(restores) + ", ok.")
        except (RuntimeError, subprocess.TimeoutExpired):
            for expr in restores:  # each one, even if another failed
                with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                    _rabbitmqctl_eval(f"{expr}.")
        try:
            now = _rabbit_envs(list(originals)) if originals else {}
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            now = dict.fromkeys(originals, f"unknown ({e})")
        for key, original in originals.items():
            if now[key] != original:
                problems.append(f"{key}: was {original}, is now {now[key]}")
        if problems:
            raise RuntimeError("broker settings not restored: " + "; ".join(problems))


async def consumer_counts(s: Settings, queues: list[str]) -> dict[str, int]:
    """Consumers on each queue now, by passive declares (a missing queue counts 0)."""
    counts: dict[str, int] = {}
    connection = await aio_pika.connect(s.amqp_url)
    async with connection:
        for name in queues:
            channel = await connection.channel()
            try:
                q = await channel.declare_queue(name, passive=True)
                counts[name] = q.declaration_result.consumer_count
            except aio_pika.exceptions.ChannelClosed:
                counts[name] = 0
            finally:
                if not channel.is_closed:
                    await channel.close()
    return counts


async def wait_consumers_at_least(
    s: Settings, want: dict[str, int], timeout: float
) -> dict[str, float]:
    """Poll passive declares until each queue was seen with at least ``want`` consumers.

    A lane that is busy cancels its consumer, so each queue only has to be seen with enough
    consumers once. Returns the seconds after the call at which each queue first was.
    """
    started = time.monotonic()
    seen: dict[str, float] = {}
    while True:
        counts = await consumer_counts(s, list(want))
        for q, n in want.items():
            if q not in seen and counts[q] >= n:
                seen[q] = round(time.monotonic() - started, 1)
        if len(seen) == len(want):
            return seen
        if time.monotonic() - started > timeout:
            raise AssertionError(f"consumers not back within {timeout} s: {counts}, want {want}")
        await asyncio.sleep(0.1)


async def held_delivery_closes_channel(s: Settings, limit_s: float) -> tuple[float, str]:
    """Hold one delivery unacked on a fresh channel; return (seconds until the broker closed the
    channel, the reason). Proves the broker enforces the lowered consumer_timeout right now, so a
    worker that held its delivery would have been caught the same way."""
    connection = await aio_pika.connect(s.amqp_url)
    async with connection:
        channel = await connection.channel()
        closed: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        def on_close(_sender: object, exc: BaseException | None) -> None:
            if not closed.done():
                closed.set_result(repr(exc))

        channel.close_callbacks.add(on_close)
        queue = await channel.declare_queue(exclusive=True)
        await channel.default_exchange.publish(aio_pika.Message(b"held"), queue.name)
        started = time.monotonic()

        async def hold(_message: aio_pika.abc.AbstractIncomingMessage) -> None:
            pass  # never acked

        await queue.consume(hold)
        reason = await asyncio.wait_for(closed, limit_s)
        return time.monotonic() - started, reason


def _redis_ping(port: int) -> bool:
    try:
        with redis.Redis(port=port, socket_timeout=1) as r:
            return bool(r.ping())
    except redis.RedisError:
        return False


class PrivateRedis:
    """A redis-server of the test's own on ``port``; with ``persist`` it keeps an append-only file
    in ``folder`` (fsync always) so a SIGKILL and restart on the same folder keeps every write."""

    def __init__(self, folder: Path, *, persist: bool) -> None:
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server not installed")
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.persist = persist
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.persist
            else ["--appendonly", "no"]
        )
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                *persistence,
                "--dir",
                str(self.folder),
            ],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not _redis_ping(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise TimeoutError(f"private redis on {self.port} did not start")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None


def dump_logs(platform: Platform) -> str:
    return "\n".join(f"--- {p.module} ---\n{p.log_text()[-4000:]}" for p in platform.procs.values())


def transitions(history: list[dict]) -> list[str]:
    return [h["to"] for h in history]


# --------------------------------------------------------------------------------------------
# 1. A task longer than RabbitMQ's consumer_timeout
# --------------------------------------------------------------------------------------------

#: Log text that would mean a channel was closed under the worker or scheduler.
CHANNEL_TROUBLE = re.compile(
    r"precondition_failed|consumer_timeout|delivery acknowledgement|channel.?closed"
    r"|channelinvalidstate|consume_failed|delivery_deferred|reader exited|reconnect",
    re.IGNORECASE,
)


async def test_task_longer_than_consumer_timeout_runs_once(
    settings: Settings, platform: Platform, client: DistributedClient
):
    """consumer_timeout 5 s (checked every second), a 12 s probe: it runs exactly once, no
    channel of the worker is closed, and the worker still consumes afterwards. A delivery held
    alongside shows the broker enforcing the limit well within the probe's run.

    The worker holds a running task's delivery up to ``TP_WORKER_ACK_HOLD_S`` (2 s here, far
    below the 5 s timeout, as the setting's own rule asks) and then acks it, consumer first."""
    t = Topology(settings.namespace)
    with rabbit_app_env(consumer_timeout=5000, channel_tick_interval=1000) as originals:
        print("broker env before the test:", originals)
        # Services start only now: a channel reads consumer_timeout when it opens.
        begin = time.monotonic()
        await platform.start_all(TP_WORKER_ACK_HOLD_S="2", **LIGHT_WORKER)
        started = time.monotonic()
        print(f"platform ready in {started - begin:.1f} s")
        task = await client.submit("probe", {"sleep_s": 12, "steps": 12})
        # Alongside, prove the broker enforces the 5 s limit on a channel opened now.
        held_s, held_reason = await held_delivery_closes_channel(settings, limit_s=25)
        print(f"held delivery: channel closed after {held_s:.1f} s: {held_reason}")
        # Within the probe's 12 s: a worker holding its delivery would have been caught too.
        assert held_s < 11, f"broker took {held_s:.1f} s to enforce consumer_timeout"
        assert "PRECONDITION_FAILED" in held_reason.upper(), held_reason
        record = await client.wait(task.task_id, timeout_s=WAIT_S)
        elapsed = time.monotonic() - started
        print(f"12 s probe ended {elapsed:.1f} s after its submit")

        logs = dump_logs(platform)
        assert record.state is TaskState.COMPLETED, (record, logs)
        assert record.attempts == 1, (record, logs)
        assert record.result["metrics"]["steps"] == 12.0
        assert elapsed >= 12
        history = await client.history(task.task_id)
        assert transitions(history) == ["submitted", "queued", "running", "completed"], history
        for proc in platform.procs.values():
            trouble = [ln for ln in proc.log_text().splitlines() if CHANNEL_TROUBLE.search(ln)]
            assert not trouble, f"{proc.module}: {trouble}"
            assert proc.proc.poll() is None, f"{proc.module} exited"

        # The worker still has its consumers (both lanes idle now), and a following probe runs.
        counts = await consumer_counts(
            settings, [t.queue("submit"), t.queue("gpu"), t.queue("cpu")]
        )
        assert counts == {t.queue("submit"): 1, t.queue("gpu"): 1, t.queue("cpu"): 1}, counts
        following = await client.submit_and_wait("probe", {"sleep_s": 0.2}, timeout_s=WAIT_S)
        assert following.state is TaskState.COMPLETED and following.attempts == 1
        assert transitions(await client.history(following.task_id)).count("running") == 1
        # Checked last, when a redelivery would have been handled by now. A channel closed for
        # an unacked delivery is reopened by aio-pika without a word in the log; what shows is
        # the broker handing the delivery out again and the claim refusing it.
        refused = [
            ln
            for ln in platform.procs["gpu_worker"].log_text().splitlines()
            if "claim_refused" in ln
        ]
        assert not refused, f"the delivery came back (consumer_timeout?): {refused}"
        released = [
            ln
            for ln in platform.procs["gpu_worker"].log_text().splitlines()
            if "delivery_released" in ln and task.task_id in ln
        ]
        assert len(released) == 1, f"the 12 s task's delivery was not released once: {released}"


# --------------------------------------------------------------------------------------------
# 2. Broker restart (every service connection through a proxy that is cut for 8 s)
# --------------------------------------------------------------------------------------------


async def test_broker_restart_restores_consumers_and_loses_no_task(
    settings: Settings, platform: Platform, client: DistributedClient
):
    t = Topology(settings.namespace)
    proxy = TcpProxy("127.0.0.1", 5672)
    proxied_url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
    # A submit whose publish fails during the cut is published by the scheduler's pump once
    # the broker is back: listed 2 s ahead here instead of 30 s.
    proxied = DistributedClient(
        settings.model_copy(update={"amqp_url": proxied_url, "direct_dispatch_pump_after_s": 2.0}),
        name="px",
    )
    try:
        # Both services through the proxy (start_all would give the scheduler the direct URL).
        platform.start("scheduler", TP_AMQP_URL=proxied_url)
        platform.start(
            "gpu_worker",
            TP_AMQP_URL=proxied_url,
            TP_WORKER_CPU_SLOTS="1",
            TP_WORKER_GPU_SLOTS="0",
            **LIGHT_WORKER,
        )
        try:
            await wait_for_consumers(settings, {t.queue("submit"): 1, t.queue("cpu"): 1})
        except TimeoutError:
            raise AssertionError(dump_logs(platform)) from None
        await proxied.connect()
        long = await client.submit("probe", {"sleep_s": 6, "steps": 12})
        await wait_state(client, long.task_id, TaskState.RUNNING)
        short = [
            (await client.submit("probe", {"sleep_s": 0.2, "steps": 2})).task_id for _ in range(10)
        ]
        for task_id in short:  # routed to the cpu queue, waiting behind the long one
            await wait_state(client, task_id, TaskState.QUEUED)
        all_ids = [long.task_id, *short]

        proxy.cut()
        cut_at = time.monotonic()

        async def submit_during_outage(task_id: str, after_s: float) -> tuple[str, object, float]:
            """Submit through the proxy while it is cut: ('ok', record), ('error', BrokerError),
            ('hung', TimeoutError) or ('other', the exception)."""
            await asyncio.sleep(after_s)
            begin = time.monotonic()
            try:
                async with asyncio.timeout(40):
                    record = await proxied.submit("probe", {"sleep_s": 0.2}, task_id=task_id)
            except BrokerError as e:
                return "error", e, time.monotonic() - begin
            except TimeoutError as e:
                return "hung", e, time.monotonic() - begin
            except Exception as e:  # anything else reaching the caller is a finding too
                return "other", e, time.monotonic() - begin
            return "ok", record, time.monotonic() - begin

        # One submit at the moment of the cut, one while the client is reconnecting.
        outage_ids = {"outage-submit-1": 0.0, "outage-submit-2": 3.0}
        outage_submits = {
            task_id: asyncio.create_task(submit_during_outage(task_id, after_s))
            for task_id, after_s in outage_ids.items()
        }
        await asyncio.sleep(8)
        proxy.restore()
        restored_at = time.monotonic()
        print(f"proxy cut for {restored_at - cut_at:.1f} s")

        # Every consumer comes back: the scheduler on intake, the worker on cpu.
        back = await wait_consumers_at_least(
            settings, {t.queue("submit"): 1, t.queue("cpu"): 1}, timeout=30
        )
        print(f"consumers back (s after restore): {back}")

        for task_id, submitting in outage_submits.items():
            outcome, value, took = await submitting
            print(f"submit {task_id} during the outage: {outcome} after {took:.1f} s: {value!r}")
            assert outcome in ("ok", "error"), (task_id, outcome, took, value)
            if outcome == "error":
                assert str(value), "BrokerError without a message"
                # The caller was told; the record exists, still 'submitted' (no message behind
                # it): a retried submit with the same id publishes it again.
                left = await client.status(task_id)
                print(f"record left by the failed submit {task_id}: {left.state.value}")
                assert left.state is TaskState.SUBMITTED, left
                again = await proxied.submit("probe", {"sleep_s": 0.2}, task_id=task_id)
                assert again.task_id == task_id
            all_ids.append(task_id)

        records = [await client.wait(task_id, timeout_s=WAIT_S) for task_id in all_ids]
        logs = dump_logs(platform)
        for record in records:
            assert record.state is TaskState.COMPLETED, (record, logs)
            history = transitions(await client.history(record.task_id))
            assert history.count("completed") == 1, (record.task_id, history)
            assert history.count("running") == 1, (record.task_id, history)
            assert record.attempts == 1, record
        for proc in platform.procs.values():
            assert proc.proc.poll() is None, f"{proc.module} exited:\n{proc.log_text()[-3000:]}"

        # Idle again: exactly one consumer per queue (a consumer restored by the reconnect and
        # another started by the lane would double the worker's prefetch).
        await asyncio.sleep(1)
        counts = await consumer_counts(settings, [t.queue("submit"), t.queue("cpu")])
        assert counts == {t.queue("submit"): 1, t.queue("cpu"): 1}, (counts, logs)
        if os.environ.get("TP_TEST_DUMP_LOGS"):
            print(logs)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proxied.close(), 15)
        platform.stop_all()  # while the proxy still forwards, so the stop is quick
        proxy.close()


# --------------------------------------------------------------------------------------------
# 3. Redis restart (private server, append-only file kept across the restart)
# --------------------------------------------------------------------------------------------


async def test_redis_restart_mid_task_lifecycle_and_events_continue(
    settings: Settings, tmp_path: Path
):
    server = PrivateRedis(tmp_path / "redis", persist=True)
    server.start()
    private = settings.model_copy(update={"redis_url": server.url})
    platform = Platform(private, tmp_path)
    client = DistributedClient(private, name="test-client")
    try:
        await client.connect()
        await platform.start_all(**LIGHT_WORKER)
        task = await client.submit("probe", {"sleep_s": 8, "steps": 16})
        await wait_state(client, task.task_id, TaskState.RUNNING)

        received: list[tuple[float, TaskEvent]] = []

        def on_event(event: TaskEvent) -> None:
            received.append((time.monotonic(), event))

        follower = asyncio.create_task(
            client.wait(task.task_id, timeout_s=WAIT_S, on_event=on_event)
        )
        deadline = time.monotonic() + 30  # the child may be slow to start on a loaded machine
        while not any(e.kind is EventKind.PROGRESS for _, e in received):
            assert time.monotonic() < deadline, "no progress event before the outage"
            assert not follower.done(), follower
            await asyncio.sleep(0.05)

        server.kill()
        killed_at = time.monotonic()
        await asyncio.sleep(3)
        server.start()
        back_at = time.monotonic()
        print(f"redis away for {back_at - killed_at:.1f} s")

        record = await follower
        logs = dump_logs(platform)
        assert record.state is TaskState.COMPLETED, (record, logs)
        assert record.attempts == 1, record
        history = transitions(await client.history(task.task_id))
        assert history == ["submitted", "queued", "running", "completed"], history
        after = [e for at, e in received if at > back_at]
        kinds = [e.kind for e in after]
        print(f"events after redis came back: {[(e.kind.value, e.progress) for e in after]}")
        assert EventKind.PROGRESS in kinds, (kinds, logs)

        # Services reconnected: a task submitted after the restart completes.
        following = await client.submit_and_wait("probe", {"sleep_s": 0.3}, timeout_s=WAIT_S)
        assert following.state is TaskState.COMPLETED, (following, dump_logs(platform))
        assert transitions(await client.history(following.task_id)).count("running") == 1
        for proc in platform.procs.values():
            assert proc.proc.poll() is None, f"{proc.module} exited:\n{proc.log_text()[-3000:]}"
    finally:
        platform.stop_all()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), 15)
        server.kill()


async def test_wait_returns_promptly_when_the_end_follows_a_redis_restart(
    settings: Settings, tmp_path: Path
):
    """A follower whose Redis restarted meanwhile returns soon after the task's final event."""
    server = PrivateRedis(tmp_path / "redis", persist=True)
    server.start()
    private = settings.model_copy(update={"redis_url": server.url})
    client = DistributedClient(private, name="test-client")
    finisher = StatusStore(private)
    try:
        await client.connect()
        task = await client.submit("probe", {}, task_id=f"end-after-restart-{uuid.uuid4().hex[:6]}")
        follower = asyncio.create_task(client.wait(task.task_id, timeout_s=40))
        await asyncio.sleep(0.5)  # subscribed and the record read once
        server.kill()
        await asyncio.sleep(1)
        server.start()
        # The task ends as a worker ends it: the record first, then the event.
        await finisher.start()
        moved = await finisher.transition(
            task.task_id, [TaskState.SUBMITTED, TaskState.QUEUED], TaskState.COMPLETED
        )
        assert moved.applied
        await client.broker.publish_event(state_event(task.task_id, TaskState.COMPLETED))
        ended_at = time.monotonic()
        record = await follower
        late_s = time.monotonic() - ended_at
        print(f"wait returned {late_s:.1f} s after the completed event")
        assert record.state is TaskState.COMPLETED
        assert late_s < 5, f"wait returned {late_s:.1f} s after the completed event"
    finally:
        await finisher.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), 15)
        server.kill()


# --------------------------------------------------------------------------------------------
# 4. A pool of two connections under 100 concurrent writes
# --------------------------------------------------------------------------------------------


async def test_small_pool_waits_instead_of_failing(settings: Settings, tmp_path: Path):
    server = PrivateRedis(tmp_path / "redis", persist=False)
    server.start()
    store = StatusStore(
        settings.model_copy(update={"redis_url": server.url, "redis_max_connections": 2})
    )
    try:
        await store.start()
        ids = [f"pool-{i}-{uuid.uuid4().hex[:6]}" for i in range(2)]
        for task_id in ids:
            created = await store.create(
                TaskSubmission(task_id=task_id, task_type="probe", submitted_at=time.time())
            )
            assert created
            moved = await store.transition(task_id, [TaskState.SUBMITTED], TaskState.QUEUED)
            assert moved.applied

        started = time.monotonic()
        writes = [
            store.transition(
                task_id, [TaskState.QUEUED], TaskState.QUEUED, by=f"w{n}", fields={"+attempts": 1}
            )
            for task_id in ids
            for n in range(100)
        ] + [
            store.update_if(task_id, [TaskState.QUEUED], {"progress": n / 100})
            for task_id in ids
            for n in range(100)
        ]
        results = await asyncio.gather(*writes)  # any "Too many connections" raises here
        took = time.monotonic() - started
        print(f"{len(writes)} writes on a pool of 2 took {took:.2f} s")

        moves, updates = results[: 2 * 100], results[2 * 100 :]
        assert all(m.applied and m.previous is TaskState.QUEUED for m in moves), moves
        assert all(updates), updates
        for task_id in ids:
            record = await store.get(task_id)
            assert record.attempts == 100, record
            assert record.state is TaskState.QUEUED
            history = await store.history(task_id)
            assert len(history) == 102, len(history)
            # Each move saw a different count: no two increments interleaved.
            assert sorted(h["attempt"] for h in history[2:]) == list(range(1, 101))
        attempts_seen = sorted(m.attempts for m in moves)
        assert attempts_seen == sorted(list(range(1, 101)) * 2)

        # The pool never opened more than its two connections (the server sees them all: the
        # pool keeps them; one more is this check's own).
        with redis.Redis(port=server.port) as checker:
            clients = checker.info("clients")["connected_clients"]
        assert clients - 1 <= 2, clients
    finally:
        await store.stop()
        server.kill()
