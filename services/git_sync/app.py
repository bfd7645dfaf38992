"""git-sync wiring: a fetch loop, ``sync.now`` on demand, status in Redis, ``sync.*`` events.

Each pass: fetch the tracked branch (own process group, killed at ``git_timeout_s``), inspect,
fast-forward when the tree is clean and strictly behind, write ``SyncStatus`` to Redis and publish
an event when something changed. Problems are reported, never "fixed"; fetch failures back off
(doubling up to ``BACKOFF_MAX_FACTOR`` intervals) so a dead remote sees no retry storm.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import replace

import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from services.git_sync.checkout import Inspection, current_branch, fast_forward, inspect
from services.git_sync.gitproc import (
    classify_fetch_failure,
    kill_leftover_group,
    run_git,
    summarise,
)
from shared.broker import Broker
from shared.errors import BrokerError, DecodeError, StoreError
from shared.gitsync import SyncEvent, SyncRequest, SyncState, SyncStatus
from shared.health import Beacon
from shared.messages import decode
from shared.settings import Settings
from shared.store import StatusStore

log = structlog.get_logger(__name__)

#: Least time between the starts of two passes, however many ``sync.now`` requests arrive (s).
REQUEST_GAP_S = 2.0
#: After fetch failures the pause grows to at most this many intervals (no retry storm).
BACKOFF_MAX_FACTOR = 8


class GitSync:
    """The git-sync service for ``settings.checkout_dir``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.host = settings.worker_name
        self.repo_dir = settings.checkout_dir
        self.store = StatusStore(settings)
        self.broker = Broker(settings, name=f"git-sync:{self.host}")
        self.status: SyncStatus | None = None
        self._wake = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None
        self._control: AbstractChannel | None = None
        self._failures = 0
        self._fetches = 0
        #: Holds the running fetch's process group id (see ``kill_leftover_group``).
        self.group_file = settings.data_dir / f"git-sync-{self.host}.pgid"
        self.beacon = Beacon(settings, self.store, self.broker, kind="git-sync", name=self.host)

    async def start(self) -> None:
        await asyncio.to_thread(self.group_file.parent.mkdir, parents=True, exist_ok=True)
        if await asyncio.to_thread(kill_leftover_group, self.group_file):
            log.warning("leftover_fetch_killed", note="an earlier git-sync died mid-fetch")
        await self.store.start()
        await self.broker.start()
        self._control = await self.broker.follow_control("sync.now", self.on_request)
        self.beacon.start()
        self._loop = asyncio.create_task(self._run(), name="git-sync")
        log.info("git_sync_ready", repo=str(self.repo_dir), remote=self.settings.git_remote)

    async def stop(self) -> None:
        await self.beacon.stop()
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.gather(self._loop, return_exceptions=True)
            self._loop = None
        await self.broker.close_channel(self._control)
        self._control = None
        await self.broker.stop()
        await self.store.stop()

    async def on_request(self, message: AbstractIncomingMessage) -> None:
        """``sync.now``: wake the loop (requests for another host are ignored)."""
        try:
            request = decode(message.body, SyncRequest, max_bytes=self.settings.max_message_bytes)
        except DecodeError as e:
            log.warning("sync_request_undecodable", error=str(e))
            return
        if request.host in (None, self.host):
            log.info("sync_requested", by=request.requested_by)
            self._wake.set()

    def next_pause_s(self) -> float:
        """The interval, doubled per consecutive fetch failure up to ``BACKOFF_MAX_FACTOR``x."""
        factor = min(2.0**self._failures, float(BACKOFF_MAX_FACTOR))
        return self.settings.git_sync_interval_s * factor

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.check()
            except (StoreError, BrokerError) as e:
                log.warning("sync_report_failed", error=str(e))
            except Exception:  # a bug must not end the loop: log it and keep serving
                log.exception("sync_pass_crashed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.next_pause_s())
            # Requests (sync.now) come no closer than REQUEST_GAP_S, so a burst of them, or a
            # worker asking again and again, cannot turn into back-to-back fetches.
            gap = min(REQUEST_GAP_S, self.settings.git_sync_interval_s)
            await asyncio.sleep(max(0.0, gap - (time.monotonic() - started)))
            self._wake.clear()

    async def check(self) -> SyncStatus:
        """One pass: fetch, inspect, maybe fast-forward; record and announce changes."""
        s = self.settings
        previous = self.status
        branch = s.git_branch or await asyncio.to_thread(current_branch, self.repo_dir)
        fetch_error: tuple[SyncState, str] | None = None
        fetched_at = previous.last_fetch_at if previous else None
        if branch is not None and await asyncio.to_thread(self.repo_dir.is_dir):
            self._fetches += 1
            refspec = f"+refs/heads/{branch}:refs/remotes/{s.git_remote}/{branch}"
            result = await run_git(
                self.repo_dir,
                "fetch",
                "--no-tags",
                s.git_remote,
                refspec,
                timeout_s=s.git_timeout_s,
                group_file=self.group_file,
            )
            if result.ok:
                fetched_at = time.time()
            else:
                fetch_error = classify_fetch_failure(result), summarise(result.stderr)
        self._failures = self._failures + 1 if fetch_error else 0
        seen = await asyncio.to_thread(inspect, self.repo_dir, s.git_remote, branch)
        old_sha, updated = seen.local_sha, False
        if fetch_error is None and seen.can_fast_forward and seen.remote_sha is not None:
            refused = await asyncio.to_thread(fast_forward, self.repo_dir, seen.remote_sha)
            if refused is None:
                updated = True
                seen = await asyncio.to_thread(inspect, self.repo_dir, s.git_remote, branch)
                moved = f"{(old_sha or '')[:12]} -> {(seen.local_sha or '')[:12]}"
                seen = replace(seen, message=f"fast-forwarded {moved}")
            else:  # git refused (an untracked file would be overwritten): nothing changed
                refusal = f"fast-forward refused: {summarise(refused)}"
                seen = replace(seen, state=SyncState.DIRTY, message=refusal)
        status = self._status(seen, fetch_error, fetched_at, previous, updated)
        self.status = status
        keys = self.store.keys
        await self.store.save_report(keys.git_sync(self.host), status, index=keys.git_sync_index)
        await self._announce(previous, status, old_sha if updated else None)
        return status

    def _status(
        self,
        seen: Inspection,
        fetch_error: tuple[SyncState, str] | None,
        fetched_at: float | None,
        previous: SyncStatus | None,
        updated: bool,
    ) -> SyncStatus:
        now = time.time()
        state, message = seen.state, seen.message
        error = last_error_at = None
        if seen.state is SyncState.ERROR:  # a broken checkout explains a failed fetch too
            error, last_error_at = seen.message, now
        elif fetch_error is not None:
            state, error = fetch_error
            message, last_error_at = f"fetch failed: {error}", now
        elif previous is not None:
            error, last_error_at = previous.last_error, previous.last_error_at
        return SyncStatus(
            host=self.host,
            repo_dir=str(self.repo_dir),
            remote=self.settings.git_remote,
            branch=seen.branch,
            state=SyncState.UPDATED if updated else state,
            message=message,
            local_sha=seen.local_sha,
            remote_sha=seen.remote_sha,
            ahead=seen.ahead,
            behind=seen.behind,
            checked_at=now,
            last_fetch_at=fetched_at,
            last_error=error,
            last_error_at=last_error_at,
            last_update_at=now if updated else (previous.last_update_at if previous else None),
            fetches=self._fetches,
            next_check_s=self.next_pause_s() + self.settings.git_timeout_s,
        )

    async def _announce(
        self, previous: SyncStatus | None, status: SyncStatus, old_sha: str | None
    ) -> None:
        """``sync.updated`` after a fast-forward; ``sync.<state>`` when the state changed."""
        if status.state is SyncState.UPDATED:
            log.info("checkout_updated", old_sha=old_sha, new_sha=status.local_sha)
            await self._publish("updated", status, old_sha)
            return
        before = (previous.state, previous.local_sha, previous.last_error) if previous else None
        after = (status.state, status.local_sha, status.last_error)
        if before == after:
            return
        if status.state.is_problem:
            log.warning("sync_" + status.state.value, message=status.message)
        else:
            log.info("sync_" + status.state.value, message=status.message)
        await self._publish(status.state.value, status, None)

    async def _publish(self, event: str, status: SyncStatus, old_sha: str | None) -> None:
        try:
            await self.broker.publish_sync_event(
                SyncEvent(
                    host=self.host,
                    event=event,
                    state=status.state,
                    old_sha=old_sha,
                    new_sha=status.local_sha,
                    message=status.message,
                    ts=status.checked_at,
                )
            )
        except BrokerError as e:  # news only: the status in Redis is already written
            log.warning("sync_event_not_published", error=str(e))
