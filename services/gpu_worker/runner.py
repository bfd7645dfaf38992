"""Runs tasks in child processes forked from a warm forkserver, reused while they stay healthy.

The worker's own process never imports task code, torch or CUDA: the forkserver preloads the heavy
modules once (without touching CUDA, since a process that initialised CUDA cannot fork) and the
tasks run in its children. A child that ran a task to success goes back to a pool and takes the
next task with the same logging set-up (``ChildJob.max_tasks`` tasks at most, then it is
replaced); a failure, a stop (cancel, drain), a time-out or a crash retires it, so a crash, CUDA
out-of-memory or leak dies with the child and the next task gets a fresh one. ``max_tasks=1``
gives every task a fresh child (GPU jobs that want isolation: ``TP_WORKER_GPU_ISOLATE``).
Between tasks a reused child gets back its environment variables and working directory.

Parent -> child over a duplex pipe (a socket pair, read by the worker's event loop itself):
a ``ChildJob`` to run, or None to exit; or ``("prepare", ChildJob)`` (make its folders while the
worker's claim is in flight) followed by ``("go", attempt)`` (run it as that attempt) or
``("abort",)`` (the claim was refused: nothing runs). Child -> parent
(picklable tuples, our own processes only), the last four ending a task:
    ("progress", fraction, message, metrics)
    ("checkpoint",)                    the task saved a checkpoint (worth syncing)
    ("logs", [LogLine, ...])           lines of its stdout, stderr and log records (``capture``)
    ("result", result_dict)
    ("stopped", partial_result_dict)   the task returned early after a SIGTERM
    ("error", error_text, traceback_text, retryable)
    ("not_started", os_error)          the task's folders could not be made; it did not run

The child makes the task's folders itself (``run_job``): the worker's event loop, shared by all
its tasks, does no file system work per task. The output capture lives as long as the child
(``capture``): a task's lines all reach the worker before its end, whichever child it ran in.

The child starts its own session, so signals sent to the worker's process group (Ctrl-C in a
terminal, a group-wide SIGTERM) reach the worker only; the worker decides what its tasks get.

The messages come from two threads of the child (the task's, and the output capture's sender),
so every send holds one lock: ``Connection.send`` may write a message in two pieces.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import importlib
import json
import multiprocessing
import os
import select
import signal
import struct
import threading
import traceback
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import structlog

from services.gpu_worker.capture import OutputCapture
from services.gpu_worker.context import RETRYABLE_ERRORS, TaskContext
from services.gpu_worker.tasks import TASK_ENTRYPOINTS
from shared.constants import CHILD_EXIT_GRACE_S, TRACEBACK_SUMMARY_CHARS
from shared.logstream import LogLine
from shared.settings import LogFormat, LogLevel, Settings, redact_text

log = structlog.get_logger(__name__)

_context: multiprocessing.context.ForkServerContext | None = None


def forkserver(
    preload: Sequence[str] = (),
) -> multiprocessing.context.ForkServerContext:
    """The process-wide forkserver context; ``preload`` applies when it is first created."""
    global _context  # noqa: PLW0603 - one forkserver per process is the point
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(list(preload))
    return _context


def warm_up(preload: Sequence[str]) -> None:
    """Start the forkserver now (it imports torch, ~1-3 s) so the first task starts fast.

    Call from the main thread. The forkserver is started with SIGINT and SIGTERM ignored (ignored
    dispositions survive exec and fork), so a signal sent to the worker's whole process group
    (Ctrl-C, a group-wide SIGTERM) can neither kill it nor a child being forked; the children
    install their own handlers.
    """
    from multiprocessing import forkserver as fs

    # This module first, always: every child runs child_main from it, and a child that had to
    # import it (structlog, redis, pydantic settings...) spent 100-200 ms of each task doing so.
    forkserver([__name__, *(m for m in preload if m != __name__)])
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        fs.ensure_running()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def shut_down() -> None:
    """Stop the forkserver and multiprocessing's resource tracker and reap them.

    Before a worker re-executes itself: otherwise both would outlive the old image as zombie
    children of the new one (same pid), two more per code update. Uses CPython's private
    ``_stop`` (present in 3.11-3.13); where it is missing the processes still exit on their own.
    """
    from multiprocessing import forkserver as fs
    from multiprocessing import resource_tracker as rt

    for owner in (getattr(fs, "_forkserver", None), getattr(rt, "_resource_tracker", None)):
        stop = getattr(owner, "_stop", None)
        if stop is not None:
            with contextlib.suppress(Exception):
                stop()


def wait_until_warm() -> None:
    """Block until the forkserver finished its preload, by forking one no-op child from it.

    A worker consumes only after this, so it never claims a task it cannot start yet (a claimed
    task waiting seconds for torch to import would be stranded if the worker died meanwhile).
    """
    process = forkserver().Process(target=os.getpid, daemon=True)
    process.start()
    process.join()


@dataclass(frozen=True)
class ChildJob:
    """What the child needs to run one task (picklable)."""

    task_id: str
    task_type: str
    config: dict[str, Any]
    attempt: int
    artifact_dir: Path
    checkpoint_path: Path
    tracking_uri: str
    git_commit: str | None = None
    artifact_location: str | None = None
    log_level: LogLevel = "info"
    log_format: LogFormat = "auto"
    #: The worker's settings, for tasks that use the platform themselves (``hyperopt``).
    settings: Settings | None = None
    #: Echo the task's stdout on stderr (a local run: the client's stdout carries its result).
    stdout_to_stderr: bool = False
    #: Tasks a child may run before it is replaced (1: a fresh child for this task, none after).
    max_tasks: int = 1
    #: The task may use the GPU: a child retired after it is reaped before the run's end is
    #: reported, so its CUDA memory is free when the lane's next task starts. Otherwise a pooled
    #: child retired after a success (its ``max_tasks`` run) exits in the background.
    gpu_lane: bool = False

    @property
    def pool_key(self) -> tuple[Any, ...]:
        """What a reused child must share with this job: its process-wide set-up."""
        return (self.log_level, self.log_format, self.stdout_to_stderr, id(self.settings))


@dataclass
class ChildOutcome:
    """How the child ended: a result, an error, or neither (it died)."""

    result: dict[str, Any] | None = None
    error: str | None = None
    traceback: str | None = None
    exitcode: int | None = None
    timed_out: bool = False
    stopped: bool = False
    retryable: bool = False

    @property
    def failure(self) -> str | None:
        """The error to record, or None when the task succeeded."""
        if self.timed_out:
            return "timed out"
        if self.error is not None:
            return self.error
        if self.stopped:
            return "stopped by SIGTERM before it finished"
        if self.result is None:
            return f"child process died: {describe_exit(self.exitcode)}"
        return None


def describe_exit(exitcode: int | None) -> str:
    """``exit code 3`` or ``killed by SIGKILL`` (multiprocessing reports signals as -signum)."""
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        return f"killed by {signal.Signals(-exitcode).name}"
    return f"exit code {exitcode}"


#: In a task child: a SIGTERM arrived while no task's handler was installed yet.
_stop_requested = threading.Event()


def _remember_stop(_signum: int, _frame: object) -> None:
    _stop_requested.set()


def serve_jobs(conn: Connection, first: ChildJob, run_first: bool = True) -> None:
    """Body of a task child: set the process up once, then run jobs until told to exit.

    ``first`` sets up the process (logging, secrets, stdout) and is its first job, unless
    ``run_first`` is False (a spare: set up, then it waits for a job); later jobs come over
    ``conn`` and share that set-up (``ChildJob.pool_key``). None or EOF ends the child. The
    output capture is started once (a spare starts it before its first job) and serves every job
    of the child (a new one per job cost about 1 ms: pipes, dup2s, three threads); where it
    cannot be started, each job tries again.
    """
    # First: the forkserver's children start with SIGTERM ignored, and a stop sent while this
    # child sets itself up (or between the parent's job and run_job) must not be lost.
    signal.signal(signal.SIGTERM, _remember_stop)
    os.setsid()
    _release_forkserver()
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if first.stdout_to_stderr:
        os.dup2(2, 1)
    # MLflow prints run URLs with the tracking server's credentials in them: not into task logs.
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    _configure_child_logging(first)
    report = _locked_sender(conn)
    environ, cwd = dict(os.environ), os.getcwd()
    capture: OutputCapture | None = None
    job: ChildJob | None = first
    made: Folders | None = None  # None: its folders are not made yet
    if not run_first:
        capture = _start_capture(first.attempt, report, _secrets(first))
        job, made = _next_job(conn)
    while job is not None:
        if capture is None:
            capture = _start_capture(job.attempt, report, _secrets(job))
        run_job(job, report, capture, made=made)
        # What a task changed in the process for itself is undone before the next one.
        _stop_requested.clear()
        signal.signal(signal.SIGTERM, _remember_stop)
        os.environ.clear()
        os.environ.update(environ)
        os.chdir(cwd)
        job, made = _next_job(conn)
    if capture is not None:
        capture.stop()
    conn.close()


@dataclass(frozen=True)
class Folders:
    """How making a task's folders went: ``error`` is None when they were made."""

    error: OSError | None = None


def _next_job(conn: Connection) -> tuple[ChildJob | None, Folders | None]:
    """The worker's next job for this child, and how making its folders went.

    None when told to exit, or when the worker is gone. A job sent to prepare has its folders
    made at once, then waits for its go (with the attempt number the worker's claim gave it) or
    for an abort (the claim was refused: the next message is awaited). A job sent to run at once
    has them made by ``run_job`` (None).
    """
    while True:
        try:
            message: Any = conn.recv()
        except (EOFError, OSError):
            return None, None
        if not isinstance(message, tuple) or message[0] != "prepare":
            return message, None
        job: ChildJob = message[1]
        made = _make_folders(job)
        try:
            follow: Any = conn.recv()
        except (EOFError, OSError):
            return None, None
        if not isinstance(follow, tuple):  # a job or None: the prepared one will not run
            return follow, None
        if follow[0] == "go":
            return dataclasses.replace(job, attempt=follow[1]), made


def _make_folders(job: ChildJob) -> Folders:
    """Make the task's folders (``Folders.error`` says why not)."""
    try:
        job.artifact_dir.mkdir(parents=True, exist_ok=True)
        job.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return Folders(e)
    return Folders()


def run_job(
    job: ChildJob,
    report: Callable[[tuple[Any, ...]], None],
    capture: OutputCapture | None = None,
    *,
    made: Folders | None = None,
) -> None:
    """Run one task's entry point in this child; its end is the last message it reports.

    Makes the task's folders first (``TaskContext.artifact_dir`` exists for the task); when
    they cannot be made the task does not run and its end is ``("not_started", OSError)``.
    ``capture`` (None: the output is not captured) stamps the task's attempt on its lines from
    the start, and its ``flush`` sends everything the task wrote and logged before the end is
    reported: the worker records the outcome at the end, and a log follower stops there.
    ``made`` tells how making the folders went when that was done already (``_next_job``).
    """
    folders = made or _make_folders(job)
    if folders.error is not None:  # the worker reports it as a task it could not start
        report(("not_started", folders.error))
        return
    ctx = TaskContext(
        task_id=job.task_id,
        attempt=job.attempt,
        artifact_dir=job.artifact_dir,
        checkpoint_path=job.checkpoint_path,
        tracking_uri=job.tracking_uri,
        git_commit=job.git_commit,
        artifact_location=job.artifact_location,
        settings=job.settings,
        _progress_sink=lambda f, m, metrics: report(("progress", f, m, metrics)),
        _checkpoint_sink=lambda: report(("checkpoint",)),
    )
    signal.signal(signal.SIGTERM, lambda *_: ctx.request_stop())
    if _stop_requested.is_set():  # a SIGTERM came before the line above: it counts
        ctx.request_stop()
    structlog.contextvars.bind_contextvars(task_id=job.task_id, attempt=job.attempt)
    secrets = _secrets(job)
    if capture is not None:
        capture.begin(job.attempt, secrets)
    end: tuple[Any, ...]
    try:
        from shared.task_types import validate_config

        config = validate_config(job.task_type, job.config)
        module_name, func_name = TASK_ENTRYPOINTS[job.task_type].split(":")
        run = getattr(importlib.import_module(module_name), func_name)
        result = plain_result(run(config, ctx))
        end = ("stopped" if ctx.should_stop() else "result", result)
    except BaseException as e:  # everything the task raises is reported; the child retires
        tb = redact_text(traceback.format_exc()[-TRACEBACK_SUMMARY_CHARS:], secrets)
        error = redact_text(f"{type(e).__name__}: {e}", secrets)
        end = ("error", error, tb, isinstance(e, RETRYABLE_ERRORS))
    finally:
        if capture is not None:
            capture.flush()  # its last lines go before the end: the end is the job's last message
    report(end)


def plain_result(result: object) -> dict[str, Any]:
    """A task's return value as the plain JSON data the worker records (a dict).

    None counts as ``{}``. A numpy or torch number (or one-element array) becomes a Python number
    (``item()``), an array a list (``tolist()``): the worker never gets, and never unpickles, a
    task's own objects, and never meets one it cannot record.

    Raises:
        TypeError: not a dict, or it holds something JSON cannot carry (the task fails, naming it).
    """
    if result is None:
        return {}
    if not isinstance(result, Mapping):
        raise TypeError(f"a task must return a dict (a JSON object), not {type(result).__name__}")
    plain: dict[str, Any] = json.loads(json.dumps(dict(result), default=_as_json))
    return plain


def _as_json(value: Any) -> Any:
    """``json.dumps``'s fallback: numbers and arrays of numpy and torch as plain data."""
    for method in ("item", "tolist"):
        convert = getattr(value, method, None)
        if callable(convert):
            with contextlib.suppress(TypeError, ValueError, RuntimeError):  # item(): many values
                return convert()
    raise TypeError(f"the result holds a {type(value).__name__}, which JSON cannot carry")


def _secrets(job: ChildJob) -> list[str]:
    """The secrets to redact from the job's output and errors (its settings')."""
    return job.settings.secret_values() if job.settings is not None else []


def _start_capture(
    attempt: int, report: Callable[[tuple[Any, ...]], None], secrets: Sequence[str] = ()
) -> OutputCapture | None:
    """Capture the child's output for its tasks' live logs, or None when it cannot be captured.

    A task whose output cannot be captured (no file descriptors left) still runs, with a warning
    in the worker's log.
    """
    capture = OutputCapture(attempt, report, secrets)
    try:
        capture.start()
    except OSError as e:
        log.warning("output_not_captured", error=str(e))
        return None
    return capture


def _locked_sender(conn: Connection) -> Callable[[tuple[Any, ...]], None]:
    """A thread-safe send to the worker; if the worker is gone, the child exits at once.

    There is no one left to work for, and the task must not run on unwatched.
    """
    lock = threading.Lock()

    def report(message: tuple[Any, ...]) -> None:
        try:
            with lock:
                conn.send(message)
        except (BrokenPipeError, ConnectionResetError):
            os._exit(1)

    return report


def _release_forkserver() -> None:
    """Close the forkserver "alive" pipe end every forkserver child inherits.

    CPython hands each child a copy of the worker's end of that pipe, so the forkserver would
    only notice its worker died once every child had exited too. Without the copy, a SIGKILLed
    worker takes the forkserver down at once, and ``_die_with_parent`` then ends the child.
    """
    from multiprocessing import forkserver as fs

    server: Any = fs._forkserver  # no public way to drop the inherited end
    fd = server._forkserver_alive_fd
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)
        server._forkserver_alive_fd = None


#: prctl option: signal to deliver to this process when its parent dies (Linux).
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this child when its parent, the forkserver, dies.

    The forkserver exits as soon as the worker does, even when the worker was SIGKILLed, so a
    lost worker never leaves a task running (and holding GPU memory) behind it.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the broken pipe ends the child instead
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def _configure_child_logging(job: ChildJob) -> None:
    """Log like the worker (same format and level); each job binds its task id."""
    from shared.logging import configure_logging
    from shared.settings import Settings

    # The worker's settings when given: the redacting processor then knows its secrets.
    settings = job.settings or Settings.model_construct(
        log_level=job.log_level, log_format=job.log_format
    )
    configure_logging(settings, service="task")


#: Message kinds that end a task (the child is then idle, or retiring).
_TASK_ENDS = frozenset({"result", "stopped", "error", "not_started"})


#: Bytes taken from a child's socket per readiness callback (messages may span several).
_READ_CHUNK = 1 << 16
#: Reads of a child's socket at most once it exited (what it sent before, 4 MB at most).
_EXIT_DRAIN_READS = 64


class WarmChild:
    """One task child process: started from the forkserver, reused for task after task.

    The event loop that started it reads what the child sends (``listen``: a reader callback on
    the socket, no thread in between) and relays each message to the task it is running now
    (``attach``); the child's end is relayed as None: EOF on the socket, or its exit (a pidfd,
    where Linux has them), whichever comes first, since a process the task forked may hold the
    socket open long after the child died. Everything but ``start`` and ``retire`` runs in that
    loop.
    """

    def __init__(self, first: ChildJob, *, run_first: bool = True) -> None:
        mp = forkserver()
        self.conn, child_end = mp.Pipe(duplex=True)
        self.process = mp.Process(
            target=serve_jobs, args=(child_end, first, run_first), daemon=True
        )
        self._child_end = child_end
        self.key = first.pool_key
        self.tasks_run = 0
        self._sink: Callable[[tuple[Any, ...] | None], None] | None = None
        self._gone = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox = bytearray()
        #: Readable once the child exited (``os.pidfd_open``); None where unavailable.
        self._pidfd: int | None = None

    def start(self) -> None:
        """Fork it (blocks until the forkserver did); then ``listen`` in the loop."""
        self.process.start()
        self._child_end.close()  # the child holds the only other end: EOF means it is gone
        pidfd_open = getattr(os, "pidfd_open", None)
        if pidfd_open is not None and self.process.pid is not None:
            with contextlib.suppress(OSError):  # an old kernel: EOF alone tells its end
                self._pidfd = pidfd_open(self.process.pid)

    def listen(self) -> None:
        """Read the child's messages in the running loop (moving from another loop if needed)."""
        loop = asyncio.get_running_loop()
        if self._loop is loop or self._gone:
            return
        self.unlisten()
        self._loop = loop
        loop.add_reader(self.conn.fileno(), self._on_readable)
        if self._pidfd is not None:
            loop.add_reader(self._pidfd, self._on_exit)

    def unlisten(self) -> None:
        """Stop reading (before ``retire`` closes the socket, or the loop changes)."""
        loop, self._loop = self._loop, None
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(OSError, ValueError, RuntimeError):
                loop.remove_reader(self.conn.fileno())
            if self._pidfd is not None:
                with contextlib.suppress(OSError, ValueError, RuntimeError):
                    loop.remove_reader(self._pidfd)

    def _close_pidfd(self) -> None:
        pidfd, self._pidfd = self._pidfd, None
        if pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(pidfd)

    @property
    def alive(self) -> bool:
        """Not known to be gone (its socket is open and it has not exited)."""
        return not self._gone and self.process.exitcode is None

    def attach(self, sink: Callable[[tuple[Any, ...] | None], None]) -> None:
        """Send what the child says from now on to ``sink`` (None = it is gone)."""
        self._sink = sink
        if self._gone:
            sink(None)

    def detach(self) -> None:
        """Stop relaying (the task ended); anything said meanwhile is dropped."""
        self._sink = None

    def _on_readable(self) -> None:
        """One read of what the socket holds (it cannot block: the loop saw it readable).

        Messages are framed as ``multiprocessing.connection.Connection.send`` frames them: a
        4-byte big-endian signed length (-1: an 8-byte unsigned length follows), then the
        pickle. A message split across reads waits in ``_inbox`` for its rest.
        """
        if not self._read_once():
            self._ended()

    def _read_once(self) -> bool:
        """Read what the socket holds, relay the messages it completes; False at EOF."""
        try:
            data = os.read(self.conn.fileno(), _READ_CHUNK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if data:
            self._feed(data)
        return bool(data)

    def _on_exit(self) -> None:
        """The child exited: take what it sent before (bounded), then it is gone.

        Whatever is still in the socket was written before the exit, or by a process the task
        forked (which may hold the socket for ever: hence the bound, and no wait for EOF).
        """
        poller = select.poll()
        poller.register(self.conn.fileno(), select.POLLIN)
        for _ in range(_EXIT_DRAIN_READS):
            if self._gone or not poller.poll(0) or not self._read_once():
                break
        self._ended()

    def _feed(self, data: bytes) -> None:
        """Frame ``data`` onto what was read before and relay each message now whole."""
        inbox = self._inbox
        inbox += data
        while len(inbox) >= 4:
            size, start = struct.unpack_from("!i", inbox)[0], 4
            if size == -1:
                if len(inbox) < 12:
                    return
                size, start = struct.unpack_from("!Q", inbox, 4)[0], 12
            if len(inbox) < start + size:
                return
            try:
                item = ForkingPickler.loads(bytes(inbox[start : start + size]))
            except Exception:  # not our framing: treat the child as lost, never guess
                log.exception("child_message_unreadable", pid=self.process.pid)
                if self.process.pid is not None and self.process.exitcode is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.process.pid, signal.SIGKILL)
                self._ended()
                return
            del inbox[: start + size]
            if self._sink is not None:
                self._sink(item)

    def _ended(self) -> None:
        """EOF or exit: the child is gone; tell the task it was running, stop reading."""
        if self._gone:
            return
        self._gone = True
        self.unlisten()
        self._close_pidfd()
        if self._sink is not None:
            self._sink(None)

    def send(self, message: ChildJob | tuple[Any, ...]) -> None:
        """Hand it a job, or a prepare, go or abort (it is idle: its last task ended).

        Raises:
            OSError: it is gone.
        """
        self.conn.send(message)

    async def retire_soon(self, timeout_s: float) -> int | None:
        """``retire`` off the event loop, reading stopped first; the exit code."""
        self.unlisten()
        return await asyncio.to_thread(self.retire, timeout_s)

    def retire(self, timeout_s: float) -> int | None:
        """Ask it to exit (SIGKILL after ``timeout_s``), reap it; its exit code (blocking).

        Call ``unlisten`` first, in the loop (``retire_soon`` does): this closes the socket.
        """
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(None)
        self.process.join(timeout_s)
        if self.process.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid or 0, signal.SIGKILL)
            self.process.join()
        self.conn.close()
        self._close_pidfd()
        return self.process.exitcode


#: Idle children by ``ChildJob.pool_key``, most recently used last (this process's event loop).
_idle: dict[tuple[Any, ...], list[WarmChild]] = {}


def _take_idle(job: ChildJob) -> WarmChild | None:
    while pool := _idle.get(job.pool_key):
        child = pool.pop()
        if child.alive:
            return child
        child.unlisten()  # died while idle (killed from outside): reap, try the next
        child._close_pidfd()
        child.process.join(0)
    return None


#: Background work on children (spares being forked, worn-out children exiting), in this loop.
_background: set[asyncio.Task[Any]] = set()


def _in_background(coro: Awaitable[Any], name: str) -> None:
    task = asyncio.ensure_future(coro)
    task.set_name(name)
    _background.add(task)
    task.add_done_callback(_background.discard)


def _start_spare(job: ChildJob) -> None:
    """Fork a child for ``job``'s pool in the background, unless one is idle or on its way.

    A child retired after a task (its ``max_tasks`` run, a failure, a stop) is replaced before
    the lane's next task needs it: that task finds it idle instead of waiting for a fork and the
    child's set-up (~20-30 ms with torch preloaded).
    """
    if _idle.get(job.pool_key) or any(t.get_name() == "spare" for t in _background):
        return

    async def start() -> None:
        child = WarmChild(job, run_first=False)
        try:
            await asyncio.to_thread(child.start)
        except Exception as e:  # the next task forks its own (and says why if it fails too)
            log.warning("spare_child_not_started", error=repr(e))
            return
        child.listen()
        _idle.setdefault(child.key, []).append(child)

    _in_background(start(), "spare")


def _kill_group(pid: int | None) -> None:
    """SIGKILL the process group a child leads (it called ``setsid``): what its task forked.

    A process the task forked (a data loader's worker, a pool) outlives a child that died, with
    the child's socket and maybe GPU memory; its group still bears the child's pid.
    """
    if pid:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def prepare(job: ChildJob) -> WarmChild | None:
    """Hand an idle child of the pool ``job`` to prepare (its folders) during the claim.

    Returns the child, out of the pool until ``ChildProcess(prepared=...)`` runs the job on it
    (``("go", attempt)``) or ``release_prepared`` gives it back; None when no child is idle (or
    pooling is off: ``max_tasks`` 1).
    """
    if job.max_tasks <= 1:
        return None
    child = _take_idle(job)
    if child is None:
        return None
    try:
        child.send(("prepare", job))
    except OSError:  # died just now
        _in_background(child.retire_soon(0), "retire")
        return None
    return child


def release_prepared(child: WarmChild) -> None:
    """The claim was refused (or failed): the prepared child runs nothing and is idle again."""
    try:
        child.send(("abort",))
    except OSError:
        _in_background(child.retire_soon(0), "retire")
        return
    _idle.setdefault(child.key, []).append(child)


async def close_idle() -> None:
    """Retire every idle child (the worker is stopping or restarting on new code).

    Spares still being forked are waited for first, and retired with the rest.
    """
    while _background:
        await asyncio.gather(*list(_background), return_exceptions=True)
    children = [child for pool in _idle.values() for child in pool]
    _idle.clear()
    await asyncio.gather(*(c.retire_soon(CHILD_EXIT_GRACE_S) for c in children))


class ChildProcess:
    """One task's run in a child process, as the worker's event loop sees it.

    Args:
        job: what to run.
        on_progress: called in the event loop for each progress message
            ``(fraction, message, metrics)``.
        on_checkpoint: called in the event loop when the task saved a checkpoint.
        on_logs: called in the event loop with each batch of the task's output lines; must
            return at once (it only queues them).
        prepared: a child already handed the job to prepare (``prepare``): it runs there.
    """

    def __init__(
        self,
        job: ChildJob,
        on_progress: Any,
        on_checkpoint: Any = None,
        on_logs: Callable[[list[LogLine]], None] | None = None,
        *,
        prepared: WarmChild | None = None,
    ) -> None:
        self.job = job
        self._prepared = prepared
        self._on_progress = on_progress
        self._on_checkpoint = on_checkpoint
        self._on_logs = on_logs
        self._process: multiprocessing.process.BaseProcess | None = None
        self._pending_signal: signal.Signals | None = None
        #: Set once the task ended: signals meant for it must not reach the child's next task.
        self._ended = False
        #: A signal was sent for this task: the child is not reused (one may still be on its way
        #: after the task ended, and would stop the next task).
        self._signalled = False
        #: How the task ended (a kind of ``_TASK_ENDS``); None while it runs, or if it never did.
        self._end_kind: str | None = None
        #: Why the child could not make the task's folders (the task did not run), if so.
        self._not_started: OSError | None = None

    @property
    def pid(self) -> int | None:
        """The child's pid once started."""
        return None if self._process is None else self._process.pid

    async def run(
        self, timeout_s: float, on_started: Callable[[int], Awaitable[None]] | None = None
    ) -> ChildOutcome:
        """Run the job in an idle child of the pool, or a new one; return how it ended.

        The child is killed (SIGKILL) when ``timeout_s`` passes; ``outcome.timed_out`` is then set.
        A child whose task succeeded goes back to the pool (``job.max_tasks`` tasks at most);
        any other end retires it. The child makes the task's folders (not this event loop).

        Raises:
            OSError: the child could not make the task's folders (a file in their place, disk
                full...); the task did not run and its child was retired.
        """
        queue: asyncio.Queue[tuple[Any, ...] | None] = asyncio.Queue()
        child = await self._child_for_job(queue.put_nowait)
        child.tasks_run += 1
        self._process = child.process
        if self._pending_signal is not None:
            self._signal(self._pending_signal)
        outcome = ChildOutcome()
        try:
            if on_started is not None and child.process.pid is not None:
                await on_started(child.process.pid)
            async with asyncio.timeout(timeout_s):  # no task of its own, as wait_for makes
                await self._relay(queue, outcome)
        except TimeoutError:
            outcome.timed_out = True
            self.kill()
        finally:
            child.detach()
            self._ended = True
        await self._after(child, outcome)
        return outcome

    async def _child_for_job(self, relay: Callable[[tuple[Any, ...] | None], None]) -> WarmChild:
        """An idle child of the pool, or a new one, relaying to ``relay``, with the job in hand.

        Raises:
            Whatever starting a new child raised (the task's folders are made first).
        """
        # Attached before the job is handed over: a fast task may end before the next line.
        child, self._prepared = self._prepared, None
        go: Any = ("go", self.job.attempt)  # a prepared child has the job: it only needs a go
        if child is None:
            child = _take_idle(self.job) if self.job.max_tasks > 1 else None
            go = self.job
        if child is not None:
            child.listen()
            child.attach(relay)
            try:
                child.send(go)
            except OSError:  # it died just now: a fresh one takes the job
                child.detach()
                await child.retire_soon(0)
            else:
                return child
        child = WarmChild(self.job)
        child.attach(relay)
        try:
            await asyncio.to_thread(child.start)  # blocks until the forkserver forked
        except Exception:
            await self._make_folders()
            raise
        child.listen()
        return child

    async def _after(self, child: WarmChild, outcome: ChildOutcome) -> None:
        """Pool the child, or retire it (and fork a spare for a pool); sets the exit code.

        Raises:
            OSError: the child could not make the task's folders (``run``'s ``Raises``).
        """
        succeeded = outcome.result is not None and outcome.failure is None
        reusable = not self._signalled and child.tasks_run < self.job.max_tasks
        pooled = self.job.max_tasks > 1
        if succeeded and reusable and child.alive:
            _idle.setdefault(child.key, []).append(child)
            outcome.exitcode = 0
            return
        worn_out = succeeded and not self._signalled and child.alive
        if pooled and worn_out:
            _start_spare(self.job)  # forked while this one exits: the next task is due now
            if not self.job.gpu_lane:  # its task done, it exits in the background (code 0)
                _in_background(child.retire_soon(CHILD_EXIT_GRACE_S), "retire")
                outcome.exitcode = 0
                return
        if self._end_kind is None:  # it died, or was killed: what its task forked goes too
            _kill_group(child.process.pid)
        # Retire it: a task that ended (even failed) lets it exit by itself; one that did not
        # (it died, or was killed on time-out) is reaped, with SIGKILL after the grace.
        outcome.exitcode = await child.retire_soon(CHILD_EXIT_GRACE_S)
        if pooled and not worn_out:  # after a failure or a stop: once it is gone (a cancel's
            _start_spare(self.job)  # end waits for that exit, not for a fork beside it)
        if self._not_started is not None:  # as when this loop made the folders: the caller's
            raise self._not_started
        if self._end_kind is None:  # died, or killed, maybe before it made the folders
            await self._make_folders()

    async def _make_folders(self) -> None:
        """Make the task's folders where its child may not have got to (rare: off the fast path).

        Once a run ended, however it ended, its folders exist, as when this event loop made them
        before every child: artifact sync, asked for after every end, fails a task without a
        folder. A failure here is left unsaid: the run's own end is the news.
        """

        def make() -> None:
            with contextlib.suppress(OSError):
                self.job.artifact_dir.mkdir(parents=True, exist_ok=True)
                self.job.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)

        await asyncio.to_thread(make)

    def terminate(self) -> None:
        """SIGTERM the child: the task is asked to stop (``ctx.should_stop()``)."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the child (no-op if it already exited)."""
        self._signal(signal.SIGKILL)

    def _signal(self, sig: signal.Signals) -> None:
        if self._ended:
            return  # the task ended: the child may be running another task by now
        if self._process is None or self._process.pid is None:
            self._pending_signal = sig  # sent as soon as the child exists
            return
        if self._process.exitcode is not None:
            return  # gone (and reaped): its pid may already belong to another process
        self._signalled = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._process.pid, sig)

    async def _relay(
        self, queue: asyncio.Queue[tuple[Any, ...] | None], outcome: ChildOutcome
    ) -> None:
        """Apply the child's messages until its task ends (or the child is gone)."""
        while (item := await queue.get()) is not None:
            kind = item[0]
            if kind == "progress":
                await self._on_progress(item[1], item[2], item[3])
            elif kind == "checkpoint" and self._on_checkpoint is not None:
                await self._on_checkpoint()
            elif kind == "logs" and self._on_logs is not None:
                self._on_logs(item[1])
            elif kind in ("result", "stopped"):
                outcome.result = item[1]
                outcome.stopped = kind == "stopped"
            elif kind == "error":
                outcome.error, outcome.traceback, outcome.retryable = item[1], item[2], item[3]
            elif kind == "not_started":
                self._not_started = item[1]
            if kind in _TASK_ENDS:
                self._end_kind = kind
                return
