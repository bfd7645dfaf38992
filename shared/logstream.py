"""A task's live log: a bounded Redis stream of its output lines, ``<ns>:task:<id>:logs``.

One stream entry per line, fields stored as strings:
    ``ts``       when the line was read from the task (Unix s, the desktop's clock)
    ``stream``   ``stdout`` | ``stderr`` | ``log`` (a log record of the task, or a worker's note)
    ``attempt``  the run it came from (1, 2, ...): a retried task appends to the same stream
    ``text``     the line without its line end, UTF-8 with undecodable bytes replaced by U+FFFD,
                 at most ``MAX_LINE_BYTES`` of the line's own bytes (a longer line is cut and
                 says how much was cut)

Writers append with ``XADD key MAXLEN ~ TP_TASK_LOG_MAX_LINES`` (trimmed in whole stream nodes,
so the length may pass the bound by up to a node, 100 entries by default) and renew
``EXPIRE key FINISHED_TASK_TTL_S`` on every write: the stream outlives its last line (the task's
end) as long as a finished task's record outlives the end, and a stream left by a lost run
expires too. Readers call ``XREAD`` after the last entry id they saw (with ``BLOCK`` to follow).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, cast

import redis.asyncio as aioredis
import structlog
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError

from shared.constants import FINISHED_TASK_TTL_S
from shared.errors import StoreError

log = structlog.get_logger(__name__)

#: A line longer than this (bytes of UTF-8) is cut: 4 KiB holds any sensible log line, while a
#: task dumping a megabyte without a newline cannot put a megabyte into each entry.
MAX_LINE_BYTES = 4096

#: Lines a worker holds for one task while a write is in flight; more are dropped and counted.
#: A child sends at most 1,000 lines per 0.1 s (see the worker's capture), so 10,000 lines is a
#: second of the fastest output, or a Redis outage's worth: never an unbounded buffer.
MAX_PENDING_LINES = 10_000

#: A stream entry as redis-py returns it with ``decode_responses=True``: ``(id, fields)``.
Entry = tuple[str, dict[str, str]]

#: Entries read per ``XREAD`` call.
READ_BATCH = 1000


@dataclass(frozen=True)
class LogLine:
    """One line of a task's output.

    Attributes:
        ts: when it was read from the task (Unix s).
        stream: ``stdout``, ``stderr`` or ``log``.
        attempt: the run it came from (1 for the first).
        text: the line, cleaned by ``clean_text``.
        id: the stream entry id (``<ms>-<seq>``) once stored; empty before.
    """

    ts: float
    stream: str
    attempt: int
    text: str
    id: str = ""

    def fields(self) -> dict[str, str | int | float]:
        """The entry's fields as ``XADD`` takes them."""
        return {
            "ts": f"{self.ts:.6f}",
            "stream": self.stream,
            "attempt": self.attempt,
            "text": self.text,
        }

    def as_dict(self) -> dict[str, Any]:
        """``{id, ts, stream, attempt, text}`` for JSON output."""
        return asdict(self)

    @classmethod
    def from_entry(cls, entry_id: str, fields: Mapping[str, str]) -> LogLine:
        """Read a stream entry; missing or malformed fields become defaults, never an error."""
        try:
            ts = float(fields.get("ts", 0.0))
        except ValueError:
            ts = 0.0
        try:
            attempt = int(fields.get("attempt", 0))
        except ValueError:
            attempt = 0
        return cls(ts, fields.get("stream", "log"), attempt, fields.get("text", ""), entry_id)


def clean_text(raw: bytes | str, max_bytes: int = MAX_LINE_BYTES, *, cut_bytes: int = 0) -> str:
    """A line as stored: valid UTF-8, at most ``max_bytes`` of the line's own bytes.

    Args:
        raw: the line without its line end (bytes from a pipe, or text from a log record).
        max_bytes: most bytes of the line kept.
        cut_bytes: bytes of this line already left out by the caller (a reader that could not
            hold all of it); counted in the note.

    Returns:
        The text; undecodable bytes (and lone surrogates in ``str``) become U+FFFD. A longer
        line is cut at a character boundary and ends with `` [... N bytes cut]``.
    """
    data = raw.encode("utf-8", "replace") if isinstance(raw, str) else raw
    if len(data) <= max_bytes and not cut_bytes:
        return data.decode("utf-8", "replace")
    cut = min(max_bytes, len(data))
    # Do not split a multi-byte character (a UTF-8 continuation byte is 0b10xxxxxx).
    while 0 < cut < len(data) and cut > max_bytes - 3 and (data[cut] & 0xC0) == 0x80:
        cut -= 1
    return data[:cut].decode("utf-8", "replace") + f" [... {len(data) - cut + cut_bytes} bytes cut]"


def _entries(reply: Any) -> list[Entry]:
    """The entries of an ``XREAD`` reply on one key (RESP2 list or RESP3 dict)."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return [entry for entries in reply.values() for entry in entries[0]]
    return [entry for _key, entries in reply for entry in entries]


async def append(
    redis: aioredis.Redis,
    key: str,
    lines: Sequence[LogLine],
    *,
    max_lines: int,
    ttl_s: int = FINISHED_TASK_TTL_S,
) -> None:
    """Append ``lines`` in one round trip (``XADD MAXLEN ~ max_lines`` each, then ``EXPIRE``).

    Raises:
        StoreError: Redis failed; none, some or all lines may be stored.
    """
    if not lines:
        return
    try:
        async with redis.pipeline(transaction=False) as pipe:
            queue_append(pipe, key, lines, max_lines=max_lines, ttl_s=ttl_s)
            await pipe.execute()
    except (RedisError, OSError) as e:
        raise StoreError(f"Redis log append failed: {e}") from e


def queue_append(
    pipe: Pipeline,
    key: str,
    lines: Sequence[LogLine],
    *,
    max_lines: int,
    ttl_s: int = FINISHED_TASK_TTL_S,
) -> int:
    """Queue ``append``'s commands on ``pipe`` (nothing for no lines); how many were queued."""
    if not lines:
        return 0
    for line in lines:
        pipe.xadd(key, line.fields(), maxlen=max_lines, approximate=True)  # type: ignore[arg-type]
    pipe.expire(key, ttl_s)
    return len(lines) + 1


async def read_after(
    redis: aioredis.Redis,
    key: str,
    after_id: str = "0-0",
    *,
    count: int = READ_BATCH,
    block_s: float | None = None,
) -> list[LogLine]:
    """Up to ``count`` lines stored after entry ``after_id``, oldest first.

    Args:
        redis: a client with ``decode_responses=True``.
        key: the task's stream (``Keys.task_logs``).
        after_id: the last entry id already seen; ``0-0`` for the start.
        count: most lines returned.
        block_s: wait up to this long (s) for a first new line; None returns at once. Keep it
            below the client's socket timeout.

    Raises:
        StoreError: Redis failed.
    """
    block_ms = None if block_s is None else max(1, round(block_s * 1000))
    try:
        reply = await redis.xread({key: after_id}, count=count, block=block_ms)
    except (RedisError, OSError) as e:
        raise StoreError(f"Redis log read failed: {e}") from e
    return [LogLine.from_entry(entry_id, fields) for entry_id, fields in _entries(reply)]


async def tail(redis: aioredis.Redis, key: str, count: int) -> list[LogLine]:
    """The last ``count`` lines, oldest first (a dashboard's view of a task).

    Raises:
        StoreError: Redis failed.
    """
    try:
        newest_first = cast(list[Entry], await redis.xrevrange(key, count=count))
    except (RedisError, OSError) as e:
        raise StoreError(f"Redis log tail failed: {e}") from e
    return [LogLine.from_entry(entry_id, fields) for entry_id, fields in reversed(newest_first)]


class LogStreamWriter:
    """Appends one task run's lines to its stream from an event loop, never blocking the caller.

    ``add`` only buffers (at most ``max_pending`` lines; more are dropped and counted) and starts
    a background write if none is in flight; a write takes everything buffered so far, so lines
    arriving during a write go out together in the next one. A failed write (Redis down or slow)
    drops its lines and counts them: lines are never held for a Redis that may not come back. The
    next write that succeeds begins with a ``log`` line saying how many were lost.

    Args:
        redis: the worker's client.
        key: the task's stream (``Keys.task_logs``).
        attempt: the run, stamped on the writer's own notes.
        max_lines: ``TP_TASK_LOG_MAX_LINES``, the stream's bound.
        max_pending: most lines buffered while a write is in flight.
        delay_s: a write starts this long after the first line it carries arrived (s), so lines
            close together share one write, and a run that ends within it has its lines written
            with its outcome (``queue_rest``); 0 writes at once.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        key: str,
        *,
        attempt: int,
        max_lines: int,
        max_pending: int = MAX_PENDING_LINES,
        delay_s: float = 0.0,
    ) -> None:
        self._redis = redis
        self._delay_s = delay_s
        self._timer: asyncio.TimerHandle | None = None
        self._key = key
        self._attempt = attempt
        self._max_lines = max_lines
        self._max_pending = max_pending
        self._pending: list[LogLine] = []
        self._writing: asyncio.Task[None] | None = None
        self._unreported = 0
        #: Lines lost so far: buffer full or a failed write.
        self.dropped = 0
        #: Lines stored so far.
        self.written = 0
        #: Lines ``queue_rest`` put in the outcome's round trip.
        self._rest = 0

    def add(self, lines: Iterable[LogLine]) -> None:
        """Queue lines for the stream (call from the event loop's thread; returns at once)."""
        for line in lines:
            if len(self._pending) >= self._max_pending:
                self._lose(1)
            else:
                self._pending.append(line)
        if (
            self._pending
            and self._timer is None
            and (self._writing is None or self._writing.done())
        ):
            if self._delay_s > 0:
                self._timer = asyncio.get_running_loop().call_later(self._delay_s, self._start)
            else:
                self._start()

    def _start(self) -> None:
        self._timer = None
        if self._pending and (self._writing is None or self._writing.done()):
            self._writing = asyncio.create_task(self._write_all())

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def note(self, text: str) -> None:
        """Queue a ``log`` line of the worker's own (the run started, how it ended)."""
        self.add([LogLine(time.time(), "log", self._attempt, clean_text(text))])

    async def close(self, timeout_s: float = 5.0) -> None:
        """Write what is buffered, waiting at most ``timeout_s`` (s); drop what is left then.

        Call once the child has ended and before its outcome is recorded: a follower that sees
        the task finished then finds every line already in the stream.
        """
        self._stop_timer()
        try:
            async with asyncio.timeout(timeout_s):
                await self._drain()
        except TimeoutError:
            await self._abandon()
        self._report_drops()

    async def settle(self, timeout_s: float = 5.0) -> None:
        """Wait for the write in flight, at most ``timeout_s`` (s); buffered lines stay buffered.

        Then ``queue_rest`` puts them in the same round trip as the outcome (``close`` without
        a round trip of its own).
        """
        self._stop_timer()
        try:
            async with asyncio.timeout(timeout_s):
                await self._wait_for_write()
        except TimeoutError:
            await self._abandon()

    def queue_rest(self, pipe: Pipeline) -> int:
        """Queue every buffered line on ``pipe``, counted written; how many commands.

        For ``StatusStore.transition(prelude=...)``: if that round trip fails, call
        ``lose_rest`` to count them lost instead. The writer is closed after this.
        """
        batch, self._rest = self._next_batch()
        self._unreported = 0  # the note on the gap is in this batch
        self.written += self._rest
        self._report_drops()
        return queue_append(pipe, self._key, batch, max_lines=self._max_lines)

    def lose_rest(self) -> None:
        """The round trip that carried ``queue_rest``'s lines failed: count them lost."""
        self.written -= self._rest
        self._lose(self._rest)
        self._rest = 0
        self._report_drops()

    def _report_drops(self) -> None:
        if self.dropped:
            log.warning("task_log_lines_dropped", dropped=self.dropped, written=self.written)

    async def _wait_for_write(self) -> None:
        while self._writing is not None and not self._writing.done():
            await asyncio.shield(self._writing)

    async def _drain(self) -> None:
        await self._wait_for_write()
        if self._pending:
            await self._write_all()

    def _next_batch(self) -> tuple[list[LogLine], int]:
        """Everything buffered and how many of the task's own lines that is.

        If lines were lost before it, a note saying how many heads the batch: the gap is told in
        the stream itself.
        """
        batch, self._pending = self._pending, []
        lines = len(batch)
        if self._unreported:
            note = f"[{self._unreported} lines of output lost: Redis was unreachable or slow]"
            batch.insert(0, LogLine(time.time(), "log", self._attempt, note))
        return batch, lines

    async def _abandon(self) -> None:
        """Stop the write in flight and count everything unwritten as dropped."""
        if self._writing is not None and not self._writing.done():
            self._writing.cancel()
            await asyncio.gather(self._writing, return_exceptions=True)
        self._lose(len(self._pending))
        self._pending.clear()

    async def _write_all(self) -> None:
        while self._pending:
            batch, lines = self._next_batch()
            try:
                await append(self._redis, self._key, batch, max_lines=self._max_lines)
            except asyncio.CancelledError:  # ``close`` ran out of time
                self._lose(lines)
                raise
            except Exception as e:  # StoreError, or anything: the log is best effort
                if not self._unreported:  # once per outage, not once per batch
                    log.warning("task_log_write_failed", error=str(e), lines=lines)
                self._lose(lines)
                continue
            self.written += lines
            self._unreported = 0

    def _lose(self, n: int) -> None:
        self.dropped += n
        self._unreported += n
