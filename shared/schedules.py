"""Recurring submissions (cron schedules) and start times, kept in Redis.

A schedule is a task spec plus a cron expression evaluated by croniter in an IANA time zone
(UTC unless told). Five fields are standard cron (``0 2 * * 1-5``: 02:00 on weekdays); a sixth
is seconds, croniter's convention (``* * * * * */10``: every 10 s). The scheduler fires a due
schedule by submitting a task whose id is derived from (schedule, occurrence time), so two
schedulers, or one restarted mid-firing, submit one task per occurrence. Occurrences missed while
no scheduler ran are coalesced into one run (APScheduler's ``coalesce=True``), and the next is
computed from now.

Layout: ``<ns>:schedules`` (set of names), ``<ns>:schedule:<name>`` (hash: ``spec`` JSON,
``paused``, ``next_due_at``, ``last_fired_at``, ``last_task_id``, ``last_fired_wall``,
``fired``), ``<ns>:schedule:<name>:runs`` (recent firings, newest first). Field-level hash
updates let a pause from the laptop and a firing on the desktop never overwrite each other.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime
from typing import Any, cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import structlog
from croniter import croniter  # type: ignore[import-untyped]
from croniter.croniter import (  # type: ignore[import-untyped]
    CroniterBadCronError,
    CroniterBadDateError,
    CroniterError,
)
from pydantic import BaseModel, ConfigDict, Field

from shared.constants import DEFAULT_PRIORITY, MAX_PRIORITY
from shared.errors import ScheduleError, ScheduleNotFoundError
from shared.messages import IDEMPOTENCY_NAMESPACE, MAX_START_TIME
from shared.store import StatusStore, store_errors

log = structlog.get_logger(__name__)

#: Schedule names go into Redis keys and task ``submitted_by``: keep them to a safe alphabet.
SCHEDULE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"

#: Firings kept per schedule in ``<ns>:schedule:<name>:runs`` (``schedule list`` shows the last).
SCHEDULE_RUNS_KEPT = 100

# KEYS: schedule hash, names set. ARGV: name, then field/value pairs. Refuses a taken name.
_ADD = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""

# KEYS: schedule hash. ARGV: paused ('0'/'1'), next due ('' keeps it). 0 when there is none.
_PAUSE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'paused', ARGV[1])
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'next_due_at', ARGV[2]) end
return 1
"""

# KEYS: schedule hash, runs list. ARGV: expected next_due_at, schedule id, new next_due_at,
# occurrence, task id, fired at (Redis clock), run JSON, runs kept. Records a firing only if the
# schedule is still the one read (same id, next due unchanged): of two schedulers firing one
# occurrence, one advances it; a schedule removed meanwhile is not recreated.
_ADVANCE = """
if redis.call('HGET', KEYS[1], 'next_due_at') ~= ARGV[1]
   or redis.call('HGET', KEYS[1], 'schedule_id') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'next_due_at', ARGV[3], 'last_fired_at', ARGV[4],
           'last_task_id', ARGV[5], 'last_fired_wall', ARGV[6])
redis.call('HINCRBY', KEYS[1], 'fired', 1)
redis.call('LPUSH', KEYS[2], ARGV[7])
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[8]) - 1)
return 1
"""


class CronClock:
    """A cron expression in a time zone: its occurrences as Unix times (s).

    Args:
        expr: five fields (minute hour day month weekday) or six (plus seconds, last).
        timezone: IANA name (``Europe/London``); occurrences follow its daylight saving.

    Raises:
        ScheduleError: a bad expression (``cron: ...``) or time zone (``timezone: ...``), or
            one that never fires (``0 0 30 2 *``).
    """

    def __init__(self, expr: str, timezone: str = "UTC") -> None:
        fields = expr.split()
        if len(fields) not in (5, 6):
            raise ScheduleError(
                f"cron: {expr!r} has {len(fields)} fields; expected 5 (minute hour day month "
                "weekday) or 6 (the same plus seconds)",
                field="cron",
            )
        if not croniter.is_valid(expr):
            raise ScheduleError(f"cron: {expr!r} is not a valid cron expression", field="cron")
        try:
            self.zone = ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError) as e:
            raise ScheduleError(
                f"timezone: {timezone!r} is not an IANA time zone", field="timezone"
            ) from e
        self.expr = " ".join(fields)
        self.timezone = timezone
        try:
            self.next_after(datetime.now(UTC).timestamp())
        except ScheduleError:
            raise
        except CroniterError as e:
            raise ScheduleError(f"cron: {expr!r}: {e}", field="cron") from e

    def _at(self, ts: float) -> datetime:
        return datetime.fromtimestamp(ts, self.zone)

    def next_after(self, ts: float) -> float:
        """The first occurrence strictly after ``ts`` (Unix s).

        Raises:
            ScheduleError: the expression has no occurrence in the next 50 years.
        """
        try:
            return float(croniter(self.expr, self._at(ts)).get_next(float))
        except (CroniterBadDateError, CroniterBadCronError) as e:
            raise ScheduleError(f"cron: {self.expr!r} never fires: {e}", field="cron") from e

    def latest_at_or_before(self, ts: float) -> float:
        """The last occurrence at or before ``ts`` (Unix s)."""
        before = float(croniter(self.expr, self._at(ts)).get_prev(float))
        following = self.next_after(before)
        return following if following <= ts else before

    def between(self, start: float, end: float, limit: int = 1000) -> int:
        """How many occurrences lie in ``[start, end]`` (counted up to ``limit``)."""
        count, ts = 0, start - 1e-6
        while count < limit:
            ts = self.next_after(ts)
            if ts > end:
                break
            count += 1
        return count


class ScheduleSpec(BaseModel):
    """What a schedule submits, and when (as ``tradectl schedule add`` defined it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=SCHEDULE_NAME_PATTERN)
    cron: str = Field(min_length=1, max_length=200)
    timezone: str = "UTC"
    task_type: str
    config: dict[str, Any] = Field(default_factory=dict)
    priority: int = Field(DEFAULT_PRIORITY, ge=0, le=MAX_PRIORITY)
    time_limit_s: float | None = Field(None, gt=0)
    max_attempts: int | None = Field(None, ge=1, le=100)
    #: Fresh for every ``add``: a schedule removed and added again never reuses a task id.
    schedule_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    created_by: str = ""


class Schedule(BaseModel):
    """A schedule and its state. Times are Unix seconds on the Redis clock."""

    spec: ScheduleSpec
    paused: bool = False
    next_due_at: float | None = None
    #: The occurrence last fired, the task it submitted, and when it fired.
    last_fired_at: float | None = None
    last_task_id: str | None = None
    last_fired_wall: float | None = None
    fired: int = 0
    #: ``next_due_at`` exactly as stored, the value a firing compares and sets.
    raw_next_due: str = Field("", exclude=True)

    @property
    def name(self) -> str:
        """The schedule's name."""
        return self.spec.name

    @classmethod
    def from_hash(cls, raw: dict[str, str]) -> Schedule:
        """Build from the Redis hash."""

        def number(field: str) -> float | None:
            return float(raw[field]) if raw.get(field) else None

        return cls(
            spec=ScheduleSpec.model_validate_json(raw["spec"]),
            paused=raw.get("paused") == "1",
            next_due_at=number("next_due_at"),
            last_fired_at=number("last_fired_at"),
            last_task_id=raw.get("last_task_id") or None,
            last_fired_wall=number("last_fired_wall"),
            fired=int(raw.get("fired") or 0),
            raw_next_due=raw.get("next_due_at", ""),
        )


def schedule_task_id(spec: ScheduleSpec, occurrence: float) -> str:
    """The task id of ``spec``'s firing for ``occurrence`` (uuid5: the same for every scheduler)."""
    return str(uuid.uuid5(IDEMPOTENCY_NAMESPACE, f"schedule:{spec.schedule_id}:{occurrence:.3f}"))


class ScheduleStore:
    """Schedules in Redis, through a started ``StatusStore``'s connection.

    Args:
        store: the status store (its ``keys`` give the namespace).
    """

    def __init__(self, store: StatusStore) -> None:
        self.store = store
        self.keys = store.keys
        redis = store.redis
        self._add = redis.register_script(_ADD)
        self._pause = redis.register_script(_PAUSE)
        self._advance = redis.register_script(_ADVANCE)

    @store_errors
    async def add(self, spec: ScheduleSpec, *, next_due_at: float, paused: bool = False) -> None:
        """Record a new schedule, first due at ``next_due_at`` (Unix s).

        Raises:
            ScheduleError: a schedule of this name exists (``name: ...``).
        """
        fields = {
            "spec": spec.model_dump_json(),
            "schedule_id": spec.schedule_id,
            "paused": "1" if paused else "0",
            "next_due_at": repr(next_due_at),
            "fired": "0",
        }
        args = [spec.name, *(x for pair in fields.items() for x in pair)]
        keys = [self.keys.schedule(spec.name), self.keys.schedules]
        if not await self._add(keys=keys, args=args):
            raise ScheduleError(
                f"name: a schedule called {spec.name!r} already exists (remove it first)",
                field="name",
            )

    @store_errors
    async def get(self, name: str) -> Schedule:
        """One schedule.

        Raises:
            ScheduleNotFoundError: no schedule has this name.
        """
        raw = cast(dict[str, str], await self.store.redis.hgetall(self.keys.schedule(name)))
        if not raw.get("spec"):
            raise ScheduleNotFoundError(f"no schedule called {name!r}", name=name)
        return Schedule.from_hash(raw)

    @store_errors
    async def list_all(self) -> list[Schedule]:
        """Every schedule, by name."""
        redis = self.store.redis
        names = sorted(cast(set[str], await redis.smembers(self.keys.schedules)))
        async with redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(self.keys.schedule(name))
            rows: list[dict[str, str]] = await pipe.execute()
        schedules = []
        for name, row in zip(names, rows, strict=True):
            if not row:  # removed since the names were read
                continue
            try:
                schedules.append(Schedule.from_hash(row))
            except (KeyError, ValueError) as e:  # pydantic's ValidationError is a ValueError
                log.error("schedule_unreadable", schedule=name, error=str(e))
        return schedules

    @store_errors
    async def set_paused(
        self, name: str, paused: bool, *, next_due_at: float | None = None
    ) -> Schedule:
        """Pause or resume a schedule; a resume sets its next due time.

        Raises:
            ScheduleNotFoundError: no schedule has this name.
        """
        args = ["1" if paused else "0", "" if next_due_at is None else repr(next_due_at)]
        if not await self._pause(keys=[self.keys.schedule(name)], args=args):
            raise ScheduleNotFoundError(f"no schedule called {name!r}", name=name)
        return await self.get(name)

    @store_errors
    async def remove(self, name: str) -> None:
        """Delete a schedule and its firing log (tasks it submitted stay).

        Raises:
            ScheduleNotFoundError: no schedule has this name.
        """
        async with self.store.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.schedule(name))
            pipe.delete(self.keys.schedule_runs(name))
            pipe.srem(self.keys.schedules, name)
            deleted, _runs, _listed = await pipe.execute()
        if not deleted:
            raise ScheduleNotFoundError(f"no schedule called {name!r}", name=name)

    @store_errors
    async def advance(
        self,
        schedule: Schedule,
        *,
        occurrence: float,
        task_id: str,
        next_due_at: float,
        fired_at: float,
        missed: int = 0,
    ) -> bool:
        """Record a firing and the next due time, if nobody else recorded one meanwhile.

        Returns:
            True if recorded; False when another scheduler advanced it, or it was removed.
        """
        run = json.dumps(
            {"occurrence": occurrence, "task_id": task_id, "fired_at": fired_at, "missed": missed}
        )
        args = [
            schedule.raw_next_due,
            schedule.spec.schedule_id,
            repr(next_due_at),
            repr(occurrence),
            task_id,
            repr(fired_at),
            run,
            str(SCHEDULE_RUNS_KEPT),
        ]
        keys = [self.keys.schedule(schedule.name), self.keys.schedule_runs(schedule.name)]
        return bool(await self._advance(keys=keys, args=args))

    @store_errors
    async def runs(self, name: str, limit: int = 20) -> list[dict[str, Any]]:
        """The schedule's recent firings, newest first: ``{occurrence, task_id, fired_at}``."""
        items = await self.store.redis.lrange(self.keys.schedule_runs(name), 0, limit - 1)
        return [json.loads(i) for i in items]


#: ``+30s``, ``+5m``, ``+2h``, ``+1d``, ``+1h30m``, ``+90`` (seconds).
_RELATIVE = re.compile(r"^\+\s*((?:\d+(?:\.\d+)?\s*[smhd]?\s*)+)$")
_UNIT_S = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_start_time(text: str, now: float) -> float:
    """A start time as Unix seconds: ISO 8601, or relative to ``now`` (``+30s``, ``+1h30m``).

    An ISO time without an offset is local time on this machine (``2025-01-31T02:00``); with
    one it is exact (``2025-01-31T02:00:00Z``, ``...+01:00``).

    Args:
        text: what the user typed after ``--at``.
        now: the present (Unix s), best the Redis clock, which the scheduler compares with.

    Raises:
        ScheduleError: neither form (``at: ...``).
    """
    text = text.strip()
    match = _RELATIVE.match(text)
    if match:
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*([smhd]?)", match.group(1))
        return _bounded(now + sum(float(n) * _UNIT_S[unit] for n, unit in parts), text)
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
        if when.tzinfo is None:
            when = when.astimezone()  # local time here
        ts = when.timestamp()
    except (ValueError, OverflowError, OSError) as e:
        raise ScheduleError(
            f"at: {text!r} is neither an ISO time (2025-01-31T02:00, 2025-01-31T02:00:00Z) "
            "nor relative (+30s, +5m, +2h, +1d)",
            field="at",
        ) from e
    return _bounded(ts, text)


def _bounded(ts: float, text: str) -> float:
    """``ts`` if it is a start time a task can have (up to 9999-12-31 UTC).

    Raises:
        ScheduleError: too far (``at: ...``).
    """
    if not 0 <= ts <= MAX_START_TIME:
        raise ScheduleError(f"at: {text!r} is out of range (up to 9999-12-31)", field="at")
    return ts


def format_utc(ts: float) -> str:
    """Unix seconds as ``2025-01-31T02:00:00.000Z`` (messages the desktop and laptop share)."""
    try:
        when = datetime.fromtimestamp(ts, UTC)
    except (ValueError, OverflowError, OSError):
        return f"{ts:.3f} (Unix s)"  # out of datetime's range: say it plainly, never raise
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
