"""Tasks the client ran on its own machine (local fallback): their journal, and their publishing.

Every local run is journalled in ``<data_dir>/local/<task_id>.json`` (``LocalRecord``), written
atomically (temporary file, fsync, rename) at its start and at its end, whether or not Redis
could be reached. When Redis was reachable the run also lives in the task's Redis record like a
desktop run (claimed ``queued -> running`` by ``local:<host>``, then ``completed``/``failed``).
When it was not, or when it came back too late to record the end, the journal holds the
outcome until ``publish_local_runs`` (``tradectl task sync-local``) writes it to Redis, and copies
the artifacts to shared storage when that is configured.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from pydantic import BaseModel, Field

from shared.artifacts import ArtifactRequest, ArtifactState, ArtifactStatus
from shared.broker import Broker
from shared.constants import FINISHED_TASK_TTL_S
from shared.errors import LocalRunExistsError, StoreError, TaskNotFoundError
from shared.events import state_event
from shared.logstream import LogLine, append, read_after
from shared.messages import TaskState, TaskSubmission
from shared.settings import Settings
from shared.storage import StorageError, open_storage
from shared.storage.sync import Progress, status_of, sync_task
from shared.store import StatusStore, TaskRecord

log = structlog.get_logger(__name__)

#: An empty journal record older than this was left by a crashed writer (s).
STALE_RESERVATION_S = 60.0
#: Output lines of a local run written to its Redis stream per call, when it is published.
LOG_BATCH = 500
#: Fields of a local claim handed back to the desktop (``running -> queued``, due now).
HANDED_BACK: dict[str, str | int | float] = {
    "worker": "",
    "child_pid": "",
    "progress": "",
    "retry_in_s": 0,
    "fallback_reason": "",
}
#: Worker names of local runs start with this: ``local:<host>``.
LOCAL_WORKER_PREFIX = "local:"


def local_worker_name() -> str:
    """The name a local run claims its task with: ``local:<this host>``."""
    return LOCAL_WORKER_PREFIX + socket.gethostname()


def is_local_worker(worker: str | None) -> bool:
    """Whether a record's ``worker`` is a client's local fallback."""
    return bool(worker) and str(worker).startswith(LOCAL_WORKER_PREFIX)


class LocalRecord(BaseModel):
    """One local run as the client's journal keeps it. Times are Unix s (this machine's clock)."""

    submission: TaskSubmission
    #: Why it ran here: ``broker unreachable at amqp://...``, ``no cpu worker online for 30 s``.
    reason: str
    worker: str
    state: TaskState
    attempt: int = 1
    #: The process running it, and where: a run whose process is gone was lost.
    host: str = ""
    pid: int = 0
    pid_start: str = ""
    #: The task's record is in Redis (created by the submit or by ``publish_local_runs``).
    in_redis: bool = False
    #: The end of the run is recorded in Redis.
    published: bool = False
    started_at: float
    finished_at: float | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    traceback: str | None = None
    #: The local profile applied over the config (``config["local"]``), as run.
    profile: dict[str, Any] = Field(default_factory=dict)
    #: The config the child ran: the submitted one with the profile applied.
    config_run: dict[str, Any] = Field(default_factory=dict)
    #: The fields and history reason of the end, to record it in Redis later.
    end_fields: dict[str, str | int | float] = Field(default_factory=dict)
    end_reason: str = ""
    #: Where the artifacts are: in shared storage, or on this machine only (and why).
    artifacts: str = ""
    artifacts_stored: bool = False
    #: The sync's status, to show in ``tradectl artifacts status`` once Redis has it.
    artifact_status: ArtifactStatus | None = None
    artifact_status_saved: bool = False
    artifact_dir: str = ""
    #: The run's output lines, one JSON object each (``log_line_json``).
    log_file: str = ""
    #: The output lines are in the task's Redis stream (``tradectl task logs``).
    logs_in_redis: bool = False

    @property
    def task_id(self) -> str:
        """The task's id."""
        return self.submission.task_id

    def to_task_record(self) -> TaskRecord:
        """The run as a ``TaskRecord``, for printing while Redis has none."""
        s = self.submission
        ended = {f"{self.state.value}_at": self.finished_at} if self.state.is_terminal else {}
        data: dict[str, Any] = {
            "task_id": s.task_id,
            "task_type": s.task_type,
            "state": self.state,
            "priority": s.priority,
            "config": s.config,
            "submitted_by": s.submitted_by,
            "git_commit": s.git_commit,
            "timeout_s": s.timeout_s,
            "attempts": self.attempt,
            "worker": self.worker,
            "submitted_at": s.submitted_at,
            "running_at": self.started_at,
            "result": self.result,
            "error": self.error,
            "traceback": self.traceback,
            "fallback_reason": self.reason,
            **ended,
        }
        return TaskRecord.model_validate(data)


class LocalJournal:
    """The folder of local run records: ``<data_dir>/local/<task_id>.json``."""

    def __init__(self, settings: Settings) -> None:
        self.root = settings.data_dir / "local"

    def path(self, task_id: str) -> Path:
        """Where one run's record is kept."""
        return self.root / f"{task_id}.json"

    def log_path(self, task_id: str) -> Path:
        """Where one run's output lines are kept (also streamed to Redis when reachable)."""
        return self.root / f"{task_id}.log"

    def save(self, record: LocalRecord) -> None:
        """Write atomically: a crash leaves the old record or the new one, never half of one."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(record.model_dump_json(indent=2))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path(record.task_id))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the journal's lock file (``flock``) for the block: one publisher at a time."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".publish.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def start(self, record: LocalRecord, *, claimed: bool) -> None:
        """Record a run's start; only one run of a task per machine (``O_EXCL``).

        A record of a run handed back to the desktop (``queued``) may be replaced only when
        this run holds the task's claim in Redis (``claimed``): without Redis nothing would stop
        this machine running what a desktop worker runs now. An empty record left by a crash
        (a minute old) is replaced too.

        Raises:
            LocalRunExistsError: this machine has a record of that task already (finished,
                running, handed back, or being written by a process that got there first), or
                the journal cannot be written (the message says where and why).
        """
        path = self.path(record.task_id)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            if not self.root.is_dir():
                raise self._unwritable(record, f"{self.root} is not a folder") from None
            existing, stale = self.peek(record.task_id)
            replaceable = stale or (
                existing is not None and existing.state is TaskState.QUEUED and claimed
            )
            if not replaceable:
                raise LocalRunExistsError(
                    f"task {record.task_id}: {describe_existing(existing)}; not run again",
                    task_id=record.task_id,
                ) from None
        except OSError as e:
            raise self._unwritable(record, str(e)) from e
        try:
            self.save(record)
        except OSError as e:
            path.unlink(missing_ok=True)  # never leave an empty record blocking the id
            raise self._unwritable(record, str(e)) from e

    def peek(self, task_id: str) -> tuple[LocalRecord | None, bool]:
        """A run's record as ``(record, stale)``, tolerating a record being written.

        ``record`` is None while another process is writing it (an empty file), and ``stale``
        is True when such an empty file is over a minute old (its writer crashed).
        """
        try:
            return self.load(task_id), False
        except ValueError:
            try:
                age = time.time() - self.path(task_id).stat().st_mtime
            except OSError:
                return None, False
            return None, age > STALE_RESERVATION_S

    def _unwritable(self, record: LocalRecord, why: str) -> LocalRunExistsError:
        return LocalRunExistsError(
            f"task {record.task_id} not run locally: its record cannot be kept in "
            f"{self.root}: {why}",
            task_id=record.task_id,
        )

    def remove(self, task_id: str) -> None:
        """Forget a run (its record and its output lines)."""
        for path in (self.path(task_id), self.log_path(task_id)):
            path.unlink(missing_ok=True)

    def load(self, task_id: str) -> LocalRecord | None:
        """One run's record, or None."""
        path = self.path(task_id)
        if not path.is_file():
            return None
        return LocalRecord.model_validate_json(path.read_text(encoding="utf-8"))

    def all(self) -> list[LocalRecord]:
        """Every readable record, oldest first; an unreadable file is logged and skipped."""
        if not self.root.is_dir():
            return []
        found = []
        for path in sorted(self.root.glob("*.json")):
            try:
                found.append(LocalRecord.model_validate_json(path.read_text(encoding="utf-8")))
            except (OSError, ValueError) as e:
                log.warning("local_record_unreadable", path=str(path), error=str(e))
        return sorted(found, key=lambda r: r.started_at)


def log_line_json(line: LogLine) -> str:
    """One output line as the journal's log file keeps it."""
    return json.dumps({"ts": line.ts, "stream": line.stream, "text": line.text})


def read_log_file(path: Path, attempt: int) -> list[LogLine]:
    """The lines of a journal log file (a torn last line, from a crash, is skipped)."""
    lines = []
    with contextlib.suppress(FileNotFoundError), path.open(encoding="utf-8") as f:
        for raw in f:
            try:
                data = json.loads(raw)
                lines.append(LogLine(float(data["ts"]), data["stream"], attempt, data["text"]))
            except (ValueError, KeyError, TypeError):
                continue
    return lines


def describe_existing(existing: LocalRecord | None) -> str:
    """What this machine's journal says of a task, for a refusal to run it again."""
    if existing is None:
        return "another process on this machine is starting it"
    if existing.state.is_terminal:
        published = "" if existing.published else " (not yet in Redis: tradectl task sync-local)"
        return f"it ran on this machine already, {existing.state.value}{published}"
    if existing.state is TaskState.QUEUED:
        return "its run here was handed back to the desktop, which may be running it now"
    if _alive(existing):
        return f"it is running on this machine (process {existing.pid})"
    return "its run on this machine was lost: run `tradectl task sync-local` first"


async def store_artifacts(
    settings: Settings, record: LocalRecord, store: StatusStore | None
) -> None:
    """Copy a finished local run's artifacts to shared storage, noting the outcome in ``record``.

    Uses the same sync as the desktop's artifact-sync (manifest last, unchanged files skipped),
    from this machine's task folder. With ``TP_ARTIFACT_BACKEND=none`` they stay here. A failure
    is noted, not raised: ``publish_local_runs`` tries again.
    """
    task_dir = settings.tasks_dir / record.task_id
    if settings.artifact_backend == "none":
        record.artifacts = f"on this machine only, at {task_dir} (TP_ARTIFACT_BACKEND=none)"
        return
    request = ArtifactRequest(task_id=record.task_id, reason="finished", final=True, ts=time.time())
    progress = Progress()
    try:
        async with open_storage(settings) as storage:
            await sync_task(storage, request, task_dir, progress)
            status = status_of(request, storage, ArtifactState.SYNCED, progress, attempts=1)
    except Exception as e:  # storage, disk or a bug: the run's outcome is kept all the same
        error = str(e) if isinstance(e, (StorageError, OSError)) else repr(e)
        record.artifacts = f"on this machine only, at {task_dir}: shared storage failed: {error}"
        log.warning("local_artifacts_not_stored", task_id=record.task_id, error=error)
        return
    record.artifacts, record.artifacts_stored = status.location, True
    record.artifact_status = status
    await save_artifact_status(record, store)


async def save_artifact_status(record: LocalRecord, store: StatusStore | None) -> None:
    """Write the run's artifact sync status to Redis (``tradectl artifacts status``), once."""
    if store is None or record.artifact_status is None or record.artifact_status_saved:
        return
    with contextlib.suppress(StoreError):
        key = store.keys.artifacts(record.task_id)
        await store.save_report(key, record.artifact_status, ttl_s=FINISHED_TASK_TTL_S)
        record.artifact_status_saved = True


@dataclass(frozen=True)
class Published:
    """What ``publish_local_runs`` did with one local run."""

    task_id: str
    state: TaskState
    #: ``published``, ``already published``, ``artifacts stored``, ``conflict: ...``,
    #: ``not finished``.
    outcome: str
    artifacts: str


async def publish_local_runs(
    settings: Settings,
    store: StatusStore,
    broker: Broker | None,
    *,
    task_id: str | None = None,
    exact: bool = False,
) -> list[Published]:
    """Record finished local runs in Redis and copy their artifacts to shared storage.

    A run whose task Redis never saw gets its record created from the journalled submission,
    then claimed by the local worker name and moved to the run's end state, so the history
    shows one run, by ``local:<host>``. A run already claimed in Redis gets only its end
    recorded. Running it again changes nothing (each step is a compare-and-set).

    Args:
        settings: this machine's settings (Redis, storage, ``data_dir`` of the journal).
        store: a connected status store.
        broker: a connected broker to announce the end on, or None.
        task_id: only this run, by id or prefix (default: every unpublished one).
        exact: ``task_id`` is a whole id.

    Returns:
        One ``Published`` per run looked at.

    Raises:
        StoreError: Redis failed (what was published so far stays published).
    """
    journal = LocalJournal(settings)
    with journal.locked():  # one publisher at a time: no output line appended twice
        records = journal.all()
        if task_id is not None:
            records = [
                r
                for r in records
                if r.task_id == task_id or (not exact and r.task_id.startswith(task_id))
            ]
        done = []
        for record in records:
            try:
                published = await _publish_one(settings, store, broker, journal, record)
            except StoreError:
                raise  # Redis went away: nothing more can be published now
            except Exception as e:  # one bad record never blocks the others
                log.exception("local_run_not_published", task_id=record.task_id)
                published = Published(record.task_id, record.state, f"error: {e!r}", "")
            if published is not None:
                done.append(published)
        return done


async def _publish_one(
    settings: Settings,
    store: StatusStore,
    broker: Broker | None,
    journal: LocalJournal,
    record: LocalRecord,
) -> Published | None:
    """``publish_local_runs`` for one run; None when there was nothing to do."""
    if record.state is TaskState.QUEUED:  # a lost run handed back earlier: the desktop's now
        return None
    if not record.state.is_terminal:
        if _alive(record):
            return Published(record.task_id, record.state, "still running", "")
        outcome, handed_back = await _release_lost_run(store, record)
        journal.save(record)
        if handed_back:
            return Published(record.task_id, record.state, outcome, "")
    stored = record.artifact_status_saved or settings.artifact_backend == "none"
    if record.published and stored and record.logs_in_redis:
        if time.time() - (record.finished_at or record.started_at) > FINISHED_TASK_TTL_S:
            journal.remove(record.task_id)  # Redis has let its record expire too by now
        return None
    outcome = "already published"
    if not record.published:
        try:
            outcome = await _publish_end(store, record)
        except TaskNotFoundError:  # Redis lost the record (restarted empty): make it again
            record.in_redis = False
            outcome = await _publish_end(store, record)
        if record.published and broker is not None:
            await broker.announce(state_event(record.task_id, record.state, worker=record.worker))
    if record.published and not record.logs_in_redis:
        await _publish_log_lines(settings, store, journal, record)
    if not record.artifacts_stored and settings.artifact_backend != "none":
        await store_artifacts(settings, record, store)
    await save_artifact_status(record, store)
    journal.save(record)
    return Published(record.task_id, record.state, outcome, record.artifacts)


async def _publish_log_lines(
    settings: Settings, store: StatusStore, journal: LocalJournal, record: LocalRecord
) -> None:
    """Append the run's output lines the task's Redis stream lacks, from the journal's file.

    That is all of them for a run without Redis, and those lost to an outage for one that
    streamed (lines of this attempt are matched by time and text).
    """
    key = store.keys.task_logs(record.task_id)
    stored: set[tuple[float, str]] = set()
    after = "0-0"
    while batch := await read_after(store.redis, key, after):
        stored |= {(round(ln.ts, 3), ln.text) for ln in batch if ln.attempt == record.attempt}
        after = batch[-1].id
    lines = [
        ln
        for ln in read_log_file(journal.log_path(record.task_id), record.attempt)
        if (round(ln.ts, 3), ln.text) not in stored
    ]
    for start in range(0, len(lines), LOG_BATCH):
        batch = lines[start : start + LOG_BATCH]
        await append(store.redis, key, batch, max_lines=settings.task_log_max_lines)
    record.logs_in_redis = True


def _alive(record: LocalRecord) -> bool:
    """Whether the process that ran ``record`` is still running (on this machine).

    A pid reused by a later process is told apart by its start time (Linux ``/proc``).
    """
    if record.host != socket.gethostname() or record.pid <= 0:
        return False
    try:
        os.kill(record.pid, 0)
    except (ProcessLookupError, PermissionError):  # gone, or the pid is someone else's now
        return False
    return process_start(record.pid) == record.pid_start


def process_start(pid: int) -> str:
    """When process ``pid`` started, in clock ticks since boot (``/proc/<pid>/stat`` field 22).

    Empty where ``/proc`` is missing (macOS): the pid alone is then trusted.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


async def _release_lost_run(store: StatusStore, record: LocalRecord) -> tuple[str, bool]:
    """A local run whose process died (laptop crash, SIGKILL): give the task back, or fail it.

    Claimed in Redis: handed back now (``running -> queued``, due at once, as a worker's
    drain does), so the desktop's scheduler dispatches it to a worker; the journal says
    ``queued``. Safe because this machine knows its process is gone: nothing is running it.
    Never in Redis: it is ended ``failed`` here and published as such.

    Returns:
        ``(what happened, whether it was handed back to the desktop)``.
    """
    lost = f"local run lost: its process {record.pid} on {record.host} is gone"
    if record.in_redis:
        moved = await store.transition(
            record.task_id,
            (TaskState.RUNNING, TaskState.CANCELLING),
            TaskState.QUEUED,
            by=record.worker,
            reason=f"{lost}; handed back to the desktop by task sync-local",
            fields=HANDED_BACK,
            owner=(record.worker, record.attempt),
        )
        if moved.applied or moved.previous is not None:
            record.state = TaskState.QUEUED
            if not moved.applied:
                return f"lost; the task had moved on in Redis ({moved.previous})", True
            return f"{lost}; handed back to the desktop", True
        record.in_redis = False  # Redis lost the record (restarted empty): failed, published
    record.state, record.error = TaskState.FAILED, lost
    record.finished_at = time.time()
    record.end_fields = {"error": lost}
    record.end_reason = lost
    return lost, False


async def _publish_end(store: StatusStore, record: LocalRecord) -> str:
    """Create (if needed), claim and end the task in Redis; sets ``record.published``."""
    conflict = await _ensure_in_redis(store, record)
    if conflict is not None:
        return conflict
    current = await store.get(record.task_id)
    expected: tuple[TaskState, ...] = (TaskState.RUNNING, TaskState.CANCELLING)
    if current.state.is_terminal:
        settled = _already_ended(record, current)
        if settled is not None:
            return settled
        expected = (TaskState.FAILED,)  # failed by the reaper, not heard from: the run's end wins
    conflict = await _claim_unless_mine(store, record, current)
    if conflict is not None:
        return conflict
    moved = await store.transition(
        record.task_id,
        expected,
        record.state,
        by=record.worker,
        reason=record.end_reason or f"ran locally ({record.reason}); published later",
        fields=end_fields(record),
        owner=(record.worker, record.attempt),
    )
    if not moved.applied:
        return f"conflict: the task is {moved.previous} in Redis"
    record.published = True
    return "published"


def _already_ended(record: LocalRecord, current: TaskRecord) -> str | None:
    """For a task Redis holds as ended: what publishing this run comes to.

    None when the run's end may still be recorded: the reaper failed it for not hearing from
    this machine.
    """
    mine = current.worker == record.worker and current.attempts == record.attempt
    if mine and current.local_published:
        record.published = True
        return "already published"
    if mine and current.state is TaskState.CANCELLED:  # cancelled and reaped meanwhile
        record.published = True
        return "not recorded: the task was cancelled meanwhile (the result stays here)"
    if mine and current.state is TaskState.FAILED:
        return None
    return f"conflict: the task {current.state.value} in Redis by {current.worker or '-'}"


async def _claim_unless_mine(
    store: StatusStore, record: LocalRecord, current: TaskRecord
) -> str | None:
    """Claim a not-yet-started task as the local worker (a run Redis never saw); or a conflict."""
    if current.state in (TaskState.SUBMITTED, TaskState.QUEUED):
        claim = await store.claim(
            record.task_id,
            record.worker,
            lease_s=60.0,
            expected=(TaskState.SUBMITTED, TaskState.QUEUED),
            fields={"fallback_reason": record.reason, "running_at": record.started_at},
            reason=f"ran locally from {_when(record.started_at)} ({record.reason}); "
            "published by task sync-local",
        )
        if not claim.applied:
            return f"conflict: the task is {claim.previous} in Redis"
        record.attempt = claim.attempts
        return None
    if current.worker != record.worker:
        return f"conflict: the task is {current.state.value} in Redis on {current.worker or '-'}"
    return None


async def _ensure_in_redis(store: StatusStore, record: LocalRecord) -> str | None:
    """Create the task's record from the journalled submission; a conflict's text, or None."""
    if record.in_redis:
        return None
    sub = record.submission
    created = await store.create(sub)
    current = await store.get(record.task_id)
    if not created and (current.task_type, current.config) != (sub.task_type, sub.config):
        return f"conflict: Redis has another {current.task_type} task with this id"
    if created:  # the time the laptop submitted it, not the time of this publish
        await store.update_if(
            record.task_id, [TaskState.SUBMITTED], {"submitted_at": sub.submitted_at}
        )
    record.in_redis = True
    return None


def end_fields(record: LocalRecord) -> dict[str, str | int | float]:
    """The end's fields, stamped with the run's own end time (this machine's clock)."""
    fields: dict[str, str | int | float] = {**record.end_fields, "local_published": 1}
    if record.finished_at is not None:
        fields[f"{record.state.value}_at"] = record.finished_at
    return fields


def _when(ts: float) -> str:
    """A local run's time for the history (this machine's clock, UTC)."""
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="seconds")
