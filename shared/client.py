"""The client library: submit tasks, follow them by events, read their records.

``DistributedClient`` is async; ``SyncClient`` wraps it for scripts and notebooks::

    with SyncClient() as client:
        record = client.submit_and_wait("train_model", {"dataset": "GOOG", "epochs": 5})
        print(record.state, record.result["metrics"])
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import aio_pika
import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from shared.broker import Broker
from shared.client_desktop import DesktopOps
from shared.client_logs import LogOps
from shared.client_schedules import ScheduleOps
from shared.constants import DEFAULT_PRIORITY
from shared.errors import (
    BrokerError,
    CommitCheckError,
    DecodeError,
    DependencyError,
    IdempotencyConflictError,
    LocalRunExistsError,
    StoreError,
    TaskNotFoundError,
)
from shared.events import EventCallback, state_event
from shared.fallback import FallbackPolicy, split_local_profile, submit_and_wait_or_run_locally
from shared.gitinfo import CheckoutState, checkout_fingerprint, checkout_state
from shared.local_runs import LocalJournal, describe_existing, publish_local_runs
from shared.messages import (
    CancelRequest,
    ConfigRef,
    EventKind,
    TaskEvent,
    TaskState,
    TaskSubmission,
    decode,
    task_id_for_key,
)
from shared.pipelines import Pipeline
from shared.pipelines import plan as plan_pipeline
from shared.references import validate_with_refs
from shared.settings import FallbackMode, Settings
from shared.store import StatusStore, TaskRecord
from shared.task_types import route_of, validate_config

log = structlog.get_logger(__name__)


#: While following events, the record is also re-read this often (s): a safety net for an event
#: lost to a broker reconnect, not the way results arrive.
SAFETY_RECHECK_S = 15.0

#: While waiting for a cancelled task to stop, the record is re-read this often (s).
CANCEL_RECHECK_S = 1.0


#: A checkout's state (commit, dirty files, pushed) is reused this long while its git files are
#: unchanged (s): a submit loop runs git once, not three times per task (~13 ms a submit here).
CHECKOUT_CACHE_S = 2.0


T = TypeVar("T")


@dataclass(frozen=True)
class CancelResult:
    """What ``cancel`` did: ``cancelled``, ``cancelling`` or ``already_<state>``, and the record."""

    outcome: str
    record: TaskRecord


class DistributedClient(ScheduleOps, DesktopOps, LogOps):
    """Async client for the laptop and scripts.

    Args:
        settings: connection settings; default ``Settings()`` (env ``TP_*`` and ``.env``).
        name: connection name shown in the RabbitMQ management UI.
        fallback_local: let ``submit_and_wait`` run the task on this machine when the desktop
            is unreachable or does not start it (``shared.fallback``); ``connect`` then
            tolerates an unreachable RabbitMQ or Redis. Off by default in the library (the CLI
            follows ``TP_FALLBACK``).
        confirm_fallback: with ``fallback_local``, asked ``confirm(reason)`` before each local
            run (may block; runs in a thread).
        start_timeout_s: with no worker online for its queue, how long a queued task may wait
            before it runs here (s); default ``TP_FALLBACK_START_TIMEOUT_S``.

    Use as ``async with DistributedClient() as client: ...``.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        name: str = "client",
        fallback_local: bool = False,
        confirm_fallback: Callable[[str], bool] | None = None,
        start_timeout_s: float | None = None,
    ) -> None:
        self.settings = settings or Settings()
        self.store = StatusStore(self.settings)
        self.broker = Broker(self.settings, name=name)
        #: While following events, the record is also re-read this often (s).
        self.recheck_s = SAFETY_RECHECK_S
        mode: FallbackMode = "never"
        if fallback_local:
            mode = "local" if confirm_fallback is None else "ask"
        #: When ``submit_and_wait`` runs the task on this machine instead (``shared.fallback``).
        self.fallback = FallbackPolicy(
            mode, start_timeout_s or self.settings.fallback_start_timeout_s, confirm_fallback
        )
        #: Why RabbitMQ or Redis could not be reached at ``connect`` (fallback enabled only).
        self.unreachable: str | None = None
        #: The last ``checkout()``: (monotonic time, git fingerprint, state).
        self._checkout_cache: tuple[float, tuple[object, ...], CheckoutState] | None = None
        self._checkout_reading: asyncio.Task[CheckoutState] | None = None

    async def __aenter__(self) -> DistributedClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect to Redis and RabbitMQ.

        With the local fallback enabled an unreachable server is not an error: ``unreachable``
        says why, and ``submit_and_wait`` runs the task on this machine.

        Raises:
            StoreError: Redis unreachable (fallback disabled).
            BrokerError: RabbitMQ unreachable (fallback disabled).
        """
        failures = []
        for server in (self.store, self.broker):
            try:
                await server.start()
            except (StoreError, BrokerError) as e:
                if not self.fallback.enabled:
                    raise
                failures.append(str(e))
        self.unreachable = "; ".join(failures) or None

    def require_store(self) -> None:
        """Raise ``StoreError`` (saying why) unless Redis was reached at ``connect``."""
        if not self.store.connected:
            raise StoreError(self.unreachable or "Redis: not connected")

    async def close(self) -> None:
        """Close both connections (and stop a checkout read still in the background)."""
        if self._checkout_reading is not None and not self._checkout_reading.done():
            self._checkout_reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkout_reading
        await self.broker.stop()
        await self.store.stop()

    async def submit(
        self,
        task_type: str,
        config: dict[str, Any] | None = None,
        *,
        priority: int = DEFAULT_PRIORITY,
        task_id: str | None = None,
        idempotency_key: str | None = None,
        git_commit: str | None = None,
        time_limit_s: float | None = None,
        max_attempts: int | None = None,
        depends_on: list[str] | None = None,
        config_refs: list[ConfigRef] | None = None,
        not_before: float | None = None,
    ) -> TaskRecord:
        """Validate and submit a task; idempotent per task id.

        Args:
            task_type: a registered type (``train_model``).
            config: the type's config; validated here, before anything is queued.
            priority: 0 (lowest) to 9 (highest).
            task_id: choose the id (any ``[A-Za-z0-9_.-]`` up to 128); default a new UUID4.
            idempotency_key: derive the id from this key (uuid5) so a retried submit is one task.
            git_commit: the commit the task must run on; default ``HEAD`` of the checkout
                (``TP_CODE_DIR``), checked per ``TP_COMMIT_CHECK``: a dirty tree or an unpushed
                commit is warned about (``warn``) or refused (``refuse``); ``off`` pins nothing.
                The worker runs the task only on code that contains this commit.
            time_limit_s: maximum run time (s), then the task is killed and fails; default
                ``TP_TASK_TIMEOUT_S``.
            max_attempts: runs before giving up (lost workers, retryable errors); default
                ``TP_MAX_ATTEMPTS``.
            depends_on: ids of parent tasks (each must exist): the scheduler holds this task
                until every one completed, and fails it when one fails or is cancelled.
            config_refs: config values taken from parents once they completed (their task
                ids are added to ``depends_on``); the config is validated now with those fields
                left open, and in full when they are filled in.
            not_before: not queued before this Unix time (s, compared with the Redis clock;
                see ``shared.schedules.parse_start_time``).

        Returns:
            The task's record right after the submit: ``queued`` (direct dispatch, the
            default: the client queued it and published it to its lane) or ``submitted`` (held
            tasks, ``TP_DIRECT_DISPATCH=false``: the scheduler's intake queues it), or further
            on when the id was already known.

        Raises:
            UnknownTaskTypeError, TaskConfigError: refused, nothing queued.
            DependencyError: a parent does not exist, or the task would depend on itself.
            IdempotencyConflictError: the id is taken by a task of another type or config.
            CommitCheckError: ``TP_COMMIT_CHECK=refuse`` and the checkout is dirty or unpushed.
            pydantic.ValidationError: a bad id or priority.
            StoreError, BrokerError: Redis or RabbitMQ failed.
        """
        submission = await self.prepare(
            task_type,
            config,
            priority=priority,
            task_id=task_id,
            idempotency_key=idempotency_key,
            git_commit=git_commit,
            time_limit_s=time_limit_s,
            max_attempts=max_attempts,
            depends_on=depends_on,
            config_refs=config_refs,
            not_before=not_before,
        )
        return await self.submit_prepared(submission)

    async def prepare(
        self,
        task_type: str,
        config: dict[str, Any] | None = None,
        *,
        priority: int = DEFAULT_PRIORITY,
        task_id: str | None = None,
        idempotency_key: str | None = None,
        git_commit: str | None = None,
        time_limit_s: float | None = None,
        max_attempts: int | None = None,
        depends_on: list[str] | None = None,
        config_refs: list[ConfigRef] | None = None,
        not_before: float | None = None,
    ) -> TaskSubmission:
        """The submission ``submit`` would send, validated; nothing is recorded or sent.

        Takes ``submit``'s arguments. A config's local profile (``config["local"]``, see
        ``shared.fallback``) is checked and left out: only a local run applies it.

        Raises:
            UnknownTaskTypeError, TaskConfigError, CommitCheckError, pydantic.ValidationError:
                as ``submit``.
        """
        config, _ = split_local_profile(task_type, config)
        refs = list(config_refs or [])
        parents = list(dict.fromkeys([*(depends_on or []), *(r.task_id for r in refs)]))
        if not refs:
            # The record and the wire carry the config as it will run: validated, defaults in.
            config = validate_config(task_type, config).model_dump(mode="json")
        else:  # validated in full by the scheduler once the references are filled in
            validate_with_refs(task_type, config, refs)
        if git_commit is None:
            git_commit = await self.pinned_commit()
        if task_id is None:
            task_id = task_id_for_key(idempotency_key) if idempotency_key else str(uuid.uuid4())
        return TaskSubmission(
            task_id=task_id,
            task_type=task_type,
            config=config,
            priority=priority,
            submitted_at=time.time(),
            submitted_by=socket.gethostname(),
            idempotency_key=idempotency_key,
            git_commit=git_commit,
            timeout_s=time_limit_s,
            max_attempts=max_attempts,
            depends_on=parents,
            config_refs=refs,
            not_before=not_before,
        )

    async def submit_prepared(
        self, submission: TaskSubmission, *, publish: bool = True
    ) -> TaskRecord:
        """Record a prepared submission in Redis and publish it (``submit``'s second half).

        Args:
            submission: as ``prepare`` made it.
            publish: False records it only (the local fallback claims it without the broker).

        Raises:
            DependencyError, IdempotencyConflictError, StoreError, BrokerError: as ``submit``.
        """
        self.require_store()
        if publish and not self.broker.connected:
            raise BrokerError(self.unreachable or "broker: not connected")
        task_id, task_type, config = submission.task_id, submission.task_type, submission.config
        journal = LocalJournal(self.settings)
        if journal.path(task_id).exists():
            # This machine ran it while Redis was away: that run is the task (one id, one run).
            broker = self.broker if self.broker.connected else None
            await publish_local_runs(self.settings, self.store, broker, task_id=task_id, exact=True)
            existing, _ = journal.peek(task_id)
            if existing is None or not (existing.published or existing.state is TaskState.QUEUED):
                raise LocalRunExistsError(
                    f"task {task_id}: {describe_existing(existing)}; not submitted",
                    task_id=task_id,
                )
        parents = submission.depends_on
        await self._check_parents(task_id, parents)
        direct = publish and self.settings.direct_dispatch and not submission.held
        due: float | None = None
        if direct:
            created, record, due = await self.store.create_queued(
                submission,
                by="client",
                pump_after_s=self.settings.direct_dispatch_pump_after_s,
            )
        else:
            created, record = await self.store.create_record(submission)
        # The start time counts too: a resubmit without it would otherwise release a task held
        # for it (its record is still ``submitted``, and the intake decides from the message).
        known = (
            record.task_type,
            record.config_template or record.config,
            record.depends_on,
            record.not_before,
        )
        if not created and known != (task_type, config, parents, submission.not_before):
            raise IdempotencyConflictError(
                f"task {task_id} already exists as a different {record.task_type} task "
                f"(state {record.state.value}); use a new id or idempotency key",
                task_id=task_id,
            )
        if direct and created and due is not None:
            await self._dispatch(submission, due)
            return record
        # A known id is published again only while still ``submitted``: an earlier publish may
        # have been lost; the scheduler drops the duplicate if both arrive.
        if publish and (created or record.state is TaskState.SUBMITTED):
            await self.broker.publish_submission(submission)
        return record

    async def _dispatch(self, submission: TaskSubmission, due: float) -> None:
        """Publish a task this client recorded as ``queued`` to its lane (direct dispatch).

        The record is already listed for the scheduler's dispatch pump, due at ``due``: a publish
        that fails is done by the pump then (logged, not raised: the task will run). After a
        confirmed publish the listing is crossed off, so the pump never publishes it twice.
        """
        task_id = submission.task_id
        try:
            await self.broker.publish_submission(
                submission, route_of(submission.task_type, submission.config)
            )
        except BrokerError as e:
            log.warning("dispatch_deferred_to_scheduler", task_id=task_id, error=str(e))
            return
        await self.broker.announce(state_event(task_id, TaskState.QUEUED))
        try:
            await self.store.unlist_dispatch(task_id, due)
        except StoreError as e:  # the pump publishes it once more: a refused claim, no harm
            log.warning("dispatch_not_unlisted", task_id=task_id, error=str(e))

    async def _check_parents(self, task_id: str, parents: list[str]) -> None:
        """Refuse a ``depends_on`` naming this task itself or a task that does not exist."""
        if task_id in parents:
            raise DependencyError("depends_on: a task cannot depend on itself", field="depends_on")
        unknown = [p for p, found in (await self.store.exists(parents)).items() if not found]
        if unknown:
            raise DependencyError(
                f"depends_on: unknown task {', '.join(map(repr, unknown))}", field="depends_on"
            )

    async def submit_pipeline(
        self,
        pipeline: Pipeline,
        *,
        idempotency_key: str | None = None,
        git_commit: str | None = None,
    ) -> dict[str, TaskRecord]:
        """Submit every step of a pipeline, parents first; returns each step's record by name.

        Args:
            pipeline: as ``shared.pipelines.load_pipeline`` read it.
            idempotency_key: derive each step's task id from this key and the step's name, so a
                retried submit (after a broker error midway) makes the same tasks.
            git_commit: pin every step to this commit; default as ``submit`` (``HEAD``).

        Raises:
            PipelineError: the pipeline is refused (naming the field); nothing is submitted.
            Whatever ``submit`` raises (steps already submitted stay).
        """
        steps = plan_pipeline(pipeline)
        if idempotency_key is None:
            ids = {p.name: str(uuid.uuid4()) for p in steps}
        else:
            ids = {p.name: task_id_for_key(f"{idempotency_key}:{p.name}") for p in steps}
        if git_commit is None:
            git_commit = await self.pinned_commit()
        records: dict[str, TaskRecord] = {}
        for p in steps:
            records[p.name] = await self.submit(
                p.step.type,
                p.step.config,
                priority=p.step.priority,
                task_id=ids[p.name],
                git_commit=git_commit,
                time_limit_s=p.step.time_limit_s,
                max_attempts=p.step.max_attempts,
                depends_on=[ids[parent] for parent in p.parents],
                config_refs=[r.bind(ids) for r in p.refs],
            )
        return records

    async def pinned_commit(self, *, warn: Callable[[list[str]], None] | None = None) -> str | None:
        """The commit a task submitted now is pinned to: ``HEAD`` of ``TP_CODE_DIR``.

        None when ``TP_COMMIT_CHECK=off`` or the folder is not a git checkout. Dirty files and an
        unpushed commit are passed to ``warn`` (default: logged as a warning), or refused with
        ``TP_COMMIT_CHECK=refuse``.

        Raises:
            CommitCheckError: refused (the message lists each problem).
        """
        policy = self.settings.commit_check
        if policy == "off":
            return None
        state = await self.checkout()
        problems = state.problems()
        if problems and policy == "refuse":
            raise CommitCheckError(
                "not submitted: " + "; ".join(problems) + " (TP_COMMIT_CHECK=refuse)",
                commit=state.commit,
            )
        if problems and warn is not None:
            warn(problems)
        elif problems:
            log.warning("commit_check", problems=problems, commit=state.commit)
        return state.commit

    async def checkout(self) -> CheckoutState:
        """The local checkout's commit, dirty files and pushed-ness (``TP_CODE_DIR``).

        "Pushed" means on a branch the desktop follows: ``TP_GIT_REMOTE/TP_GIT_BRANCH`` when set,
        else the branches in git-sync's reports, else any remote branch.

        Three ``git`` runs; the answer is reused while the checkout's git files are unchanged
        (``checkout_fingerprint``): a commit, ``git add``, checkout, fetch or push is seen at
        once. Older than ``CHECKOUT_CACHE_S``, it is read again: under
        ``TP_COMMIT_CHECK=refuse`` before answering; otherwise the old answer is given and the
        new one read behind it, so a submit never waits for git while nothing it could see
        changed (an edit not yet staged shows a submit or two later). Calls at once share
        one read.
        """
        now = time.monotonic()
        fingerprint = checkout_fingerprint(self.settings.checkout_dir)
        cached = self._checkout_cache
        if cached is not None and fingerprint is not None and cached[1] == fingerprint:
            if now - cached[0] < CHECKOUT_CACHE_S:
                return cached[2]
            if self.settings.commit_check != "refuse":
                self._read_checkout()  # in the background
                return cached[2]
        return await asyncio.shield(self._read_checkout())

    def _read_checkout(self) -> asyncio.Task[CheckoutState]:
        """The read of the checkout in flight, or a new one (its answer is cached)."""
        if self._checkout_reading is None or self._checkout_reading.done():
            self._checkout_reading = asyncio.get_running_loop().create_task(
                self._read_checkout_now()
            )
        return self._checkout_reading

    async def _read_checkout_now(self) -> CheckoutState:
        s = self.settings
        now = time.monotonic()
        followed = {f"{s.git_remote}/{s.git_branch}"} if s.git_branch else set()
        if not followed and self.store.connected:
            with contextlib.suppress(StoreError):
                followed = {f"{r.remote}/{r.branch}" for r in await self.sync_status() if r.branch}
        state = await asyncio.to_thread(checkout_state, s.checkout_dir, frozenset(followed))
        # Stamped after git ran: ``git status`` may itself rewrite the index (refreshing it).
        fingerprint = checkout_fingerprint(s.checkout_dir)
        self._checkout_cache = None if fingerprint is None else (now, fingerprint, state)
        return state

    async def cancel(self, task_id: str, *, wait_s: float | None = 30.0) -> CancelResult:
        """Cancel a task; ``task_id`` may be a unique prefix.

        A task not yet running is cancelled at once and never runs. A running one goes to
        ``cancelling``; its worker SIGTERMs the child, waits ``TP_CANCEL_GRACE_S``, then
        SIGKILLs it, and records ``cancelled``. A finished task is left as it is.

        Args:
            task_id: the task (or a unique prefix).
            wait_s: for a running task, wait this long for it to end (None: do not wait).

        Returns:
            ``CancelResult(outcome, record)``; outcome is ``cancelled``, ``cancelling`` (still
            stopping when the wait ended), or ``already_<state>`` for a finished task.

        Raises:
            TaskNotFoundError: no such task.
        """
        task_id = await self.store.resolve_id(task_id)
        by = f"client:{socket.gethostname()}"
        while True:
            moved = await self.store.transition(
                task_id,
                [TaskState.SUBMITTED, TaskState.QUEUED],
                TaskState.CANCELLED,
                by=by,
                reason="cancelled before it ran",
                fields={"waiting": ""},
            )
            if moved.applied:
                if self.broker.connected:
                    await self.broker.publish_event(state_event(task_id, TaskState.CANCELLED))
                return CancelResult("cancelled", await self.store.get(task_id))
            if moved.previous is None or moved.previous.is_terminal:
                record = await self.store.get(task_id)
                return CancelResult(f"already_{record.state.value}", record)
            stopping = await self.store.transition(
                task_id,
                [TaskState.RUNNING],
                TaskState.CANCELLING,
                by=by,
                reason="cancel requested",
            )
            if stopping.applied or stopping.previous is TaskState.CANCELLING:
                break  # else it moved on meanwhile (finished, requeued): decide again
        if self.broker.connected:
            await self.broker.publish_cancel(CancelRequest(task_id=task_id, requested_by=by))
        # Else its runner learns of the cancel when it next renews its lease (every few s).
        if wait_s is None:
            return CancelResult("cancelling", await self.store.get(task_id))
        try:
            # Re-read each second: a task run locally by a client without a broker sends no
            # events, and a cancel is worth waiting for closely.
            record = await self.wait(task_id, timeout_s=wait_s, recheck_s=CANCEL_RECHECK_S)
        except TimeoutError:
            return CancelResult("cancelling", await self.store.get(task_id))
        outcome = "cancelled" if record.state is TaskState.CANCELLED else f"already_{record.state}"
        return CancelResult(outcome, record)

    async def status(self, task_id: str) -> TaskRecord:
        """The task's current record; ``task_id`` may be a unique prefix.

        Raises:
            TaskNotFoundError: no such task, or an ambiguous prefix.
        """
        return await self.store.get(await self.store.resolve_id(task_id))

    async def list_tasks(self, limit: int = 50, state: TaskState | None = None) -> list[TaskRecord]:
        """The most recent tasks (only those in ``state`` if given), newest first."""
        return await self.store.list_recent(limit, state)

    async def history(self, task_id: str) -> list[dict[str, Any]]:
        """The task's transitions, oldest first: ``{from, to, ts, by, attempt, reason}``."""
        return await self.store.history(await self.store.resolve_id(task_id))

    async def wait(
        self,
        task_id: str,
        *,
        timeout_s: float | None = None,
        on_event: EventCallback | None = None,
        recheck_s: float | None = None,
    ) -> TaskRecord:
        """Wait for the task to end, following its events pushed over the broker.

        Subscribes first, then reads the record, so an end that happens in between is not missed.

        Args:
            task_id: the task.
            timeout_s: give up after this long (s); None waits for ever.
            on_event: called with each of the task's events (progress, state changes).
            recheck_s: re-read the record at least this often (s); default ``recheck_s`` (15 s).
                A task run by a client whose broker was unreachable sends no events.

        Returns:
            The final record (``completed``, ``failed`` or ``cancelled``).

        Without a broker (a client whose RabbitMQ was unreachable at ``connect``) the record is
        re-read every second instead, and ``on_event`` is not called.

        Raises:
            TimeoutError: ``timeout_s`` passed first.
        """
        if not self.broker.connected:
            async with asyncio.timeout(timeout_s):
                return await self._poll_until_ended(task_id)
        async with self.subscribed(task_id) as queue, asyncio.timeout(timeout_s):
            return await self.wait_on(queue, task_id, on_event, recheck_s=recheck_s)

    async def _poll_until_ended(self, task_id: str) -> TaskRecord:
        """Re-read the record every ``CANCEL_RECHECK_S`` until it is terminal (no broker)."""
        while True:
            record = await self.store.get(task_id)
            if record.state.is_terminal:
                return record
            await asyncio.sleep(CANCEL_RECHECK_S)

    async def submit_and_wait(
        self,
        task_type: str,
        config: dict[str, Any] | None = None,
        *,
        timeout_s: float | None = None,
        on_event: EventCallback | None = None,
        on_submitted: Callable[[TaskRecord], None] | None = None,
        on_local: Callable[[str], None] | None = None,
        **submit_kw: Any,
    ) -> TaskRecord:
        """Subscribe to the task's events, submit it, and wait for its end.

        Subscribing before the submit means every event, ``queued`` included, reaches
        ``on_event``. Takes ``submit``'s keyword arguments and ``wait``'s ``timeout_s`` and
        ``on_event``; ``on_submitted`` is called with the record right after the submit.

        With the local fallback enabled (``fallback_local``, ``TP_FALLBACK``) the task runs on
        this machine when the desktop is unreachable or does not start it (``shared.fallback``);
        ``on_local`` is then called with the reason as it starts, and the record's ``worker`` is
        ``local:<host>`` and its ``fallback_reason`` says why.

        Raises:
            TimeoutError: ``timeout_s`` passed and the task had started on the desktop (or could
                not run here).
            Whatever ``submit`` and ``wait`` raise.
        """
        if self.fallback.enabled:
            return await submit_and_wait_or_run_locally(
                self,
                task_type,
                config,
                timeout_s=timeout_s,
                on_event=on_event,
                on_submitted=on_submitted,
                on_local=on_local,
                submit_kw=submit_kw,
            )
        task_id = submit_kw.pop("task_id", None)
        if task_id is None:
            key = submit_kw.get("idempotency_key")
            task_id = task_id_for_key(key) if key else str(uuid.uuid4())
        async with self.subscribed(task_id) as queue:
            record = await self.submit(task_type, config, task_id=task_id, **submit_kw)
            if on_submitted is not None:
                on_submitted(record)
            async with asyncio.timeout(timeout_s):
                return await self.wait_on(queue, task_id, on_event)

    @contextlib.asynccontextmanager
    async def subscribed(self, task_id: str) -> AsyncIterator[AbstractQueue]:
        """An exclusive auto-delete queue bound to ``task.*.<task_id>``, closed on exit."""
        channel = await self.broker.connection.channel()
        try:
            name = self.broker.topology.private_queue("client")
            queue = await channel.declare_queue(name, exclusive=True, auto_delete=True)
            events = await channel.get_exchange(self.broker.topology.events_exchange)
            await queue.bind(events, routing_key=f"task.*.{task_id}")
            yield queue
        finally:
            await channel.close()

    async def wait_on(
        self,
        queue: AbstractQueue,
        task_id: str,
        on_event: EventCallback | None,
        *,
        recheck_s: float | None = None,
    ) -> TaskRecord:
        """Wait for the end of a task whose events ``queue`` receives (from ``subscribed``)."""
        # Deliveries go through an asyncio.Queue: a timed-out get() on it is harmless, whereas
        # cancelling aio-pika's queue iterator closes it.
        inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        await queue.consume(inbox.put, no_ack=True)
        record = await self.store.get(task_id)
        every = recheck_s or self.recheck_s
        recheck_s = every
        while not record.state.is_terminal:
            try:
                async with asyncio.timeout(recheck_s):  # no task per get, as wait_for makes
                    message = await inbox.get()
            except TimeoutError:
                record, fresh = await self._recheck(task_id, record)
                recheck_s = every if fresh else min(1.0, every)
                continue
            event = _decode_event(message, self.settings.max_message_bytes)
            if event is None:
                continue
            if on_event is not None:
                maybe = on_event(event)
                if maybe is not None:
                    await maybe
            if event.kind is EventKind.STATE and event.state.is_terminal and event.record:
                record = TaskRecord.from_hash(event.record)  # pushed: read in the same step
            elif event.kind is EventKind.STATE:
                record, fresh = await self._recheck(task_id, record)
                recheck_s = every if fresh else min(1.0, every)
        return record

    async def _recheck(self, task_id: str, last: TaskRecord) -> tuple[TaskRecord, bool]:
        """Re-read the record: ``(record, True)``, or ``(last, False)`` while Redis is away.

        After a failed re-read the caller tries again within a second.
        """
        try:
            return await self.store.get(task_id), True
        except TaskNotFoundError:
            raise
        except StoreError as e:
            log.warning("recheck_failed", task_id=task_id, error=str(e))
            return last, False


def _decode_event(
    message: aio_pika.abc.AbstractIncomingMessage, max_bytes: int
) -> TaskEvent | None:
    try:
        return decode(message.body, TaskEvent, max_bytes=max_bytes)
    except DecodeError as e:
        log.warning("event_undecodable", error=str(e))
        return None


class SyncClient:
    """Blocking facade over ``DistributedClient`` for scripts: same methods, no ``await``.

    Runs its own event loop; use as a context manager (``with SyncClient() as client: ...``).
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        name: str = "sync-client",
        fallback_local: bool = False,
        start_timeout_s: float | None = None,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._client = DistributedClient(
            settings, name=name, fallback_local=fallback_local, start_timeout_s=start_timeout_s
        )

    def __enter__(self) -> SyncClient:
        self._run(self._client.connect())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close connections and the loop."""
        if not self._loop.is_closed():
            self._run(self._client.close())
            self._loop.close()

    def submit(self, task_type: str, config: dict[str, Any] | None = None, **kw: Any) -> TaskRecord:
        """See ``DistributedClient.submit``."""
        return self._run(self._client.submit(task_type, config, **kw))

    def cancel(self, task_id: str, *, wait_s: float | None = 30.0) -> CancelResult:
        """See ``DistributedClient.cancel``."""
        return self._run(self._client.cancel(task_id, wait_s=wait_s))

    def status(self, task_id: str) -> TaskRecord:
        """See ``DistributedClient.status``."""
        return self._run(self._client.status(task_id))

    def wait(self, task_id: str, *, timeout_s: float | None = None) -> TaskRecord:
        """See ``DistributedClient.wait`` (no event callback)."""
        return self._run(self._client.wait(task_id, timeout_s=timeout_s))

    def submit_and_wait(
        self,
        task_type: str,
        config: dict[str, Any] | None = None,
        *,
        timeout_s: float | None = None,
        **kw: Any,
    ) -> TaskRecord:
        """Submit, then wait for the end; returns the final record."""
        return self._run(self._client.submit_and_wait(task_type, config, timeout_s=timeout_s, **kw))

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._loop.run_until_complete(coro)
