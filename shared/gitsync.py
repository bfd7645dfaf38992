"""git-sync's wire models: the status it keeps in Redis, its events, and on-demand requests.

States (``SyncState``): the checkout is ``up_to_date`` with its upstream, or was just ``updated``
(fast-forwarded); ``ahead`` has local commits the remote lacks. The rest are problems git-sync
reports and never "fixes": ``dirty`` (tracked files changed locally while upstream moved, or at
all), ``diverged`` (both sides have commits), ``detached`` (no branch checked out),
``off_branch`` (another branch than the tracked one), ``upstream_missing`` (the remote has no such
branch), ``auth_failed`` (the remote wants credentials it did not get), ``unreachable`` (the fetch
failed or timed out), ``error`` (not a git checkout, git itself failing).
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from shared.messages import WireModel

#: Slack for clock differences between laptop and desktop when judging a report stale (s).
STALE_SKEW_S = 30.0
#: Git object names: abbreviated (7+) or full SHA-1 / SHA-256.
SHA_PATTERN = r"^[0-9a-f]{7,64}$"


class SyncState(StrEnum):
    """Where a desktop checkout stands against its upstream (see the module docstring)."""

    UP_TO_DATE = "up_to_date"
    UPDATED = "updated"
    AHEAD = "ahead"
    DIRTY = "dirty"
    DIVERGED = "diverged"
    DETACHED = "detached"
    OFF_BRANCH = "off_branch"
    UPSTREAM_MISSING = "upstream_missing"
    AUTH_FAILED = "auth_failed"
    UNREACHABLE = "unreachable"
    ERROR = "error"

    @property
    def is_problem(self) -> bool:
        """True for states that need a person (the checkout is not following its upstream)."""
        return self not in (SyncState.UP_TO_DATE, SyncState.UPDATED, SyncState.AHEAD)


class SyncStatus(WireModel):
    """git-sync's report for one desktop checkout, stored as JSON at ``Keys.git_sync(host)``.

    Times are Unix seconds on the desktop's clock.
    """

    host: str
    repo_dir: str
    remote: str
    branch: str | None = None
    state: SyncState
    message: str = ""
    local_sha: str | None = Field(None, pattern=SHA_PATTERN)
    remote_sha: str | None = Field(None, pattern=SHA_PATTERN)
    ahead: int = Field(0, ge=0, description="Local commits the remote branch lacks.")
    behind: int = Field(0, ge=0, description="Remote commits the local branch lacks.")
    checked_at: float = Field(description="End of the last check (fetch and inspection).")
    last_fetch_at: float | None = Field(None, description="End of the last successful fetch.")
    last_error: str | None = None
    last_error_at: float | None = None
    last_update_at: float | None = Field(None, description="Last fast-forward.")
    fetches: int = Field(0, ge=0, description="Fetches started since the service started.")
    next_check_s: float = Field(
        0.0, ge=0, description="The next report is due within this long after checked_at (s)."
    )

    def is_stale(self, now: float, skew_s: float = STALE_SKEW_S) -> bool:
        """True when the next report is overdue: git-sync on that desktop is not running."""
        return now > self.checked_at + self.next_check_s + skew_s


class SyncEvent(WireModel):
    """``sync.<event>`` on the events exchange: ``updated`` (old and new SHA) or a new state."""

    host: str
    event: str = Field(pattern=r"^[a-z_]{1,40}$")
    state: SyncState
    old_sha: str | None = Field(None, pattern=SHA_PATTERN)
    new_sha: str | None = Field(None, pattern=SHA_PATTERN)
    message: str = ""
    ts: float

    @property
    def routing_key(self) -> str:
        """``sync.updated``, ``sync.dirty``...: followers bind ``sync.#``."""
        return f"sync.{self.event}"


class SyncRequest(WireModel):
    """``sync.now`` on the control exchange: git-sync fetches at once instead of at its interval.

    ``host`` None asks every desktop.
    """

    host: str | None = None
    requested_by: str = Field("", max_length=200)
    ts: float
