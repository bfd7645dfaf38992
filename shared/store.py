"""The Redis status store: the truth about every task.

Every state change is one atomic compare-and-set in Lua: the script reads the current state, moves
it only if it is one of the expected states, stamps ``<state>_at`` with the Redis server's clock
(one clock for laptop and desktop) and appends the transition to the task's history. Two parties
can therefore never both move a task from ``queued`` to ``running``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar, cast

import redis.asyncio as aioredis
from pydantic import BaseModel, Field
from redis.asyncio.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from shared.constants import FINISHED_TASK_TTL_S
from shared.errors import NotConnectedError, StoreError, TaskNotFoundError
from shared.keys import Keys
from shared.messages import TERMINAL_STATES, ConfigRef, TaskState, TaskSubmission
from shared.settings import Settings

# Every script below that moves a task also moves its id between the per-state sorted sets
# ``<prefix><state>`` (score: when it entered that state), the prefix being the last KEYS entry.
# Those keys are built inside the script, which a single Redis server allows (not a cluster).

#: Field set on a task's record once another task depends on it: a terminal event whose record
#: lacks it tells the scheduler nobody waits for that task (no children lookup).
HAS_CHILDREN_FIELD = "has_children"

# KEYS: task hash. Marks a parent's record (not creating one for a parent that expired).
_MARK_PARENT = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'has_children', 1) end
return 1
"""

# KEYS: task hash, history list, index zset, state-set prefix. ARGV: '1' to have the record
# back (else '0'), then spec fields as name/value pairs. Returns {1 if created else 0[, hash]}.
_CREATE = """
local function reply(created)
  if ARGV[1] == '1' then return {created, redis.call('HGETALL', KEYS[1])} end
  return {created}
end
if redis.call('EXISTS', KEYS[1]) == 1 then return reply(0) end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('HSET', KEYS[1], 'state', 'submitted', 'submitted_at', now, 'updated_at', now,
           'attempts', 0)
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('ZADD', KEYS[3], now, redis.call('HGET', KEYS[1], 'task_id'))
redis.call('ZADD', KEYS[4] .. 'submitted', now, redis.call('HGET', KEYS[1], 'task_id'))
redis.call('RPUSH', KEYS[2], cjson.encode({to = 'submitted', ts = now, attempt = 0,
  by = redis.call('HGET', KEYS[1], 'submitted_by'), reason = 'submitted'}))
return reply(1)
"""

# KEYS: task hash, history list, leases zset, retries zset, state-set prefix.
# ARGV: new state, by, reason, ttl seconds (0 = keep), owner, owner attempt, n expected, expected
# states..., then field/value pairs. With an owner, the move applies only if the task's worker and
# attempts still match (a worker that lost its lease cannot record over the next run). A move to
# running is refused while a retry is not yet due (a stray duplicate message cannot skip the
# back-off). A field '+x' adds to x; 'lease_s' sets lease_until = now + value and
# 'retry_in_s' sets retry_at = now + value (Redis clock). The leases and retries sorted sets
# follow the state: a lease exists only while running/cancelling, a retry due time only while
# queued. Returns {1 or 0, state before, attempts after}; state before is '' for no task.
_TRANSITION = """
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return {0, ''} end
local n = tonumber(ARGV[7])
local ok = false
for i = 1, n do if ARGV[7 + i] == cur then ok = true end end
if not ok then return {0, cur} end
if ARGV[5] ~= '' and (redis.call('HGET', KEYS[1], 'worker') ~= ARGV[5]
    or redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[6]) then
  return {0, cur}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local new = ARGV[1]
if new == 'running' then
  local due = tonumber(redis.call('HGET', KEYS[1], 'retry_at'))
  if due and due > now then return {0, cur} end
end
local id = redis.call('HGET', KEYS[1], 'task_id')
local retry = false
redis.call('HSET', KEYS[1], 'state', new, new .. '_at', now, 'updated_at', now)
redis.call('ZREM', KEYS[5] .. cur, id)
redis.call('ZADD', KEYS[5] .. new, now, id)
for i = 8 + n, #ARGV, 2 do
  local f, v = ARGV[i], ARGV[i + 1]
  if string.sub(f, 1, 1) == '+' then
    redis.call('HINCRBY', KEYS[1], string.sub(f, 2), v)
  elseif f == 'lease_s' then
    redis.call('HSET', KEYS[1], 'lease_until', now + tonumber(v))
  elseif f == 'retry_in_s' then
    redis.call('HSET', KEYS[1], 'retry_at', now + tonumber(v))
    retry = true
  else
    redis.call('HSET', KEYS[1], f, v)
  end
end
local lease = redis.call('HGET', KEYS[1], 'lease_until')
if (new == 'running' or new == 'cancelling') and lease then
  redis.call('ZADD', KEYS[3], lease, id)
else
  redis.call('ZREM', KEYS[3], id)
  redis.call('HDEL', KEYS[1], 'lease_until')
end
if new == 'queued' and retry then
  redis.call('ZADD', KEYS[4], redis.call('HGET', KEYS[1], 'retry_at'), id)
else
  redis.call('ZREM', KEYS[4], id)
  redis.call('HDEL', KEYS[1], 'retry_at')
end
local attempts = redis.call('HGET', KEYS[1], 'attempts')
redis.call('RPUSH', KEYS[2], cjson.encode({from = cur, to = new, ts = now, by = ARGV[2],
  attempt = tonumber(attempts), reason = ARGV[3]}))
local ttl = tonumber(ARGV[4])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
  return {1, cur, attempts, redis.call('HGETALL', KEYS[1])}
end
return {1, cur, attempts}
"""

# KEYS: task hash, history list, index zset, state-set prefix, retries zset. ARGV: by, seconds,
# then spec fields as name/value pairs. Creates a task straight in state queued (history:
# submitted, then queued by ARGV[1], at the same instant) for a submitter that publishes it to its
# lane itself (direct dispatch), and lists it for the dispatch pump due that many seconds from now
# (Redis clock), in case that publish never happens. An existing id is left alone. Returns
# {1 if created else 0, the record's hash, the due time or ''}.
_CREATE_QUEUED = """
if redis.call('EXISTS', KEYS[1]) == 1 then return {0, redis.call('HGETALL', KEYS[1]), ''} end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('HSET', KEYS[1], 'state', 'queued', 'submitted_at', now, 'queued_at', now,
           'updated_at', now, 'attempts', 0)
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
local id = redis.call('HGET', KEYS[1], 'task_id')
redis.call('ZADD', KEYS[3], now, id)
redis.call('ZADD', KEYS[4] .. 'queued', now, id)
redis.call('RPUSH', KEYS[2], cjson.encode({to = 'submitted', ts = now, attempt = 0,
  by = redis.call('HGET', KEYS[1], 'submitted_by'), reason = 'submitted'}))
redis.call('RPUSH', KEYS[2], cjson.encode({from = 'submitted', to = 'queued', ts = now,
  by = ARGV[1], attempt = 0, reason = 'dispatched by its submitter'}))
local due = now + tonumber(ARGV[2])
redis.call('ZADD', KEYS[5], due, id)
return {1, redis.call('HGETALL', KEYS[1]), tostring(due)}
"""

# KEYS: retries zset. ARGV: task id, due time. Crosses off the listing above once the publish was
# confirmed, but only that listing: a retry or hand-back listed meanwhile has another due time.
_UNLIST_DISPATCH = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and math.abs(tonumber(score) - tonumber(ARGV[2])) < 0.001 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 1
end
return 0
"""

# KEYS: task hash, leases zset. ARGV: worker, lease seconds.
# Renews the lease of a task this worker holds; returns its state ('' if not the worker's).
_RENEW = """
local state = redis.call('HGET', KEYS[1], 'state')
if (state ~= 'running' and state ~= 'cancelling')
   or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then return '' end
local t = redis.call('TIME')
local lease = tonumber(t[1]) + tonumber(t[2]) / 1e6 + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'lease_until', lease)
redis.call('ZADD', KEYS[2], lease, redis.call('HGET', KEYS[1], 'task_id'))
return state
"""

# KEYS: task hash, history list, leases zset, retries zset, state-set prefix. ARGV: task id,
# default max attempts, ttl. A requeued task is put in the retries set, due now: the retry pump
# dispatches it.
# Acts on a task whose lease expired (worker lost): cancelling -> cancelled; running -> queued
# (to be dispatched again) or failed once attempts reached max_attempts. A laptop's local run
# (worker 'local:...') is failed, never requeued: it may have finished offline, and a rerun on the
# desktop would be a second run; its worker is kept so the laptop can still publish it. Returns
# {outcome, attempts} with outcome one of cancelled, queued, failed, alive, gone.
_REAP = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state or (state ~= 'running' and state ~= 'cancelling') then
  redis.call('ZREM', KEYS[3], ARGV[1])
  return {'gone', 0}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local lease = tonumber(redis.call('HGET', KEYS[1], 'lease_until') or '0')
if lease > now then
  redis.call('ZADD', KEYS[3], lease, ARGV[1])
  return {'alive', 0}
end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
local max = tonumber(redis.call('HGET', KEYS[1], 'max_attempts')) or tonumber(ARGV[2])
local lost = redis.call('HINCRBY', KEYS[1], 'lost', 1)
local worker = redis.call('HGET', KEYS[1], 'worker') or ''
local new, reason
local is_local = string.sub(worker, 1, 6) == 'local:'
if state == 'cancelling' then
  new, reason = 'cancelled', 'worker ' .. worker .. ' lost while cancelling'
elseif is_local then
  new = 'failed'
  reason = 'local run on ' .. worker .. ' not heard from (lease expired); not rerun on the ' ..
    'desktop, since it may have finished there: publish it with task sync-local on that ' ..
    'machine, or submit it again'
  redis.call('HSET', KEYS[1], 'error', reason)
elseif attempts >= max then
  new, reason = 'failed', 'worker lost ' .. lost .. ' times'
  redis.call('HSET', KEYS[1], 'error', reason)
else
  new, reason = 'queued', 'worker ' .. worker .. ' lost (lease expired); requeued'
  redis.call('HSET', KEYS[1], 'retry_at', now)
  redis.call('ZADD', KEYS[4], now, ARGV[1])
end
redis.call('HSET', KEYS[1], 'state', new, new .. '_at', now, 'updated_at', now)
redis.call('ZREM', KEYS[5] .. state, ARGV[1])
redis.call('ZADD', KEYS[5] .. new, now, ARGV[1])
redis.call('HDEL', KEYS[1], 'lease_until', 'child_pid')
if not is_local then redis.call('HDEL', KEYS[1], 'worker') end
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('RPUSH', KEYS[2], cjson.encode({from = state, to = new, ts = now, by = 'reaper',
  attempt = attempts, reason = reason}))
if new ~= 'queued' then
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
end
return {new, attempts}
"""

# KEYS: task hash. ARGV: owner ('' = anyone), n expected, expected states..., field/value pairs.
# Updates fields (progress, lease) only while the task is in one of the expected states.
_UPDATE_IF = """
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return 0 end
if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then return 0 end
local n = tonumber(ARGV[2])
local ok = false
for i = 1, n do if ARGV[2 + i] == cur then ok = true end end
if not ok then return 0 end
for i = 3 + n, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""

# KEYS: task hash, retries zset. ARGV: delay seconds, what the task waits for.
# Holds a queued task back: due for dispatch again in ARGV[1] s (claims are refused until then),
# and remembers since when it has waited (the first deferral). Returns {1, waited seconds as a
# string} or {0, state} when the task is not queued.
_DEFER = """
local cur = redis.call('HGET', KEYS[1], 'state')
if cur ~= 'queued' then return {0, cur or ''} end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('HSETNX', KEYS[1], 'waiting_since', now)
local since = tonumber(redis.call('HGET', KEYS[1], 'waiting_since'))
local due = now + tonumber(ARGV[1])
redis.call('HSET', KEYS[1], 'retry_at', due, 'waiting', ARGV[2], 'updated_at', now)
redis.call('ZADD', KEYS[2], due, redis.call('HGET', KEYS[1], 'task_id'))
return {1, tostring(now - since)}
"""

P = ParamSpec("P")
R = TypeVar("R")
M = TypeVar("M", bound=BaseModel)


def _store_errors(func: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Turn Redis and socket errors raised by ``func`` into ``StoreError``; others pass through."""

    @functools.wraps(func)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await func(*args, **kwargs)
        except (RedisError, OSError) as e:
            raise StoreError(f"Redis {func.__name__} failed: {e}") from e

    return wrapper


#: For other modules keeping data in the status store's Redis (schedules).
store_errors = _store_errors


def _store_reads(func: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """``_store_errors`` for a read-only call, tried once more after a dropped connection.

    After a Redis restart every pooled connection is stale and fails once (the health-check
    PING sees the closed socket). A read is safe to send again; a write is not (a script whose
    reply was lost may have run), so writes keep failing with ``StoreError`` for their caller.
    """

    @functools.wraps(func)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            try:
                return await func(*args, **kwargs)
            except RedisConnectionError:
                return await func(*args, **kwargs)
        except (RedisError, OSError) as e:
            raise StoreError(f"Redis {func.__name__} failed: {e}") from e

    return wrapper


class TaskRecord(BaseModel):
    """A task as Redis holds it. Timestamps are Unix seconds from the Redis server's clock."""

    task_id: str
    task_type: str
    state: TaskState
    priority: int
    config: dict[str, Any] = Field(default_factory=dict)
    submitted_by: str = ""
    git_commit: str | None = None
    timeout_s: float | None = None
    attempts: int = 0
    worker: str | None = None
    submitted_at: float | None = None
    queued_at: float | None = None
    running_at: float | None = None
    completed_at: float | None = None
    failed_at: float | None = None
    cancelled_at: float | None = None
    updated_at: float | None = None
    lease_until: float | None = None
    child_pid: int | None = None
    max_attempts: int | None = None
    lost: int = 0
    retry_at: float | None = None
    submitted_at_client: float | None = None
    progress: float | None = None
    progress_message: str = ""
    #: The commit of the code the task's last run was started on (the worker's checkout).
    code_commit: str | None = None
    #: What a queued task is held back for (a commit the desktop lacks), and since when (s).
    waiting: str = ""
    waiting_since: float | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    traceback: str | None = None
    #: Parents this task waits for (all must complete), config values taken from them, and the
    #: time before which it is not queued (Unix s, Redis clock).
    depends_on: list[str] = Field(default_factory=list)
    config_refs: list[ConfigRef] = Field(default_factory=list)
    not_before: float | None = None
    #: The config as submitted, references unresolved (set when the scheduler resolved them).
    config_template: dict[str, Any] | None = None
    #: Why the task ran on the client's machine instead of the desktop (local fallback).
    fallback_reason: str = ""
    #: The end of that local run was recorded by the client itself.
    local_published: bool = False

    @property
    def finished_at(self) -> float | None:
        """When the task reached its terminal state, if it has."""
        return self.completed_at or self.failed_at or self.cancelled_at

    def to_submission(self) -> TaskSubmission:
        """The task as submitted, to dispatch it again (a retry, a requeue after a lost worker)."""
        return TaskSubmission(
            task_id=self.task_id,
            task_type=self.task_type,
            config=self.config,
            priority=self.priority,
            submitted_at=self.submitted_at_client or self.submitted_at or 0.0,
            submitted_by=self.submitted_by,
            git_commit=self.git_commit,
            timeout_s=self.timeout_s,
            max_attempts=self.max_attempts,
        )

    @classmethod
    def from_hash(cls, raw: Mapping[str, str]) -> TaskRecord:
        """Build from the Redis hash; JSON fields (config, result) are decoded."""
        data: dict[str, Any] = {k: v for k, v in raw.items() if v != ""}
        for field in ("config", "result", "depends_on", "config_refs", "config_template"):
            if field in data:
                data[field] = json.loads(data[field])
        return cls.model_validate(data)


@dataclass(frozen=True)
class Transition:
    """Outcome of a compare-and-set: whether it applied, the state before, attempts after."""

    applied: bool
    previous: TaskState | None
    attempts: int = 0
    #: The record's hash as the move left it, read in the same atomic step: only for an applied
    #: move to a terminal state (the record is final then; see ``TaskRecord.from_hash``).
    record: dict[str, str] | None = None


class StatusStore:
    """Async access to task records in Redis.

    Args:
        settings: ``redis_url`` (credentials inside), TLS files, ``namespace``, socket timeout.

    The client uses a ``BlockingConnectionPool`` so callers wait for a free connection under load
    instead of failing, and socket timeouts so no call hangs on a dead socket.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.keys = Keys(settings.namespace)
        self._redis: aioredis.Redis | None = None

    async def start(self) -> None:
        """Connect and check the server answers.

        Raises:
            StoreError: Redis cannot be reached (the message names the redacted URL).
        """
        s = self._settings
        kwargs: dict[str, Any] = {
            "decode_responses": True,
            "socket_timeout": s.socket_timeout_s,
            "socket_connect_timeout": s.socket_timeout_s,
            # A connection idle for over a second is PINGed (and reconnected) before use, so the
            # first call after a Redis restart does not fail on a stale pooled connection.
            "health_check_interval": 1,
            "max_connections": s.redis_max_connections,
            "timeout": s.socket_timeout_s,
        }
        # rediss:// makes from_url pick the SSL connection class; these add the CA and client files.
        kwargs.update(s.redis_tls_kwargs())
        pool = aioredis.BlockingConnectionPool.from_url(s.redis_url, **kwargs)
        self._redis = aioredis.Redis(connection_pool=pool)
        try:
            await self._redis.ping()
        except (RedisError, OSError) as e:
            await self.stop()
            raise StoreError(s.connection_error("redis", e)) from e
        self._create = self._redis.register_script(_CREATE)
        self._mark_parent = self._redis.register_script(_MARK_PARENT)
        self._transition = self._redis.register_script(_TRANSITION)
        self._update_if = self._redis.register_script(_UPDATE_IF)
        self._renew = self._redis.register_script(_RENEW)
        self._create_queued = self._redis.register_script(_CREATE_QUEUED)
        self._unlist_dispatch = self._redis.register_script(_UNLIST_DISPATCH)
        self._reap = self._redis.register_script(_REAP)
        self._defer = self._redis.register_script(_DEFER)

    async def stop(self) -> None:
        """Close the connection pool."""
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    @property
    def connected(self) -> bool:
        """Whether ``start`` succeeded (and ``stop`` was not called since)."""
        return self._redis is not None

    @property
    def redis(self) -> aioredis.Redis:
        """The underlying client (raises ``NotConnectedError`` before ``start``)."""
        if self._redis is None:
            raise NotConnectedError("status store used before start()")
        return self._redis

    @_store_errors
    async def create(self, submission: TaskSubmission) -> bool:
        """Record a new task in state ``submitted`` unless one with this id exists.

        Returns:
            True if created, False if the id was already known (idempotent submit).
        """
        (created,) = await self._call(self._create, *self._create_call(submission, record=False))
        return bool(created)

    @_store_errors
    async def create_record(self, submission: TaskSubmission) -> tuple[bool, TaskRecord]:
        """``create``, and the record as it is right after, read in the same atomic step.

        Returns:
            ``(created, record)``: the new record, or the one already known under this id.
        """
        created, flat = await self._call(self._create, *self._create_call(submission, record=True))
        return bool(created), TaskRecord.from_hash(_hash(flat))

    @_store_errors
    async def create_and_transition(
        self,
        submission: TaskSubmission,
        new: TaskState,
        *,
        by: str,
        reason: str = "",
        fields: Mapping[str, str | int | float] | None = None,
    ) -> tuple[bool, Transition]:
        """``create``, then ``transition(expected=[submitted], new)``, in one round trip.

        Both scripts go in one pipeline (one connection, so in this order); each is atomic on
        its own, exactly as the two calls one after the other. Returns ``(created, move)``.
        """
        move = self._transition_call(
            submission.task_id,
            [TaskState.SUBMITTED],
            new,
            by=by,
            reason=reason,
            fields=fields,
            owner=None,
        )
        created, moved = await self._pipelined(
            [
                (self._create, *self._create_call(submission, record=False)),
                (self._transition, *move),
            ]
        )
        return bool(created[0]), _transition_result(moved)

    @_store_errors
    async def create_queued(
        self, submission: TaskSubmission, *, by: str, pump_after_s: float
    ) -> tuple[bool, TaskRecord, float | None]:
        """Record a new task straight as ``queued``, for a submitter that publishes it itself.

        One atomic step: the record (history ``submitted``, then ``queued`` by ``by``), and a
        listing for the dispatch pump due ``pump_after_s`` from now, so a publish that never
        happens (the submitter died, the broker refused) is done by the scheduler's pump then.
        Cross it off with ``unlist_dispatch`` once the publish is confirmed. A known id is left
        as it is (idempotent submit).

        Returns:
            ``(created, record, due)``: the record as it is now (the new one, or the one already
            known under this id) and the listing's due time (Unix s, Redis clock; None when
            not created).
        """
        keys, args = self._create_call(submission, record=False)
        created, flat, due = await self._call(
            self._create_queued,
            [*keys, self.keys.retries],
            [by, str(pump_after_s), *args[1:]],
        )
        return bool(created), TaskRecord.from_hash(_hash(flat)), float(due) if due else None

    @_store_errors
    async def unlist_dispatch(self, task_id: str, due: float) -> bool:
        """Cross off ``create_queued``'s listing (due at ``due``) after a confirmed publish.

        Leaves any other listing of the task (a retry, a hand-back) in place. True if removed.
        """
        return bool(
            await self._call(self._unlist_dispatch, [self.keys.retries], [task_id, repr(due)])
        )

    def _create_call(
        self, submission: TaskSubmission, *, record: bool
    ) -> tuple[list[str], list[str]]:
        self.redis  # noqa: B018 - raises NotConnectedError before start
        fields = {
            "task_id": submission.task_id,
            "task_type": submission.task_type,
            "priority": str(submission.priority),
            "config": json.dumps(submission.config),
            "submitted_by": submission.submitted_by,
            "git_commit": submission.git_commit or "",
            "timeout_s": "" if submission.timeout_s is None else str(submission.timeout_s),
            "max_attempts": "" if submission.max_attempts is None else str(submission.max_attempts),
            "submitted_at_client": str(submission.submitted_at),
            "depends_on": json.dumps(submission.depends_on) if submission.depends_on else "",
            "config_refs": (
                json.dumps([r.model_dump() for r in submission.config_refs])
                if submission.config_refs
                else ""
            ),
            "not_before": "" if submission.not_before is None else repr(submission.not_before),
        }
        keys = [
            self.keys.task(submission.task_id),
            self.keys.history(submission.task_id),
            self.keys.task_index,
            self.keys.state_prefix,
        ]
        args = ["1" if record else "0", *(x for pair in fields.items() for x in pair)]
        return keys, args

    @_store_errors
    async def transition(
        self,
        task_id: str,
        expected: Iterable[TaskState],
        new: TaskState,
        *,
        by: str = "",
        reason: str = "",
        fields: Mapping[str, str | int | float] | None = None,
        owner: tuple[str, int] | None = None,
        prelude: Callable[[Pipeline], int] | None = None,
    ) -> Transition:
        """Atomically move a task to ``new`` if its state is one of ``expected``.

        Args:
            task_id: the task.
            expected: states from which the move is allowed.
            new: target state; ``<new>_at`` is stamped with the Redis clock.
            by: who made the move (worker name, ``scheduler``, ``client``), kept in history.
            reason: why, kept in history (``retrying in 2.1 s after: ConnectionError...``).
            owner: ``(worker, attempt)`` that must still hold the task for the move to apply.
            fields: extra hash fields set in the same step; a name starting with ``+`` is added
                to (``{"+attempts": 1}``); ``lease_s`` and ``retry_in_s`` set ``lease_until`` and
                ``retry_at`` that many seconds from now on the Redis clock.

            prelude: queues Redis commands that must run just before the move, in the same round
                trip (a pipeline: one connection, in order): a finished run's last log lines go
                this way, so a follower that sees the task ended finds them in the stream. It
                returns how many it queued; their errors are not raised (best effort).

        Returns:
            ``Transition(applied, previous)``; ``previous`` is None when the task does not exist.
        """
        call = self._transition_call(
            task_id, expected, new, by=by, reason=reason, fields=fields, owner=owner
        )
        if prelude is None:
            return _transition_result(await self._call(self._transition, *call))
        (result,) = await self._pipelined([(self._transition, *call)], prelude=prelude)
        return _transition_result(result)

    def _transition_call(
        self,
        task_id: str,
        expected: Iterable[TaskState],
        new: TaskState,
        *,
        by: str,
        reason: str,
        fields: Mapping[str, str | int | float] | None,
        owner: tuple[str, int] | None,
    ) -> tuple[list[str], list[str]]:
        allowed = [s.value for s in expected]
        pairs = [str(x) for pair in (fields or {}).items() for x in pair]
        ttl = FINISHED_TASK_TTL_S if new.is_terminal else 0
        worker, attempt = owner if owner is not None else ("", "")
        args = [
            new.value,
            by,
            reason,
            str(ttl),
            worker,
            str(attempt),
            str(len(allowed)),
            *allowed,
            *pairs,
        ]
        keys = [
            self.keys.task(task_id),
            self.keys.history(task_id),
            self.keys.leases,
            self.keys.retries,
            self.keys.state_prefix,
        ]
        return keys, args

    async def claim(
        self,
        task_id: str,
        worker: str,
        *,
        lease_s: float,
        code_commit: str | None = None,
        expected: Iterable[TaskState] = (TaskState.QUEUED,),
        fields: Mapping[str, str | int | float] | None = None,
        reason: str = "",
    ) -> Transition:
        """Take a task to run it: ``queued -> running`` for ``worker``, one compare-and-set.

        The one claim every runner makes, a desktop worker and the laptop's local fallback
        alike: of two parties claiming the same task at once exactly one applies (Redis runs
        the script atomically); the other sees ``previous`` = ``running`` and must not run it.

        Args:
            task_id: the task.
            worker: the claimant's name (``local:<host>`` for the local fallback).
            lease_s: lease to hold (s); the claimant renews it (``renew_lease``).
            code_commit: commit of the code the run starts on.
            expected: states it may be claimed from (the fallback also takes ``submitted``).
            fields: more hash fields set in the same step.
            reason: why, kept in history.

        Returns:
            The ``Transition``; ``attempts`` is this run's attempt number when it applied.
        """
        return await self.transition(
            task_id,
            expected,
            TaskState.RUNNING,
            by=worker,
            reason=reason,
            fields={
                "worker": worker,
                "+attempts": 1,
                "lease_s": lease_s,
                "code_commit": code_commit or "",
                "waiting": "",
                **(fields or {}),
            },
        )

    @_store_errors
    async def update_if(
        self,
        task_id: str,
        states: Iterable[TaskState],
        fields: Mapping[str, str | int | float],
        *,
        worker: str = "",
    ) -> bool:
        """Set ``fields`` only while the task is in one of ``states`` (and held by ``worker``)."""
        allowed = [s.value for s in states]
        pairs = [str(x) for pair in fields.items() for x in pair]
        return bool(
            await self._call(
                self._update_if,
                [self.keys.task(task_id)],
                [worker, str(len(allowed)), *allowed, *pairs],
            )
        )

    @_store_errors
    async def renew_lease(self, task_id: str, worker: str, lease_s: float) -> TaskState | None:
        """Extend the lease of a task ``worker`` holds to now + ``lease_s`` (Redis clock).

        Returns:
            The task's state (``running`` or ``cancelling``: the worker learns of a cancel here
            even if the control message was lost), or None if the task is no longer this
            worker's (reaped, finished).
        """
        state = await self._call(
            self._renew, [self.keys.task(task_id), self.keys.leases], [worker, str(lease_s)]
        )
        return TaskState(state) if state else None

    @_store_errors
    async def expired_leases(self, limit: int = 100) -> list[str]:
        """Ids of tasks whose lease expired (by the Redis clock), oldest first."""
        now = await self._now()
        return cast(
            list[str],
            await self.redis.zrangebyscore(self.keys.leases, "-inf", now, start=0, num=limit),
        )

    @_store_errors
    async def reap(self, task_id: str, default_max_attempts: int) -> tuple[str, int]:
        """Act on an expired lease (see ``_REAP``): returns ``(outcome, attempts)``."""
        keys = [
            self.keys.task(task_id),
            self.keys.history(task_id),
            self.keys.leases,
            self.keys.retries,
            self.keys.state_prefix,
        ]
        outcome, attempts = await self._call(
            self._reap, keys, [task_id, str(default_max_attempts), str(FINISHED_TASK_TTL_S)]
        )
        return str(outcome), int(attempts)

    @_store_errors
    async def defer(self, task_id: str, delay_s: float, waiting: str) -> float | None:
        """Hold a queued task back for ``delay_s`` seconds, then have it dispatched again.

        Until then every claim is refused; the scheduler's dispatch pump republishes it when due.

        Args:
            task_id: the task (must be ``queued``).
            delay_s: seconds until it is dispatched again.
            waiting: what it waits for, shown by ``task status``.

        Returns:
            Seconds since the task was first held back, or None when it is not queued (taken,
            cancelled, finished: nothing was changed).
        """
        applied, value = await self._call(
            self._defer,
            [self.keys.task(task_id), self.keys.retries],
            [str(delay_s), waiting],
        )
        return float(value) if applied else None

    @_store_reads
    async def due_dispatches(self, limit: int = 100) -> list[str]:
        """Ids of queued tasks whose (re)dispatch is due.

        Retries, and tasks requeued by the reaper or a draining worker. Remove each with
        ``dispatched`` once it is published.
        """
        now = await self._now()
        return cast(
            list[str],
            await self.redis.zrangebyscore(self.keys.retries, "-inf", now, start=0, num=limit),
        )

    @_store_reads
    async def dispatch_pending(self, task_id: str) -> bool:
        """Whether ``task_id`` still waits in the dispatch set (not published, not crossed off)."""
        return await self.redis.zscore(self.keys.retries, task_id) is not None

    @_store_errors
    async def dispatched(self, task_id: str) -> None:
        """Forget a due dispatch after publishing it.

        A crash in between publishes it twice, which is harmless: a worker's claim takes a task
        once.
        """
        await self.redis.zrem(self.keys.retries, task_id)

    @_store_errors
    async def save_report(
        self, key: str, report: BaseModel, *, ttl_s: int | None = None, index: str | None = None
    ) -> None:
        """Store a service's JSON report (git-sync or artifact state) at ``key``.

        Args:
            key: from ``Keys`` (``git_sync(host)``, ``artifacts(task_id)``).
            report: the pydantic model to store.
            ttl_s: expire after this many seconds; None keeps it.
            index: a set that lists ``key``, so readers find every report without a SCAN.
        """
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(key, report.model_dump_json(), ex=ttl_s)
            if index is not None:
                pipe.sadd(index, key)
            await pipe.execute()

    @_store_errors
    async def load_reports(
        self,
        model: type[M],
        *,
        keys: list[str] | None = None,
        index: str | None = None,
        pattern: str = "",
    ) -> list[M]:
        """Reports stored with ``save_report``; missing keys are left out.

        Args:
            model: the pydantic model they were stored as.
            keys: these keys; else
            index: the keys this set lists (one round trip); else
            pattern: every key matching this glob (a SCAN of the whole keyspace: for listings).
        """
        if keys is None and index is not None:
            keys = sorted(str(k) for k in await self.redis.smembers(index))
        if keys is None:
            keys = [k async for k in self.redis.scan_iter(match=pattern, count=1000)]
        raw = await self.redis.mget(keys) if keys else []
        return [model.model_validate_json(r) for r in raw if r]

    async def _now(self) -> float:
        seconds, micros = await self.redis.time()
        return float(seconds) + float(micros) / 1e6

    @_store_errors
    async def now(self) -> float:
        """The Redis server's clock (Unix s): the one clock of laptop, desktop and scheduler."""
        return await self._now()

    @_store_reads
    async def exists(self, task_ids: Iterable[str]) -> dict[str, bool]:
        """Whether a record exists for each of ``task_ids`` (one round trip)."""
        ids = list(task_ids)
        async with self.redis.pipeline(transaction=False) as pipe:
            for task_id in ids:
                pipe.exists(self.keys.task(task_id))
            found = await pipe.execute()
        return {task_id: bool(n) for task_id, n in zip(ids, found, strict=True)}

    @_store_errors
    async def hold(self, task_id: str, parents: Iterable[str], check_at: float) -> None:
        """Hold a ``submitted`` task: list it under each parent and look at it at ``check_at``.

        Idempotent. The children sets only speed the release up (a parent's end finds its
        children at once); the held set is what a periodic pass walks, so a lost event delays a
        release by one pass at most.

        Args:
            task_id: the held task.
            parents: its ``depends_on``.
            check_at: when to evaluate it again (Unix s, Redis clock).
        """
        async with self.redis.pipeline(transaction=True) as pipe:
            for parent in parents:
                pipe.sadd(self.keys.children(parent), task_id)
                # Outlives the parent's record (30 days after it ended) by at most as long.
                pipe.expire(self.keys.children(parent), FINISHED_TASK_TTL_S)
                # Flag on the parent's own record (only if it exists): its terminal event then
                # says whether anyone waits for it (``HAS_CHILDREN_FIELD``).
                await self._mark_parent(keys=[self.keys.task(parent)], client=pipe)
            pipe.zadd(self.keys.held, {task_id: check_at})
            await pipe.execute()

    @_store_errors
    async def recheck_held(self, task_id: str, check_at: float) -> None:
        """Look at a held task again at ``check_at`` (Unix s, Redis clock)."""
        await self.redis.zadd(self.keys.held, {task_id: check_at})

    @_store_errors
    async def unhold(self, task_id: str) -> None:
        """Forget a held task (released, failed, cancelled or gone)."""
        await self.redis.zrem(self.keys.held, task_id)

    @_store_errors
    async def due_held(self, limit: int = 200) -> list[str]:
        """Held tasks due to be looked at again, soonest first."""
        now = await self._now()
        return cast(
            list[str],
            await self.redis.zrangebyscore(self.keys.held, "-inf", now, start=0, num=limit),
        )

    @_store_reads
    async def children(self, task_id: str) -> list[str]:
        """Ids of the tasks that depend on ``task_id``."""
        return sorted(cast(set[str], await self.redis.smembers(self.keys.children(task_id))))

    @_store_reads
    async def get(self, task_id: str) -> TaskRecord:
        """The task's record.

        Raises:
            TaskNotFoundError: no such task (never submitted, or expired after 30 days).
        """
        raw = cast(dict[str, str], await self.redis.hgetall(self.keys.task(task_id)))
        if not raw:
            raise TaskNotFoundError(f"no task {task_id!r}", task_id=task_id)
        return TaskRecord.from_hash(raw)

    @_store_reads
    async def resolve_id(self, id_or_prefix: str) -> str:
        """The full task id for an id or a unique prefix of one (as ``git`` resolves SHAs).

        Raises:
            TaskNotFoundError: no task matches, or the prefix matches several (they are named).
        """
        if await self.redis.exists(self.keys.task(id_or_prefix)):
            return id_or_prefix
        matches: list[str] = []
        if id_or_prefix and "*" not in id_or_prefix and "?" not in id_or_prefix:
            async for member, _score in self.redis.zscan_iter(
                self.keys.task_index, match=f"{id_or_prefix}*", count=1000
            ):
                matches.append(member)
                if len(matches) > 5:
                    break
        if len(matches) == 1:
            return matches[0]
        # A hyperopt task and its trial tasks (``<id>.runner-<n>``): the prefix means the parent.
        parents = [m for m in matches if all(o.startswith(m) for o in matches)]
        if len(parents) == 1 and len(matches) <= 5:
            return parents[0]
        if matches:
            raise TaskNotFoundError(
                f"task id prefix {id_or_prefix!r} is ambiguous: {', '.join(matches)}"
            )
        raise TaskNotFoundError(f"no task {id_or_prefix!r}", task_id=id_or_prefix)

    @_store_reads
    async def history(self, task_id: str) -> list[dict[str, Any]]:
        """The task's transitions, oldest first: ``[{"from", "to", "ts", "by"}, ...]``."""
        items = await self.redis.lrange(self.keys.history(task_id), 0, -1)
        return [json.loads(i) for i in items]

    @_store_reads
    async def list_recent(
        self, limit: int = 50, state: TaskState | None = None, *, scan_max: int = 100_000
    ) -> list[TaskRecord]:
        """The ``limit`` most recently submitted tasks (in ``state`` if given), newest first.

        With a state filter the index is read in pages, newest first, until ``limit`` matches are
        found or ``scan_max`` tasks were looked at, so an old stuck task is still found.
        """
        found: list[TaskRecord] = []
        page = max(limit, 200) if state is not None else limit
        for start in range(0, scan_max, page):
            ids = cast(
                list[str], await self.redis.zrevrange(self.keys.task_index, start, start + page - 1)
            )
            records = await self.get_many(ids)
            found.extend(r for r in records if state is None or r.state is state)
            if len(found) >= limit or len(ids) < page:
                break
        return found[:limit]

    @_store_errors
    async def count_by_state(self) -> dict[TaskState, int]:
        """How many tasks are in each state now (one ``ZCARD`` per state).

        Ids of finished tasks whose records expired (``FINISHED_TASK_TTL_S``) are pruned first,
        so the counts match the records that exist.
        """
        cutoff = await self._now() - FINISHED_TASK_TTL_S
        async with self.redis.pipeline(transaction=False) as pipe:
            for state in TERMINAL_STATES:
                pipe.zremrangebyscore(self.keys.state_index(state.value), "-inf", cutoff)
            for state in TaskState:
                pipe.zcard(self.keys.state_index(state.value))
            replies = await pipe.execute()
        counts = replies[len(TERMINAL_STATES) :]
        return {state: int(n) for state, n in zip(TaskState, counts, strict=True)}

    @_store_errors
    async def in_state(
        self, state: TaskState, limit: int = 100, *, newest_first: bool = False
    ) -> list[TaskRecord]:
        """Records of up to ``limit`` tasks in ``state``, ordered by when they entered it."""
        key = self.keys.state_index(state.value)
        read = self.redis.zrevrange if newest_first else self.redis.zrange
        ids = cast(list[str], await read(key, 0, limit - 1))
        return await self.get_many(ids)

    @_store_errors
    async def entered_since(
        self, state: TaskState, since: float, limit: int = 1000
    ) -> list[tuple[str, float]]:
        """``(task id, when)`` of tasks that entered ``state`` at or after ``since``.

        Times are Unix seconds on the Redis clock; oldest first, at most ``limit``.
        """
        rows = await self.redis.zrangebyscore(
            self.keys.state_index(state.value), since, "+inf", start=0, num=limit, withscores=True
        )
        return [(str(row[0]), float(row[1])) for row in rows]

    @_store_errors
    async def oldest_in_state(self, state: TaskState) -> float | None:
        """When the task longest in ``state`` entered it (Unix s, Redis clock), or None."""
        first = await self.redis.zrange(self.keys.state_index(state.value), 0, 0, withscores=True)
        return float(first[0][1]) if first else None

    @_store_errors
    async def get_many(self, task_ids: Iterable[str]) -> list[TaskRecord]:
        """Records of ``task_ids`` in that order, leaving out those that no longer exist."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for task_id in task_ids:
                pipe.hgetall(self.keys.task(task_id))
            rows: list[dict[str, str]] = await pipe.execute()
        return [TaskRecord.from_hash(r) for r in rows if r]

    async def _call(self, script: Any, keys: list[str], args: list[str]) -> Any:
        return await script(keys=keys, args=args)

    async def _pipelined(
        self,
        calls: Sequence[tuple[Any, list[str], list[str]]],
        *,
        prelude: Callable[[Pipeline], int] | None = None,
    ) -> list[Any]:
        """Scripts, after ``prelude``'s commands, in one round trip; each script's result.

        Sent as ``EVAL`` with the script's text (Redis caches it by SHA), not ``EVALSHA``: a
        pipeline cannot load a missing script half-way, and rerunning moves that already
        applied would report them refused. A script's error is raised; a prelude's is not.
        """
        async with self.redis.pipeline(transaction=False) as pipe:
            queued = prelude(pipe) if prelude is not None else 0
            for script, keys, args in calls:
                pipe.eval(script.script, len(keys), *keys, *args)
            results = await pipe.execute(raise_on_error=False)
        mine = results[queued:]
        for result in mine:
            if isinstance(result, Exception):
                raise result
        return mine


def _hash(flat: Sequence[str]) -> dict[str, str]:
    """A hash from ``HGETALL``'s flat ``[field, value, ...]`` reply inside a script."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _transition_result(reply: Sequence[Any]) -> Transition:
    """``Transition`` from the transition script's ``{applied, before[, attempts[, hash]]}``."""
    applied, before, *rest = reply
    attempts = int(rest[0]) if rest and rest[0] is not None else 0
    record = _hash(rest[1]) if len(rest) > 1 and rest[1] else None
    return Transition(bool(applied), TaskState(before) if before else None, attempts, record)
