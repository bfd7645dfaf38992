"""Local fallback: when a waiting client runs its task on its own machine, and how it decides.

The task runs here (``services.gpu_worker.local.LocalRun``: the worker's child process, task code
and claim) when

1. RabbitMQ or Redis cannot be reached at submit: at once, saying why;
2. no worker serving the task's queue is online (heartbeats; ``draining`` does not count) and the
   task has not started within ``start_timeout_s`` (``TP_FALLBACK_START_TIMEOUT_S``);
3. the wait's ``timeout_s`` passed and the task is still ``submitted`` or ``queued``.

A task that is ``running`` on the desktop is never started here: the wait goes on, or its time
out is reported. No double runs: the local run claims the task with the same compare-and-set as
a worker (``StatusStore.claim``, as ``local:<host>``); a worker that receives the delivery later
finds it claimed and drops it, and a worker that claimed first makes the local claim fail, so the
client goes back to waiting. Without Redis there is nothing to claim against: the task exists only
in this machine's journal until ``tradectl task sync-local`` publishes it (``shared.local_runs``).

Not run here: tasks with dependencies or a start time (the scheduler holds those), and with Redis
unreachable, ``hyperopt`` (its study lives in Redis).

A config may carry a **local profile**, a mapping under ``local`` merged over the config when the
task runs here (``{"epochs": 50, "local": {"epochs": 5}}``); it is validated at submit (a bad
field is refused as ``local.<field>``), never sent to the desktop, and recorded in the result's
``ran_locally``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from shared.errors import (
    BrokerError,
    IdempotencyConflictError,
    LocalRunExistsError,
    StoreError,
    TaskConfigError,
)
from shared.events import EventCallback
from shared.health import WORKER_KIND, ServiceState, load_services
from shared.local_runs import LocalJournal, describe_existing
from shared.messages import TaskState, TaskSubmission, task_id_for_key
from shared.settings import FallbackMode
from shared.store import TaskRecord
from shared.task_types import route_of, validate_config

if TYPE_CHECKING:
    from shared.client import DistributedClient

log = structlog.get_logger(__name__)

#: After the start time-out, how often the queue's workers are looked at again (s).
RECHECK_S = 1.0
#: Task types that cannot run without Redis (they keep state there themselves).
NEEDS_REDIS = frozenset({"hyperopt", "hyperopt_trial"})
#: What every task type but ``probe`` needs to run here: the worker extra.
LOCAL_REQUIREMENTS = ("torch", "pandas", "backtesting", "mlflow", "optuna")
#: States from which a task may still be run locally (not started anywhere).
NOT_STARTED = ("submitted", "queued")


@dataclass(frozen=True)
class FallbackPolicy:
    """Whether and when to run locally.

    Attributes:
        mode: ``local`` (run here), ``never``, or ``ask`` (``confirm`` decides; no ``confirm``
            means never).
        start_timeout_s: condition 2's wait (s).
        confirm: asked ``confirm(reason)`` in ``ask`` mode; runs in a thread (it may block).
    """

    mode: FallbackMode
    start_timeout_s: float
    confirm: Callable[[str], bool] | None = None

    @property
    def enabled(self) -> bool:
        """Whether a fallback may happen at all."""
        return self.mode == "local" or (self.mode == "ask" and self.confirm is not None)

    async def allows(self, reason: str) -> bool:
        """Whether to run locally for ``reason`` (asks in ``ask`` mode)."""
        if self.mode == "local":
            return True
        if self.mode == "ask" and self.confirm is not None:
            return await asyncio.to_thread(self.confirm, reason)
        return False


def split_local_profile(
    task_type: str, config: dict[str, Any] | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(config without "local", the local profile)``, the profile checked against the type.

    Raises:
        TaskConfigError: ``local`` is not a mapping, or the config with the profile applied is
            invalid (fields named ``local.<field>``).
        UnknownTaskTypeError: unknown type.
    """
    config = dict(config or {})
    profile = config.pop("local", None)
    if profile is None:
        return config, {}
    if not isinstance(profile, dict):
        raise TaskConfigError(
            f"invalid {task_type} config: local: must be a mapping of config fields to use "
            f"when the task runs locally, got {type(profile).__name__}",
            errors=[("local", "must be a mapping")],
        )
    try:
        validate_config(task_type, {**config, **profile})
    except TaskConfigError as e:
        errors = [
            (f"local.{loc}" if loc.split(".")[0] in profile else loc, msg)
            for loc, msg in e.fields["errors"]
        ]
        detail = "; ".join(f"{loc}: {msg}" for loc, msg in errors)
        raise TaskConfigError(f"invalid {task_type} config: {detail}", errors=errors) from e
    return config, dict(profile)


def not_runnable_here(
    submission: TaskSubmission,
    *,
    redis_up: bool,
    broker_up: bool = True,
    profile: dict[str, Any] | None = None,
) -> str | None:
    """Why this task may not run locally, or None when it may."""
    missing = [m for m in LOCAL_REQUIREMENTS if importlib.util.find_spec(m) is None]
    if submission.task_type != "probe" and missing:
        return (
            f"{', '.join(missing)} not installed on this machine "
            "(pip install -e '.[worker]' to run tasks here)"
        )
    if submission.depends_on or submission.config_refs:
        return "it depends on other tasks (the desktop's scheduler holds it)"
    if submission.not_before is not None:
        return "it has a start time (the desktop's scheduler holds it)"
    if not redis_up and submission.task_type in NEEDS_REDIS:
        return f"{submission.task_type} keeps its study in Redis, which is unreachable"
    parallel = {**submission.config, **(profile or {})}.get("parallel", 1)
    if not broker_up and submission.task_type == "hyperopt" and parallel > 1:
        return (
            "hyperopt with parallel > 1 submits its trials through RabbitMQ, which is "
            "unreachable (a local profile of parallel: 1 runs it here)"
        )
    return None


async def submit_and_wait_or_run_locally(
    client: DistributedClient,
    task_type: str,
    config: dict[str, Any] | None,
    *,
    timeout_s: float | None,
    on_event: EventCallback | None,
    on_submitted: Callable[[TaskRecord], None] | None,
    on_local: Callable[[str], None] | None,
    submit_kw: dict[str, Any],
) -> TaskRecord:
    """``DistributedClient.submit_and_wait`` with the local fallback (see the module).

    Returns:
        The final record: from Redis, or built from the journal when Redis has none.

    Raises:
        TimeoutError: ``timeout_s`` passed and the task had started on the desktop (or may not
            run here, or the fallback was declined).
        Whatever ``submit`` raises for bad input.
    """
    config, profile = split_local_profile(task_type, config)
    key = submit_kw.get("idempotency_key")
    if submit_kw.get("task_id") is None:
        submit_kw["task_id"] = task_id_for_key(key) if key else str(uuid.uuid4())
    submission = await client.prepare(task_type, config, **submit_kw)
    run = _LocalStarter(client, submission, profile, on_event, on_local)
    if client.unreachable is not None:
        return await run.at_once(client.unreachable, on_submitted)
    async with client.subscribed(submission.task_id) as queue:
        try:
            record = await client.submit_prepared(submission)
        except (BrokerError, StoreError) as e:
            return await run.at_once(str(e), on_submitted)
        if on_submitted is not None:
            on_submitted(record)
        waiting = _Waiting(client, submission, run, timeout_s)
        return await waiting.until_end(lambda: client.wait_on(queue, submission.task_id, on_event))


class _LocalStarter:
    """Claims and runs one task locally; imports the runner (and its task code) only then."""

    def __init__(
        self,
        client: DistributedClient,
        submission: TaskSubmission,
        profile: dict[str, Any],
        on_event: EventCallback | None,
        on_local: Callable[[str], None] | None,
    ) -> None:
        self.client = client
        self.submission = submission
        self.profile = profile
        self.on_event = on_event
        self.on_local = on_local

    async def at_once(
        self, reason: str, on_submitted: Callable[[TaskRecord], None] | None
    ) -> TaskRecord:
        """Condition 1: the broker or Redis is unreachable; run here now, or raise why not."""
        client = self.client
        redis_up = client.store.connected
        refused = not_runnable_here(
            self.submission,
            redis_up=redis_up,
            broker_up=client.broker.connected,
            profile=self.profile,
        )
        policy = client.fallback
        if refused is not None or not await policy.allows(reason):
            why = f"not run locally: {refused}" if refused else "local fallback declined"
            error = StoreError if not redis_up else BrokerError
            raise error(f"{reason} ({why})")
        if redis_up:  # the record exists in Redis from now on; the broker is what failed
            try:
                record = await client.submit_prepared(self.submission, publish=False)
            except StoreError as e:
                reason, redis_up = str(e), False
            else:
                if on_submitted is not None:
                    on_submitted(record)
        found = await self.run(reason, redis_up=redis_up)
        if found is None:  # a worker took it after all (the publish got through): follow it
            return await client.wait(self.submission.task_id, on_event=self.on_event)
        return found

    async def run(self, reason: str, *, redis_up: bool) -> TaskRecord | None:
        """Claim and run; None when the claim was refused (someone else has the task)."""
        from services.gpu_worker.local import LocalRun

        client = self.client
        earlier = self._earlier_run(redis_up=redis_up)
        if earlier is not None:
            return earlier
        commit = None
        if client.settings.commit_check != "off":
            commit = (await client.checkout()).commit
        local = LocalRun(
            client.settings,
            self.submission,
            reason=reason,
            store=client.store if redis_up else None,
            broker=client.broker if client.broker.connected else None,
            profile=self.profile,
            code_commit=commit,
            on_event=self.on_event,
            on_start=None if self.on_local is None else lambda: self._started(reason),
        )
        if not await local.claim():
            return None
        log.info("running_locally", task_id=self.submission.task_id, reason=reason)
        record = await local.run()
        if record.published:
            return await client.store.get(self.submission.task_id)
        return record.to_task_record()

    def _started(self, reason: str) -> None:
        if self.on_local is not None:
            self.on_local(reason)

    def _earlier_run(self, *, redis_up: bool) -> TaskRecord | None:
        """This machine's earlier run of the task, when it may stand for this one.

        One run per machine and task: a finished run of the same task (same id, or idempotency
        key, and the same type and config) is the result when Redis cannot say otherwise.

        Raises:
            LocalRunExistsError: a run of it is going on here, was lost here, or was handed back
                to the desktop (which may run it now) while Redis cannot arbitrate.
            IdempotencyConflictError: the id ran here as a task of another type or config.
        """
        task_id = self.submission.task_id
        existing, stale = LocalJournal(self.client.settings).peek(task_id)
        if existing is None:
            if stale or not LocalJournal(self.client.settings).path(task_id).exists():
                return None
            raise LocalRunExistsError(f"task {task_id}: {describe_existing(None)}", task_id=task_id)
        sub = existing.submission
        if (sub.task_type, sub.config) != (self.submission.task_type, self.submission.config):
            raise IdempotencyConflictError(
                f"task {task_id} already ran on this machine as a different {sub.task_type} "
                "task; use a new id or idempotency key",
                task_id=task_id,
            )
        if existing.state is TaskState.QUEUED and redis_up:
            return None  # handed back: Redis's claim decides who runs it now
        if existing.state.is_terminal and not redis_up:
            log.info("local_run_exists", task_id=task_id, state=existing.state)
            return existing.to_task_record()
        if existing.state.is_terminal:
            return None  # published (or publishable): Redis has the truth, the claim will say
        raise LocalRunExistsError(f"task {task_id}: {describe_existing(existing)}", task_id=task_id)


class _Waiting:
    """Conditions 2 and 3: wait for the desktop, and run here when it does not start the task."""

    def __init__(
        self,
        client: DistributedClient,
        submission: TaskSubmission,
        run: _LocalStarter,
        timeout_s: float | None,
    ) -> None:
        self.client = client
        self.submission = submission
        self.run = run
        self.timeout_s = timeout_s
        self.route = route_of(submission.task_type, submission.config)
        self.declined = not client.fallback.enabled
        #: Fixed by the submission: looked at once, not on every re-check.
        self.refused = not_runnable_here(submission, redis_up=True)

    async def until_end(self, wait: Callable[[], Any]) -> TaskRecord:
        loop = asyncio.get_running_loop()
        deadline = None if self.timeout_s is None else loop.time() + self.timeout_s
        check_at: float | None = loop.time() + self.client.fallback.start_timeout_s
        waiter: asyncio.Task[TaskRecord] = asyncio.ensure_future(wait())
        try:
            while True:
                wake = min(t for t in (check_at, deadline, loop.time() + 3600) if t is not None)
                await asyncio.wait({waiter}, timeout=max(0.0, wake - loop.time()))
                if waiter.done():
                    return waiter.result()
                now = loop.time()
                timed_out = deadline is not None and now >= deadline
                reason = None if self.declined else await self._reason(now, check_at, timed_out)
                if reason is None:
                    if timed_out:
                        raise TimeoutError
                    check_at = None if self.declined else now + RECHECK_S
                    continue
                if not await self.client.fallback.allows(reason):
                    self.declined = True
                    continue
                waiter.cancel()
                found = await self.run.run(reason, redis_up=True)
                if found is not None:
                    return found
                waiter = asyncio.ensure_future(wait())  # claimed by a worker: follow it
                check_at = loop.time() + RECHECK_S
        finally:
            waiter.cancel()

    async def _reason(self, now: float, check_at: float | None, timed_out: bool) -> str | None:
        """Why to run locally now, or None (started elsewhere, a worker is there, not yet)."""
        try:
            record = await self.client.store.get(self.submission.task_id)
        except StoreError as e:  # the wait itself rides out a Redis outage; so does this
            log.warning("fallback_check_failed", error=str(e))
            return None
        if record.state.value not in NOT_STARTED:
            return None
        if self.refused is not None:
            return None
        start_timeout = self.client.fallback.start_timeout_s
        if check_at is not None and now >= check_at and not await self._worker_online():
            return f"no {self.route} worker online; not started within {start_timeout:g} s"
        if timed_out:
            return f"still {record.state.value} after {self.timeout_s:g} s"
        return None

    async def _worker_online(self) -> bool:
        """Whether a live, non-draining worker consumes the task's queue."""
        for worker in await load_services(self.client.store, kind=WORKER_KIND):
            facts = worker.heartbeat.worker
            serving = worker.state in (ServiceState.ONLINE, ServiceState.BUSY)
            if serving and facts is not None and facts.slots.get(self.route, 0) > 0:
                return True
        return False
