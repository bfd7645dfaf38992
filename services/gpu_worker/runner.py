"""Runs one task in a child process forked from a warm forkserver.

The worker's own process never imports task code, torch or CUDA: the forkserver preloads the heavy
modules once (without touching CUDA, since a process that initialised CUDA cannot fork) and each
task gets a fresh child from it. A crash, CUDA out-of-memory or leak dies with the child.

Child -> parent messages over a one-way pipe (picklable tuples, our own processes only):
    ("progress", fraction, message, metrics)
    ("checkpoint",)                    the task saved a checkpoint (worth syncing)
    ("logs", [LogLine, ...])           lines of its stdout, stderr and log records (``capture``)
    ("result", result_dict)
    ("stopped", partial_result_dict)   the task returned early after a SIGTERM
    ("error", error_text, traceback_text, retryable)

The child starts its own session, so signals sent to the worker's process group (Ctrl-C in a
terminal, a group-wide SIGTERM) reach the worker only; the worker decides what its tasks get.

The messages come from two threads of the child (the task's, and the output capture's sender),
so every send holds one lock: ``Connection.send`` may write a message in two pieces.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib
import multiprocessing
import os
import signal
import threading
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
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


def child_main(job: ChildJob, conn: Connection) -> None:
    """Body of the child process: run the task's entry point and send back what happened."""
    report = _locked_sender(conn)
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
    signal.signal(signal.SIGTERM, lambda *_: ctx.request_stop())  # first: a stop is never lost
    os.setsid()
    _release_forkserver()
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if job.stdout_to_stderr:
        os.dup2(2, 1)
    # MLflow prints run URLs with the tracking server's credentials in them: not into task logs.
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    secrets = job.settings.secret_values() if job.settings is not None else []
    _configure_child_logging(job)
    capture = _start_capture(job.attempt, report, secrets)
    try:
        from shared.task_types import validate_config

        config = validate_config(job.task_type, job.config)
        module_name, func_name = TASK_ENTRYPOINTS[job.task_type].split(":")
        run = getattr(importlib.import_module(module_name), func_name)
        result = run(config, ctx)
        report(("stopped" if ctx.should_stop() else "result", result))
    except BaseException as e:  # everything the task raises is reported, then the child exits
        tb = redact_text(traceback.format_exc()[-TRACEBACK_SUMMARY_CHARS:], secrets)
        error = redact_text(f"{type(e).__name__}: {e}", secrets)
        report(("error", error, tb, isinstance(e, RETRYABLE_ERRORS)))
    finally:
        if capture is not None:
            capture.stop()
        conn.close()


def _start_capture(
    attempt: int, report: Callable[[tuple[Any, ...]], None], secrets: Sequence[str] = ()
) -> OutputCapture | None:
    """Capture the task's output for its live log, or None when it cannot be captured.

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
    """Log like the worker (same format and level), tagged with the task id."""
    import structlog

    from shared.logging import configure_logging
    from shared.settings import Settings

    # The worker's settings when given: the redacting processor then knows its secrets.
    settings = job.settings or Settings.model_construct(
        log_level=job.log_level, log_format=job.log_format
    )
    configure_logging(settings, service="task")
    structlog.contextvars.bind_contextvars(task_id=job.task_id, attempt=job.attempt)


class ChildProcess:
    """A task's child process as the worker's event loop sees it.

    Args:
        job: what to run.
        on_progress: called in the event loop for each progress message
            ``(fraction, message, metrics)``.
        on_checkpoint: called in the event loop when the task saved a checkpoint.
        on_logs: called in the event loop with each batch of the task's output lines; must
            return at once (it only queues them).
    """

    def __init__(
        self,
        job: ChildJob,
        on_progress: Any,
        on_checkpoint: Any = None,
        on_logs: Callable[[list[LogLine]], None] | None = None,
    ) -> None:
        self.job = job
        self._on_progress = on_progress
        self._on_checkpoint = on_checkpoint
        self._on_logs = on_logs
        self._process: multiprocessing.process.BaseProcess | None = None
        self._pending_signal: signal.Signals | None = None

    @property
    def pid(self) -> int | None:
        """The child's pid once started."""
        return None if self._process is None else self._process.pid

    async def run(
        self, timeout_s: float, on_started: Callable[[int], Awaitable[None]] | None = None
    ) -> ChildOutcome:
        """Start the child, relay its messages, and return how it ended.

        The child is killed (SIGKILL) when ``timeout_s`` passes; ``outcome.timed_out`` is then set.
        """
        self.job.artifact_dir.mkdir(parents=True, exist_ok=True)
        self.job.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        mp = forkserver()
        receiver, sender = mp.Pipe(duplex=False)
        process = mp.Process(target=child_main, args=(self.job, sender), daemon=True)
        await asyncio.to_thread(process.start)  # blocks until the forkserver forked
        self._process = process
        if self._pending_signal is not None:
            self._signal(self._pending_signal)
        sender.close()  # the child holds the only write end: EOF means it is gone
        outcome = ChildOutcome()
        try:
            if on_started is not None and process.pid is not None:
                await on_started(process.pid)
            await asyncio.wait_for(self._relay(receiver, outcome), timeout_s)
        except TimeoutError:
            outcome.timed_out = True
            self.kill()
        finally:
            receiver.close()
        await asyncio.to_thread(process.join, CHILD_EXIT_GRACE_S)
        if process.exitcode is None:
            self.kill()
            await asyncio.to_thread(process.join)
        outcome.exitcode = process.exitcode
        return outcome

    def terminate(self) -> None:
        """SIGTERM the child: the task is asked to stop (``ctx.should_stop()``)."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the child (no-op if it already exited)."""
        self._signal(signal.SIGKILL)

    def _signal(self, sig: signal.Signals) -> None:
        if self._process is None or self._process.pid is None:
            self._pending_signal = sig  # sent as soon as the child exists
            return
        if self._process.exitcode is not None:
            return  # gone (and reaped): its pid may already belong to another process
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._process.pid, sig)

    async def _relay(self, receiver: Connection, outcome: ChildOutcome) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[Any, ...] | None] = asyncio.Queue()

        def pump() -> None:  # blocking reads stay off the event loop
            try:
                while True:
                    loop.call_soon_threadsafe(queue.put_nowait, receiver.recv())
            except (EOFError, OSError):
                loop.call_soon_threadsafe(queue.put_nowait, None)

        threading.Thread(target=pump, name=f"relay-{self.job.task_id}", daemon=True).start()
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
