"""The Redis key schema, in one place. Every key starts with the namespace (``TP_NAMESPACE``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    """Builds Redis key names for one namespace.

    Layout:
        ``<ns>:task:<id>``          hash: spec, state, ``<state>_at`` timestamps, attempts, worker,
                                    lease_until, progress, result, error, traceback
        ``<ns>:task:<id>:history``  list of JSON transitions ``{from, to, ts, by}``
        ``<ns>:tasks``              sorted set of task ids by submit time (listing)
        ``<ns>:leases``             sorted set of running task ids by lease expiry (reaper)
        ``<ns>:retries``            sorted set of task ids by retry due time (retry pump)
        ``<ns>:worker:<name>``      a worker's heartbeat (JSON, with a TTL)
        ``<ns>:gitsync:<host>``     git-sync's last report for one desktop's checkout (JSON)
        ``<ns>:gitsync-hosts``      set of those keys
        ``<ns>:artifacts:<id>``     a task's artifact sync state (JSON)
    """

    namespace: str

    def task(self, task_id: str) -> str:
        """Hash holding one task's record."""
        return f"{self.namespace}:task:{task_id}"

    def history(self, task_id: str) -> str:
        """List of the task's state transitions, oldest first."""
        return f"{self.namespace}:task:{task_id}:history"

    @property
    def task_index(self) -> str:
        """Sorted set of all task ids, scored by submit time (Unix s)."""
        return f"{self.namespace}:tasks"

    @property
    def leases(self) -> str:
        """Sorted set of running task ids scored by lease expiry (Unix s, Redis clock)."""
        return f"{self.namespace}:leases"

    @property
    def retries(self) -> str:
        """Sorted set of task ids waiting to be retried, scored by due time (Unix s)."""
        return f"{self.namespace}:retries"

    def worker(self, name: str) -> str:
        """A worker's heartbeat key (JSON, expires when the worker stops renewing it)."""
        return f"{self.namespace}:worker:{name}"

    def git_sync(self, host: str) -> str:
        """git-sync's status for the checkout on ``host`` (JSON ``SyncStatus``)."""
        return f"{self.namespace}:gitsync:{host}"

    def artifacts(self, task_id: str) -> str:
        """A task's artifact sync state (JSON ``ArtifactStatus``)."""
        return f"{self.namespace}:artifacts:{task_id}"

    @property
    def artifacts_pattern(self) -> str:
        """Glob matching every task's artifact sync state."""
        return f"{self.namespace}:artifacts:*"

    @property
    def git_sync_index(self) -> str:
        """Set of every desktop's git-sync status key (read on each submit: no SCAN)."""
        return f"{self.namespace}:gitsync-hosts"

    @property
    def pattern(self) -> str:
        """Glob matching every key of this namespace (tests use it to clean up)."""
        return f"{self.namespace}:*"
