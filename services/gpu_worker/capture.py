"""Captures a task child's output for its live log: stdout and stderr at the fd level, log records.

Runs inside the task's child process. ``OutputCapture.start`` points fds 1 and 2 at pipes
(``dup2``), so prints from Python, from C extensions and from subprocesses the task starts all
count. A reader thread per pipe splits the bytes into lines, copies the bytes on to the worker's
own stdout/stderr (where the child's output went before) and queues the lines; a logging handler
queues the task's log records (the worker's stderr keeps getting them as before). A sender thread
ships what is queued to the worker as one ``("logs", [LogLine, ...])`` message: at once when a
line arrives after a quiet spell, then at most once per ``FLUSH_INTERVAL_S``.

Bounds: at most ``MAX_BATCH_LINES`` lines and ``MAX_BATCH_CHARS`` characters of text per
message, so at most 10,000 lines (about 2.5 MB) a second per task reach the worker and Redis;
lines beyond are dropped and a ``log`` line in their place says how many. Nothing here raises
into the task, and nothing waits on Redis: the worker writes to Redis
(``shared.logstream.LogStreamWriter``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import re
import sys
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
#: How long ``stop`` waits for the readers to reach the end of the pipes (s): a subprocess the
#: task left running may hold them open for ever.
STOP_WAIT_S = 1.0

#: A line ends at ``\n``, ``\r\n`` or a lone ``\r`` (a progress bar redrawing itself).
_LINE_END = re.compile(rb"\r\n|\r|\n")

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

    def flush(self) -> list[tuple[bytes, int]]:
        """At the end of the output: the unfinished last line, if any."""
        partial, overflow = self._partial.rstrip(b"\r"), self._overflow
        self._partial, self._overflow = b"", 0
        return [(partial, overflow)] if partial or overflow else []


class Outbox:
    """Lines waiting for the sender; thread-safe and bounded per message."""

    def __init__(self, attempt: int, secrets: Sequence[str] = ()) -> None:
        self._attempt = attempt
        self._secrets = list(secrets)
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
        line = dataclasses.replace(line, text=redact_text(line.text, self._secrets))
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
            lines.append(LogLine(time.time(), "log", self._attempt, note))
        return lines


class RecordHandler(logging.Handler):
    """Queues each log record of the task as a ``log`` line: ``[level] event [logger] k=v``."""

    def __init__(self, outbox: Outbox, attempt: int) -> None:
        super().__init__()
        self._outbox = outbox
        self._attempt = attempt
        self.setFormatter(_record_formatter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # a record that cannot be formatted still leaves a trace
            text = f"[{record.levelname.lower()}] {record.msg!r}"
        self._outbox.put(LogLine(record.created, "log", self._attempt, clean_text(text)))


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
    """The child's output capture (see the module's docstring). One per child; not reusable.

    Args:
        attempt: the run, stamped on every line.
        send: ships one message to the worker (thread-safe; the child's pipe to its parent).
    """

    def __init__(self, attempt: int, send: Send, secrets: Sequence[str] = ()) -> None:
        self._attempt = attempt
        self._send = send
        self._secrets = [secret.encode() for secret in secrets]
        self.outbox = Outbox(attempt, secrets)
        self._handler = RecordHandler(self.outbox, attempt)
        self._saved: dict[int, int] = {}
        self._readers: list[threading.Thread] = []
        self._sender = threading.Thread(target=self._send_loop, name="log-sender", daemon=True)
        self._stopping = threading.Event()
        self._worker_stderr: io.TextIOWrapper | None = None

    def start(self) -> None:
        """Redirect fds 1 and 2, start the threads, and hook the task's log records."""
        pipes = {1: os.pipe()}  # an OSError (no descriptors left) comes before any change
        try:
            pipes[2] = os.pipe()
        except OSError:
            for end in pipes[1]:
                os.close(end)
            raise
        for fd, stream in ((1, "stdout"), (2, "stderr")):
            read_end, write_end = pipes[fd]
            self._saved[fd] = os.dup(fd)  # the worker's own stdout/stderr: output still goes there
            os.dup2(write_end, fd)  # inheritable: subprocesses of the task write here too
            os.close(write_end)
            reader = threading.Thread(
                target=self._read, args=(read_end, stream), name=f"log-{stream}", daemon=True
            )
            self._readers.append(reader)
        for text_stream in (sys.stdout, sys.stderr):
            if isinstance(text_stream, io.TextIOWrapper):  # print() reaches the pipe per line
                text_stream.reconfigure(line_buffering=True)
        self._hook_logging()
        for thread in (*self._readers, self._sender):
            thread.start()

    def stop(self) -> None:
        """Put fds 1 and 2 back, send the last lines, and stop the threads (bounded waits)."""
        for text_stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                if text_stream is not None:
                    text_stream.flush()
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)  # closes this process's write end of the pipe: the reader sees EOF
        deadline = time.monotonic() + STOP_WAIT_S
        for reader in self._readers:
            reader.join(max(0.0, deadline - time.monotonic()))
        logging.getLogger().removeHandler(self._handler)
        self._stopping.set()
        self.outbox.queued.set()
        self._sender.join(STOP_WAIT_S)

    def _hook_logging(self) -> None:
        """Log handlers that wrote to stderr keep writing to the worker's; add ``RecordHandler``."""
        root = logging.getLogger()
        for handler in root.handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr:
                if self._worker_stderr is None:
                    self._worker_stderr = open(  # noqa: SIM115 - lives as long as the child
                        self._saved[2], "w", buffering=1, closefd=False, errors="backslashreplace"
                    )
                handler.setStream(self._worker_stderr)
        root.addHandler(self._handler)

    def _read(self, read_end: int, stream: str) -> None:
        """Reader thread: pipe -> worker's fd (as before) and lines -> outbox, until EOF."""
        splitter, copy_to = LineSplitter(), self._saved[1 if stream == "stdout" else 2]
        held = b""  # copied up to the last line end only, so no secret is split and missed
        while True:
            try:
                data = os.read(read_end, READ_CHUNK)
            except OSError:
                break
            if not data:
                break
            held += data
            end = max(held.rfind(b"\n"), held.rfind(b"\r")) + 1 or (
                len(held) if len(held) > READ_CHUNK else 0
            )
            if end:
                copy_to = _copy(copy_to, redact_bytes(held[:end], self._secrets))
                held = held[end:]
            self._queue(splitter.feed(data), stream)
        _copy(copy_to, redact_bytes(held, self._secrets))
        self._queue(splitter.flush(), stream)
        os.close(read_end)

    def _queue(self, lines: list[tuple[bytes, int]], stream: str) -> None:
        now = time.time()
        for raw, cut in lines:
            self.outbox.put(LogLine(now, stream, self._attempt, clean_text(raw, cut_bytes=cut)))

    def _send_loop(self) -> None:
        """Sender thread: ship queued lines at once, then at most once per interval."""
        while not self._stopping.is_set():
            self.outbox.queued.wait()
            self._ship()
            self._stopping.wait(FLUSH_INTERVAL_S)
        self._ship()

    def _ship(self) -> None:
        lines = self.outbox.take()
        if lines:
            self._send(("logs", lines))


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
