"""Commit pinning: a task runs only on code that contains the commit it was submitted from.

For a task pinned to commit ``Y`` on a worker whose loaded code is at ``X``:

* ``X`` contains ``Y`` (``Y`` is ``X`` or an ancestor): run it; the result records ``X``;
* otherwise hold it back (``StatusStore.defer``, no attempt counted) and ask git-sync to fetch
  now; when the checkout moves to a commit containing ``Y`` the worker restarts on it between
  tasks (``CodeWatcher``) and the redelivered task then runs;
* once it has waited ``TP_COMMIT_WAIT_S``: fail it with
  "desktop code at X does not contain commit Y; push it".
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum

import structlog

from services.gpu_worker.execution import WorkerEnv
from shared.errors import BrokerError, StoreError
from shared.gitinfo import contains, head_commit
from shared.gitsync import SyncRequest, SyncStatus
from shared.messages import TaskSubmission
from shared.periodic import Periodic

log = structlog.get_logger(__name__)

#: How often a held-back task is offered again while its commit is missing (s).
COMMIT_POLL_S = 5.0
#: ... and while the worker is about to restart on code that has it (s).
RESTART_POLL_S = 1.0
#: At most one ``sync.now`` per worker this often (s), however many commits are missing: git-sync
#: must not be flooded.
SYNC_REQUEST_EVERY_S = 30.0
#: Commits remembered as contained in the loaded code (saves a ``git merge-base`` per task).
CONTAINED_CACHE_SIZE = 4096
#: How often the worker looks for a new commit in its checkout (s); a local ``rev-parse``.
CODE_CHECK_INTERVAL_S = 2.0


class Gate(StrEnum):
    """What to do with a delivered task."""

    RUN = "run"
    DEFER = "defer"
    FAIL = "fail"


@dataclass(frozen=True)
class GateVerdict:
    """The gate's answer.

    ``action``; for ``defer`` how long (s) and why; ``failure`` is the message to fail with once
    the wait is over (or at once for ``fail``).
    """

    action: Gate
    delay_s: float = 0.0
    waiting: str = ""
    failure: str = ""


def short(sha: str | None) -> str:
    """The 12-character form of a SHA for messages (``unknown`` for None)."""
    return sha[:12] if sha else "unknown"


class CommitGate:
    """Decides whether this worker may run a task now, given the commit it is pinned to."""

    def __init__(self, env: WorkerEnv) -> None:
        self.env = env
        self._last_request = -SYNC_REQUEST_EVERY_S
        #: Commits known to be in the loaded code (which never changes within a process).
        self._contained: set[str] = set()

    async def check(self, submission: TaskSubmission) -> GateVerdict:
        """The verdict for ``submission`` on this worker's loaded code."""
        wanted, loaded = submission.git_commit, self.env.code_commit
        if not wanted:
            return GateVerdict(Gate.RUN)
        checkout = self.env.settings.checkout_dir
        if loaded is None:
            return GateVerdict(
                Gate.FAIL,
                failure=f"desktop code at {checkout} is not a git checkout; cannot run commit "
                f"{short(wanted)}",
            )
        if wanted in self._contained:
            return GateVerdict(Gate.RUN)
        if await asyncio.to_thread(contains, checkout, loaded, wanted):
            if len(self._contained) < CONTAINED_CACHE_SIZE:
                self._contained.add(wanted)
            return GateVerdict(Gate.RUN)
        return await self._hold(wanted, loaded)

    async def _hold(self, wanted: str, loaded: str) -> GateVerdict:
        """The verdict for a commit the loaded code lacks: wait for a restart or for a sync."""
        checkout = self.env.settings.checkout_dir
        failure = (
            f"desktop code at {short(loaded)} does not contain commit {short(wanted)}; push it"
        )
        head = await asyncio.to_thread(head_commit, checkout)
        if head and head != loaded and await asyncio.to_thread(contains, checkout, head, wanted):
            if self.env.settings.worker_code_update == "ignore":
                stuck = (
                    f"the desktop checkout has commit {short(wanted)} but this worker runs "
                    f"{short(loaded)} and does not restart on new code "
                    "(TP_WORKER_CODE_UPDATE=ignore); restart the worker"
                )
                return GateVerdict(Gate.DEFER, COMMIT_POLL_S, stuck, stuck)
            return GateVerdict(
                Gate.DEFER,
                RESTART_POLL_S,
                f"worker restarting on {short(head)}, which contains commit {short(wanted)}",
                failure,
            )
        await self._request_sync()
        waiting = f"waiting for commit {short(wanted)} to reach the desktop (at {short(loaded)})"
        blocked = await self._checkout_problem()
        if blocked is not None:
            waiting = f"{waiting}; {blocked}"
            failure = f"{failure}. But {blocked}"
        return GateVerdict(Gate.DEFER, COMMIT_POLL_S, waiting, failure)

    async def _checkout_problem(self) -> str | None:
        """Why git-sync cannot bring new commits to this desktop, if its last report says so."""
        key = self.env.store.keys.git_sync(self.env.name)
        try:
            reports = await self.env.store.load_reports(SyncStatus, keys=[key])
        except StoreError:
            return None
        if not reports:
            return f"no git-sync report from {self.env.name}: is git-sync running here?"
        status = reports[0]
        if status.state.is_problem:
            return (
                f"the desktop checkout is {status.state.value} ({status.message}); git-sync "
                "cannot update it until that is fixed on the desktop"
            )
        return None

    async def _request_sync(self) -> None:
        """Ask git-sync to fetch now, at most once per ``SYNC_REQUEST_EVERY_S`` per worker."""
        now = time.monotonic()
        if now - self._last_request < SYNC_REQUEST_EVERY_S:
            return
        self._last_request = now
        try:
            await self.env.broker.request_sync(
                SyncRequest(requested_by=f"worker:{self.env.name}", ts=time.time())
            )
        except BrokerError as e:
            log.warning("sync_request_failed", error=str(e))


class CodeWatcher:
    """Notices a new commit in the worker's checkout and calls ``on_new_commit(sha)`` once.

    Args:
        env: the worker's settings (``checkout_dir``) and its loaded ``code_commit``.
        on_new_commit: called with the checkout's new ``HEAD``.
    """

    def __init__(self, env: WorkerEnv, on_new_commit: Callable[[str], Awaitable[None]]) -> None:
        self.env = env
        self._on_new_commit = on_new_commit
        self._noticed = False
        self._periodic = Periodic("code_watch", CODE_CHECK_INTERVAL_S, self.check)

    def start(self) -> None:
        self._periodic.start()

    async def stop(self) -> None:
        await self._periodic.stop()

    async def check(self) -> None:
        """One look at ``HEAD``; a first difference from the loaded commit is reported."""
        if self._noticed or self.env.code_commit is None:
            return
        head = await asyncio.to_thread(head_commit, self.env.settings.checkout_dir)
        if head is not None and head != self.env.code_commit:
            self._noticed = True
            await self._on_new_commit(head)
