"""The load: submitting the probe tasks, killing workers meanwhile, and watching until all end."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from shared.client import DistributedClient
from shared.errors import BrokerError, StoreError
from shared.keys import Keys
from shared.settings import Settings

from .analysis import collect
from .console import say
from .constants import LINGER_S, TERMINAL
from .processes import Fleet

#: Tries per submit; the back-off doubles from 0.5 s, so the last waits 16 s.
SUBMIT_ATTEMPTS = 6
#: Seconds between progress lines (one is printed at the end too).
PROGRESS_EVERY_S = 10
#: A progress line warns when no task finished for this long (well above a reap, ~3.5 s).
QUIET_WARN_S = 30
#: Task states read per Redis pipeline round trip.
READ_BATCH = 1000


@dataclass
class SoakState:
    """What the soak's loops share."""

    ids: list[str]
    submitted: set[str] = field(default_factory=set)
    submit_failed: list[str] = field(default_factory=list)
    submit_errors: int = 0
    submit_done_s: float | None = None
    states: Counter[str] = field(default_factory=Counter)
    stop: asyncio.Event = field(default_factory=asyncio.Event)


async def submit_all(
    client: DistributedClient, st: SoakState, rng: random.Random, concurrency: int
) -> None:
    """Submit every task (bounded concurrency; a failed submit is retried with the same id)."""
    sem = asyncio.Semaphore(concurrency)

    async def one(task_id: str) -> None:
        config = {"sleep_s": round(rng.uniform(0.01, 0.05), 3), "steps": 3}
        async with sem:
            for attempt in range(SUBMIT_ATTEMPTS):
                try:
                    await client.submit("probe", config, task_id=task_id)
                except (StoreError, BrokerError) as e:
                    st.submit_errors += 1
                    say(f"!! submit {task_id} failed ({e}); retry {attempt + 1}")
                    await asyncio.sleep(0.5 * 2**attempt)
                else:
                    st.submitted.add(task_id)
                    return
            st.submit_failed.append(task_id)

    await asyncio.gather(*(one(t) for t in st.ids))


async def killer(fleet: Fleet, names: list[str], every_s: float, st: SoakState) -> None:
    """SIGKILL a random worker every ``every_s`` (+-30 % jitter) and restart it at once."""
    rng = random.Random()
    while not st.stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(st.stop.wait(), every_s * rng.uniform(0.7, 1.3))
        if st.stop.is_set():
            return
        fleet.kill_and_restart(rng.choice(names))


async def read_states(r: Any, keys: Keys, ids: list[str]) -> Counter[str]:
    """State of every task id ('missing' for no record)."""
    counts: Counter[str] = Counter()
    for i in range(0, len(ids), READ_BATCH):
        async with r.pipeline(transaction=False) as pipe:
            for task_id in ids[i : i + READ_BATCH]:
                pipe.hget(keys.task(task_id), "state")
            for state in await pipe.execute():
                counts[state or "missing"] += 1
    return counts


@dataclass
class _Progress:
    """When the watch last printed a line and last saw the number of terminal tasks change."""

    last_print: float = 0.0
    last_change: float = field(default_factory=time.monotonic)
    last_done: int = -1

    def note(self, done: int, now: float) -> None:
        if done != self.last_done:
            self.last_change, self.last_done = now, done


def _tend(fleet: Fleet) -> None:
    """Restart services that died by themselves, look for lingering processes, note readiness."""
    fleet.restart_dead()
    fleet.check_lingering(LINGER_S)
    for inc in fleet.current.values():
        inc.check_ready()


def _show_progress(fleet: Fleet, st: SoakState, elapsed_s: float, quiet_s: float) -> None:
    shown = " ".join(f"{k} {v}" for k, v in sorted(st.states.items()))
    ready = sum(1 for i in fleet.current.values() if i.role == "worker" and i.check_ready())
    say(
        f"t={elapsed_s:6.1f}s submitted {len(st.submitted)}/{len(st.ids)} | {shown} "
        f"| kills {len(fleet.kills)} | workers ready {ready}"
    )
    if quiet_s > QUIET_WARN_S:
        say(f"!! no task finished for {quiet_s:.0f} s")


def _give_up_reason(
    st: SoakState, done: int, elapsed_s: float, quiet_s: float, *, deadline_s: float, stall_s: float
) -> str | None:
    """Why to stop waiting (the deadline passed, or nothing finished for ``stall_s``), or None."""
    if elapsed_s > deadline_s:
        say(f"!! DEADLINE HIT after {deadline_s:g} s: {len(st.ids) - done} tasks not terminal")
        return f"deadline {deadline_s:g} s"
    if st.submit_done_s is not None and quiet_s > stall_s:
        say(
            f"!! STALLED: no task finished for {stall_s:g} s; {len(st.ids) - done} tasks "
            "not terminal; giving up early"
        )
        return f"stalled {stall_s:g} s"
    return None


async def watch(
    client: DistributedClient,
    fleet: Fleet,
    st: SoakState,
    started: float,
    *,
    deadline_s: float,
    stall_s: float,
) -> str | None:
    """Poll the tasks' states every second until all are terminal.

    Returns None when they are, else why it gave up: the deadline passed, or no task became
    terminal for ``stall_s`` after every submit was done.
    """
    progress = _Progress()
    while True:
        await asyncio.sleep(1.0)
        _tend(fleet)
        try:
            st.states = await read_states(client.store.redis, client.store.keys, st.ids)
        except Exception as e:  # report and keep watching; the deadline bounds it
            say(f"!! could not read states: {e}")
            continue
        done = sum(st.states[s] for s in TERMINAL)
        now = time.monotonic()
        progress.note(done, now)
        finished = st.submit_done_s is not None and done >= len(st.ids) - len(st.submit_failed)
        if now - progress.last_print >= PROGRESS_EVERY_S or finished:
            progress.last_print = now
            _show_progress(fleet, st, now - started, now - progress.last_change)
        if finished:
            return None
        quiet_s = now - progress.last_change
        reason = _give_up_reason(
            st, done, now - started, quiet_s, deadline_s=deadline_s, stall_s=stall_s
        )
        if reason is not None:
            return reason


@dataclass
class LoadResult:
    """What the load phase leaves for the analysis."""

    st: SoakState
    records: dict[str, dict[str, str]]
    histories: dict[str, list[dict[str, Any]]]
    wall_s: float
    gave_up: str | None
    #: Redis server time when the records were read (to tell live leases from expired ones).
    redis_now: float


async def _submit_phase(
    client: DistributedClient, st: SoakState, rng: random.Random, concurrency: int, started: float
) -> None:
    await submit_all(client, st, rng, concurrency)
    st.submit_done_s = time.monotonic() - started
    say(f"all submits done after {st.submit_done_s:.1f} s ({len(st.submitted)} ok)")


async def _load_and_wait(
    args: argparse.Namespace,
    client: DistributedClient,
    fleet: Fleet,
    st: SoakState,
    *,
    rng: random.Random,
    started: float,
) -> str | None:
    """Run the killer and the submits while watching; stop both once the watch returns."""
    names = sorted(n for n, i in fleet.current.items() if i.role == "worker")
    kill_task = asyncio.create_task(killer(fleet, names, args.kill_every, st))
    submitter = asyncio.create_task(_submit_phase(client, st, rng, args.concurrency, started))
    try:
        return await watch(
            client, fleet, st, started, deadline_s=args.deadline, stall_s=args.stall_timeout
        )
    finally:
        st.stop.set()
        submitter.cancel()
        await asyncio.gather(kill_task, submitter, return_exceptions=True)


async def run_load(args: argparse.Namespace, s: Settings, fleet: Fleet) -> LoadResult:
    """Submit while the killer runs; wait for every task to end (or the deadline); collect."""
    rng = random.Random(args.seed)
    ids = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(args.tasks)]
    st = SoakState(ids=ids)
    client = DistributedClient(s, name="soak")
    await client.connect()
    try:
        started = time.monotonic()
        gave_up = await _load_and_wait(args, client, fleet, st, rng=rng, started=started)
        wall = time.monotonic() - started
        fleet.restart_dead()
        say(f"killer stopped after {len(fleet.kills)} kills; wall {wall:.1f} s; collecting")
        seconds, micros = await client.store.redis.time()
        records, histories = await collect(client.store.redis, client.store.keys, st.ids)
    finally:
        await client.close()
    return LoadResult(st, records, histories, wall, gave_up, seconds + micros / 1e6)
