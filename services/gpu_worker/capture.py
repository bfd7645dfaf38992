"""Captures a task child's output for its live log: stdout and stderr at the fd level, log records.

Runs inside the task's child process, for as long as the child lives: a reused child's tasks
share one capture (starting one costs two pipes and three threads, about 1 ms a task).
``OutputCapture.start`` points fds 1 and 2 at pipes (``dup2``), so prints from Python, from C
extensions and from subprocesses the task starts all count. A reader thread per pipe splits the
bytes into lines, copies the bytes on to the worker's own stdout/stderr (where the child's output
went before) and queues the lines; a logging handler queues the task's log records (the worker's
stderr keeps getting them as before). A sender thread ships what is queued to the worker as one
``("logs", [LogLine, ...])`` message: at once when a line arrives after a quiet spell, then at
most once per ``FLUSH_INTERVAL_S``.

Per task, ``begin`` sets the attempt stamped on the lines and the secrets redacted from them, and
``flush`` is the task's end barrier: it writes a marker (a random token and a sequence number)
into each pipe behind everything the task wrote; each reader, on reaching it, queues all before
it (an unfinished last line as a line) and says so; then the queue is shipped from the caller's
thread. Where nothing can be in between (each pipe empty, its reader waiting for more and holding
no unfinished line: see ``_quiet``), the queue is shipped at once, without markers. So every
byte the task wrote to fds 1 and 2 before its end, and every record it logged, has been sent to
the worker when ``flush`` returns, before the task's end is reported: the worker records the
outcome right after the end, and a log follower stops there. The markers go nowhere (neither
into the lines nor the copy to the worker's output). The wait is bounded (``STOP_WAIT_S``): a
reader stuck copying to a blocked worker stdout cannot hang the child. What the task left
running (a thread, a subprocess holding the pipe) writes after its end is not the task's any
more: it lands in the log of the child's next task, stamped with that task's attempt, or is
dropped by the worker while the child is idle.

Bounds: at most ``MAX_BATCH_LINES`` lines and ``MAX_BATCH_CHARS`` characters of text per
message, so at most 10,000 lines (about 2.5 MB) a second per task reach the worker and Redis;
lines beyond are dropped and a ``log`` line in their place says how many. Nothing here raises
into the task, and nothing waits on Redis: the worker writes to Redis
(``shared.logstream.LogStreamWriter``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import io
import logging
import os
import re
import secrets as random_tokens
import select
import struct
import sys
import termios
import threading
import time
from collections.abc import Callable, MutableMapping, Sequence
from typing import Any

import structlog

from shared.logstream import MAX_LINE_BYTES, LogLine, clean_text
from shared.settings import redact_bytes, redact_text

#: Pause between two messages of lines to the worker (s): batches a chatty task's output while
#: keeping a line's way to a follower far under a second.
FLUSH_INTERVAL_S = 0.1
#: Most lines in one message; with ``FLUSH_INTERVAL_S`` it caps a task at 10,000 lines/s.
MAX_BATCH_LINES = 1000
#: Most characters of text in one message (about 2.5 MB/s per task).
MAX_BATCH_CHARS = 256 * 1024
#: Bytes taken from a pipe per read.
READ_CHUNK = 64 * 1024
#: How long ``stop`` waits for the readers to reach the end of the pipes, and ``flush`` for them
#: to reach its markers (s): a subprocess the task left running may hold the pipes open for ever,
#: and a reader may be stuck copying to a worker stdout nobody reads.
STOP_WAIT_S = 1.0

#: A line ends at ``\n``, ``\r\n`` or a lone ``\r`` (a progress bar redrawing itself).
_LINE_END = re.compile(rb"\r\n|\r|\n")

#: Digits of a flush marker's sequence number (hex), after the capture's token.
_SEQ_DIGITS = 16
#: The captured fds and the stream each one is.
_STREAMS = {1: "stdout", 2: "stderr"}
#: What a reader that ended (EOF) counts as having reached: every flush, past and future.
_ENDED = sys.maxsize

#: Context every log line of the task carries anyway (the entry has its own ``ts`` and
#: ``attempt``), left out of the text.
_REDUNDANT_KEYS = ("timestamp", "service", "task_id", "attempt")

Send = Callable[[tuple[Any, ...]], None]


class LineSplitter:
    """Turns chunks of bytes into complete lines, holding at most ``max_bytes`` of a partial one.

    A line longer than ``max_bytes`` keeps its first ``max_bytes``; the rest is counted, not kept.
    """

    def __init__(self, max_bytes: int = MAX_LINE_BYTES) -> None:
        self._max_bytes = max_bytes
        self._partial = b""
        self._overflow = 0

    def feed(self, data: bytes) -> list[tuple[bytes, int]]:
        """The lines ``data`` completes, each as ``(bytes kept, bytes not kept)``."""
        buf = self._partial + data
        hold_cr = buf.endswith(b"\r")  # may be the first half of \r\n
        *complete, partial = _LINE_END.split(buf[:-1] if hold_cr else buf)
        lines = [(line, 0) for line in complete]
        if lines:
            lines[0] = (lines[0][0], self._overflow)
            self._overflow = 0
        if len(partial) > self._max_bytes:
            self._overflow += len(partial) - self._max_bytes
            partial = partial[: self._max_bytes]
        self._partial = partial + (b"\r" if hold_cr else b"")
        return lines

    @property
    def holding(self) -> bool:
        """Whether part of an unfinished line is held (``flush`` would return it)."""
        return bool(self._partial) or self._overflow > 0

    def flush(self) -> list[tuple[bytes, int]]:
        """At the end of the output: the unfinished last line, if any."""
        partial, overflow = self._partial.rstrip(b"\r"), self._overflow
        self._partial, self._overflow = b"", 0
        return [(partial, overflow)] if partial or overflow else []


class Outbox:
    """Lines waiting for the sender; thread-safe and bounded per message.

    ``attempt`` and ``secrets`` are the running task's (``OutputCapture.begin`` sets them).
    """

    def __init__(self, attempt: int, secrets: Sequence[str] = ()) -> None:
        self.attempt = attempt
        self.secrets = list(secrets)
        # Re-entrant: a signal handler of the task that logs may run while the main thread is
        # inside ``put``; a plain lock would deadlock the task there.
        self._lock = threading.RLock()
        self._lines: list[LogLine] = []
        self._bytes = 0
        self._dropped = 0
        #: Set while lines wait (or to wake the sender for its last round).
        self.queued = threading.Event()

    def put(self, line: LogLine) -> None:
        """Queue a line (secrets redacted), or count it dropped when this message is full."""
        line = dataclasses.replace(line, text=redact_text(line.text, self.secrets))
        size = len(line.text)
        with self._lock:
            if len(self._lines) >= MAX_BATCH_LINES or self._bytes + size > MAX_BATCH_CHARS:
                self._dropped += 1
                return
            self._lines.append(line)
            self._bytes += size
            self.queued.set()

    def take(self) -> list[LogLine]:
        """Everything queued, followed by a note of the lines dropped since the last take."""
        with self._lock:
            lines, dropped = self._lines, self._dropped
            self._lines, self._bytes, self._dropped = [], 0, 0
            self.queued.clear()
        if dropped:
            note = (
                f"[{dropped} lines dropped: the task wrote faster than "
                f"{MAX_BATCH_LINES / FLUSH_INTERVAL_S:.0f} lines/s]"
            )
            lines.append(LogLine(time.time(), "log", self.attempt, note))
        return lines


class RecordHandler(logging.Handler):
    """Queues each log record of the task as a ``log`` line: ``[level] event [logger] k=v``."""

    def __init__(self, outbox: Outbox) -> None:
        super().__init__()
        self._outbox = outbox
        self.setFormatter(_record_formatter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # a record that cannot be formatted still leaves a trace
            text = f"[{record.levelname.lower()}] {record.msg!r}"
        self._outbox.put(LogLine(record.created, "log", self._outbox.attempt, clean_text(text)))


def _drop_redundant(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key in _REDUNDANT_KEYS:
        event_dict.pop(key, None)
    return event_dict


def _record_formatter() -> logging.Formatter:
    """Plain one-line rendering of structlog events and stdlib records, tracebacks as text."""
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.processors.add_log_level, structlog.stdlib.add_logger_name],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _drop_redundant,
            structlog.dev.ConsoleRenderer(
                colors=False,
                pad_event_to=0,
                pad_level=False,
                exception_formatter=structlog.dev.plain_traceback,
            ),
        ],
    )


class OutputCapture:
    """The child's output capture (see the module's docstring). One per child; not restartable.

    ``start`` once, then per task ``begin`` before it runs and ``flush`` after it returned;
    ``stop`` when the child exits.

    Args:
        attempt: the run, stamped on every line (until ``begin`` sets another).
        send: ships one message to the worker (thread-safe; the child's pipe to its parent).
        secrets: text redacted from the lines and the copy (until ``begin`` sets others).
    """

    def __init__(self, attempt: int, send: Send, secrets: Sequence[str] = ()) -> None:
        self._send = send
        self._secrets = [secret.encode() for secret in secrets]
        self.outbox = Outbox(attempt, secrets)
        self._handler = RecordHandler(self.outbox)
        self._saved: dict[int, int] = {}
        #: Per captured fd: the write end of its pipe (``begin`` points the fd at it again).
        self._write_ends: dict[int, int] = {}
        #: Per captured fd: our own write end of its pipe for the flush markers (non-blocking).
        self._marker_fds: dict[int, int] = {}
        self._readers: list[threading.Thread] = []
        self._sender = threading.Thread(target=self._send_loop, name="log-sender", daemon=True)
        self._stopping = threading.Event()
        self._worker_stderr: io.TextIOWrapper | None = None
        # One ship at a time, in order: lines the sender took go out before the flush's last
        # ones (and so before the task's end, which follows ``flush``).
        self._ship_lock = threading.Lock()
        #: Starts every flush marker: NUL (rare in text, and nowhere else in a marker) and a
        #: random token, so no output of a task matches it by chance.
        self._token = b"\0tp-flush-" + random_tokens.token_hex(8).encode() + b":"
        self._marker_len = len(self._token) + _SEQ_DIGITS
        self._flushes = 0
        #: Per stream: the last flush its reader reached (``_ENDED`` once it stopped).
        self._reached = dict.fromkeys(_STREAMS.values(), 0)
        self._reached_changed = threading.Condition()
        #: Per stream, under ``_state_lock``: the pipe's read end while its reader runs, whether
        #: the reader is handling a chunk it read, and whether it holds bytes of an unfinished
        #: line (``flush`` may skip its markers only when no stream is busy or holding).
        self._state_lock = threading.Lock()
        self._read_ends: dict[str, int] = {}
        self._busy = dict.fromkeys(_STREAMS.values(), False)
        self._holding = dict.fromkeys(_STREAMS.values(), False)

    def start(self) -> None:
        """Redirect fds 1 and 2, start the threads, and hook the task's log records.

        Raises:
            OSError: no file descriptor left for the pipes (nothing was changed then).
        """
        pipes = {1: os.pipe()}  # an OSError (no descriptors left) comes before any change
        try:
            pipes[2] = os.pipe()
        except OSError:
            for end in pipes[1]:
                os.close(end)
            raise
        for fd, stream in _STREAMS.items():
            read_end, write_end = pipes[fd]
            self._saved[fd] = os.dup(fd)  # the worker's own stdout/stderr: output still goes there
            os.dup2(write_end, fd)  # inheritable: subprocesses of the task write here too
            self._write_ends[fd] = write_end  # not inheritable (os.pipe): a spare, ours
            self._marker_fds[fd] = _marker_end(write_end)
            self._read_ends[stream] = read_end
            reader = threading.Thread(
                target=self._read, args=(read_end, stream), name=f"log-{stream}", daemon=True
            )
            self._readers.append(reader)
        self._set_up_task_output()
        for thread in (*self._readers, self._sender):
            thread.start()

    def begin(self, attempt: int, secrets: Sequence[str] = ()) -> None:
        """A task starts: stamp its attempt on the lines from now on, redact its secrets.

        What the last task of the child changed is set up again, as a new capture did: fds 1
        and 2 point at the pipes (it may have closed or redirected them), stdout and stderr are
        line-buffered, and the root logger has our handler (its own stderr handlers go to the
        worker's stderr).
        """
        self._secrets = [secret.encode() for secret in secrets]
        self.outbox.secrets = list(secrets)
        self.outbox.attempt = attempt
        for fd, write_end in self._write_ends.items():
            with contextlib.suppress(OSError):  # our own end gone (closed by a task): uncaptured
                os.dup2(write_end, fd)
        self._set_up_task_output()

    def flush(self, timeout_s: float = STOP_WAIT_S) -> bool:
        """The task's end barrier: send everything it wrote and logged so far (blocking).

        Returns once every byte written to fds 1 and 2 before the call (an unfinished last line
        as a line) and every record logged is in a ``("logs", ...)`` message sent, or once
        ``timeout_s`` passed (a reader is stuck): what was read by then is sent, with a note
        that later lines may show in the next task's log. True when nothing was left behind.
        """
        deadline = time.monotonic() + timeout_s
        _flush_text_streams()
        if self._quiet():
            self._ship()
            return True
        with self._reached_changed:
            self._flushes += 1
            seq = self._flushes
        marker = self._token + b"%0*x" % (_SEQ_DIGITS, seq)
        done = all(
            _write_marker(marker_fd, marker, deadline)
            for fd, marker_fd in self._marker_fds.items()
            if self._reached[_STREAMS[fd]] != _ENDED  # that reader is gone: nothing to wait for
        )
        if done:
            with self._reached_changed:
                done = self._reached_changed.wait_for(
                    lambda: min(self._reached.values()) >= seq,
                    max(0.0, deadline - time.monotonic()),
                )
        if not done:
            self.outbox.put(
                LogLine(
                    time.time(),
                    "log",
                    self.outbox.attempt,
                    f"[output not all read within {timeout_s:g} s of the task's end: "
                    "the rest may show in the next task's log]",
                )
            )
        self._ship()
        return done

    def _quiet(self) -> bool:
        """True when every byte written to the pipes so far is queued already (no marker needed).

        Each live reader is waiting for more (not handling a chunk), holds no unfinished line,
        and its pipe holds no unread byte. A reader marks itself busy *before* it reads, under
        the same lock: a chunk it is about to read is still in the pipe, one it read is being
        handled, and either way this is False. Bytes written after this check were written
        after the task's end (``flush`` runs once the task returned).
        """
        with self._state_lock:
            for stream, read_end in self._read_ends.items():
                if self._busy[stream] or self._holding[stream] or _unread(read_end) != 0:
                    return False
        return True

    def stop(self) -> None:
        """Put fds 1 and 2 back, send the last lines, and stop the threads (bounded waits)."""
        _flush_text_streams()
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)  # closes fd's hold on the pipe's write end
        for write_end in {*self._write_ends.values(), *self._marker_fds.values()}:
            with contextlib.suppress(OSError):
                os.close(write_end)  # the last write ends of ours: the reader sees EOF
        self._write_ends.clear()
        self._marker_fds.clear()
        deadline = time.monotonic() + STOP_WAIT_S
        for reader in self._readers:
            reader.join(max(0.0, deadline - time.monotonic()))
        logging.getLogger().removeHandler(self._handler)
        self._stopping.set()
        self.outbox.queued.set()
        self._sender.join(STOP_WAIT_S)

    def _set_up_task_output(self) -> None:
        """Line-buffered text streams and the task's log records hooked (idempotent).

        Log handlers that wrote to stderr keep writing to the worker's; ``RecordHandler`` is
        added to the root logger.
        """
        for text_stream in (sys.stdout, sys.stderr):
            if isinstance(text_stream, io.TextIOWrapper):  # print() reaches the pipe per line
                text_stream.reconfigure(line_buffering=True)
        root = logging.getLogger()
        for handler in root.handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr:
                if self._worker_stderr is None:
                    self._worker_stderr = open(  # noqa: SIM115 - lives as long as the child
                        self._saved[2], "w", buffering=1, closefd=False, errors="backslashreplace"
                    )
                handler.setStream(self._worker_stderr)
        root.addHandler(self._handler)  # once: a handler already there is not added again

    def _read(self, read_end: int, stream: str) -> None:
        """Reader thread: pipe -> worker's fd (as before) and lines -> outbox, until EOF.

        A flush marker ends the output before it (``_Output.end``) and tells ``flush`` its
        reader got there; the marker itself goes nowhere.
        """
        output = _Output(self, stream)
        token, marker_len = self._token, self._marker_len
        pending = b""  # read, not yet passed on: may end with the start of a marker
        poller = select.poll()
        poller.register(read_end, select.POLLIN)
        try:
            while True:
                with self._state_lock:
                    self._holding[stream] = bool(pending) or output.holding
                    self._busy[stream] = False
                poller.poll()  # data, EOF or an error: the read below says which
                with self._state_lock:
                    self._busy[stream] = True
                try:
                    data = os.read(read_end, READ_CHUNK)
                except OSError:
                    break
                if not data:
                    break
                pending += data
                while (at := pending.find(token)) >= 0 and len(pending) >= at + marker_len:
                    output.feed(pending[:at])
                    output.end()
                    self._reach(stream, int(pending[at + len(token) : at + marker_len], 16))
                    pending = pending[at + marker_len :]
                keep = _marker_start(pending, token, marker_len)
                output.feed(pending[: len(pending) - keep])
                pending = pending[len(pending) - keep :]
            output.feed(pending)
            output.end()
        finally:  # no flush waits on a reader that is gone
            with self._state_lock:
                del self._read_ends[stream]
            self._reach(stream, _ENDED)
            os.close(read_end)

    def _reach(self, stream: str, seq: int) -> None:
        with self._reached_changed:
            self._reached[stream] = max(self._reached[stream], seq)
            self._reached_changed.notify_all()

    def _queue(self, lines: list[tuple[bytes, int]], stream: str) -> None:
        now, attempt = time.time(), self.outbox.attempt
        for raw, cut in lines:
            self.outbox.put(LogLine(now, stream, attempt, clean_text(raw, cut_bytes=cut)))

    def _send_loop(self) -> None:
        """Sender thread: ship queued lines at once, then at most once per interval."""
        while not self._stopping.is_set():
            self.outbox.queued.wait()
            self._ship()
            self._stopping.wait(FLUSH_INTERVAL_S)
        self._ship()

    def _ship(self) -> None:
        with self._ship_lock:
            lines = self.outbox.take()
            if lines:
                self._send(("logs", lines))


class _Output:
    """One reader's output on its way: bytes copied to the worker's fd, lines to the outbox."""

    def __init__(self, capture: OutputCapture, stream: str) -> None:
        self._capture = capture
        self._stream = stream
        self._splitter = LineSplitter()
        self._copy_to = capture._saved[1 if stream == "stdout" else 2]
        self._held = b""  # copied up to the last line end only, so no secret is split and missed

    @property
    def holding(self) -> bool:
        """Whether bytes of an unfinished line wait here (``end`` would queue them)."""
        return bool(self._held) or self._splitter.holding

    def feed(self, data: bytes) -> None:
        """Output read from the pipe (never part of a marker)."""
        if not data:
            return
        self._held += data
        end = max(self._held.rfind(b"\n"), self._held.rfind(b"\r")) + 1 or (
            len(self._held) if len(self._held) > READ_CHUNK else 0
        )
        if end:
            self._copy(end)
        self._capture._queue(self._splitter.feed(data), self._stream)

    def end(self) -> None:
        """The end of the output so far (a flush, EOF): copy all held, queue the partial line."""
        self._copy(len(self._held))
        self._capture._queue(self._splitter.flush(), self._stream)

    def _copy(self, end: int) -> None:
        if end:
            data = redact_bytes(self._held[:end], self._capture._secrets)
            self._copy_to = _copy(self._copy_to, data)
            self._held = self._held[end:]


def _flush_text_streams() -> None:
    """Python's buffered text of stdout and stderr into the pipes."""
    streams = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)  # a task may swap them
    for text_stream in {id(stream): stream for stream in streams}.values():
        with contextlib.suppress(Exception):
            if text_stream is not None:
                text_stream.flush()


def _marker_end(write_end: int) -> int:
    """Our own write end of a pipe for flush markers: non-blocking where possible.

    Reopened through /proc (a new open file description of the same pipe): a marker then
    never blocks on a full pipe, while fds 1 and 2, sharing ``write_end``'s description, stay
    blocking for the task. Without /proc, ``write_end`` itself (``_write_marker`` polls first).
    """
    try:
        return os.open(f"/proc/self/fd/{write_end}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return write_end


def _write_marker(fd: int, marker: bytes, deadline: float) -> bool:
    """Write ``marker`` (under PIPE_BUF bytes: all at once or not at all) by ``deadline``."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not poller.poll(remaining * 1000):
            return False
        try:
            os.write(fd, marker)
        except BlockingIOError:  # another writer took the room: wait for more
            continue
        except OSError:  # the reader is gone
            return False
        return True


def _unread(read_end: int) -> int:
    """Bytes waiting in a pipe (``FIONREAD``); -1 where it cannot be told (never quiet then)."""
    try:
        (count,) = struct.unpack("i", fcntl.ioctl(read_end, termios.FIONREAD, b"\0\0\0\0"))
    except OSError:
        return -1
    return int(count)


def _marker_start(data: bytes, token: bytes, marker_len: int) -> int:
    """How many bytes at the end of ``data`` may be the start of a marker (held for more)."""
    start = data.rfind(b"\0", max(0, len(data) - marker_len + 1))
    if start < 0:
        return 0
    tail = data[start:]
    return len(tail) if token.startswith(tail[: len(token)]) else 0


def _copy(fd: int, data: bytes) -> int:
    """Write all of ``data`` to ``fd``; returns ``fd``, or -1 once it failed (copying stops)."""
    if fd < 0:
        return fd
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except OSError:
        return -1
    return fd
