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
        ``<ns>:state:<state>``      sorted set of task ids in that state, scored by when they
                                    entered it (kept by the store's scripts)
        ``<ns>:task:<id>:logs``     stream of the task's output and log lines (bounded)
        ``<ns>:service:<kind>:<name>``  a service's heartbeat (JSON, with a TTL); workers are
                                    kind ``gpu-worker``
        ``<ns>:services``           hash ``<kind>:<name>`` -> last heartbeat (JSON), so a service
                                    whose key expired is still known and shown ``offline``
        ``<ns>:alerts``             list of recent health alerts (JSON, newest first, capped)
        ``<ns>:alerts:active``      hash ``<kind>|<subject>`` -> the alert holding now (JSON)
        ``<ns>:gitsync:<host>``     git-sync's last report for one desktop's checkout (JSON)
        ``<ns>:gitsync-hosts``      set of those keys
        ``<ns>:artifacts:<id>``     a task's artifact sync state (JSON)
        ``<ns>:task:<id>:children`` set of the ids of tasks that depend on this one
        ``<ns>:held``               sorted set of ``submitted`` tasks the scheduler holds (parents
                                    not completed, start time not reached), scored by when to
                                    look at each again (Unix s, Redis clock)
        ``<ns>:schedules``          set of schedule names
        ``<ns>:schedule:<name>``    hash: a recurring submission (spec JSON, paused, next due,
                                    last fired occurrence and task)
        ``<ns>:schedule:<name>:runs``  list of the schedule's recent firings (JSON, newest first)
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

    @property
    def state_prefix(self) -> str:
        """Prefix of the per-state sorted sets: append a state's value."""
        return f"{self.namespace}:state:"

    def state_index(self, state: str) -> str:
        """Sorted set of the ids of tasks in ``state``, scored by when they entered it (Unix s)."""
        return f"{self.state_prefix}{state}"

    def task_logs(self, task_id: str) -> str:
        """Stream of a task's output and log lines (``XADD ... MAXLEN ~``)."""
        return f"{self.namespace}:task:{task_id}:logs"

    def service(self, kind: str, name: str) -> str:
        """A service's heartbeat key (JSON, expires when the service stops renewing it)."""
        return f"{self.namespace}:service:{kind}:{name}"

    def worker(self, name: str) -> str:
        """A gpu-worker's heartbeat key (see ``service``)."""
        return self.service("gpu-worker", name)

    @property
    def services(self) -> str:
        """Hash of every service seen: ``<kind>:<name>`` -> its last heartbeat (JSON)."""
        return f"{self.namespace}:services"

    @property
    def alerts_active(self) -> str:
        """Hash of the alerts that hold now: ``<kind>|<subject>`` -> JSON ``HealthAlert``.

        A restarted monitor reads it, so it neither repeats nor forgets them.
        """
        return f"{self.namespace}:alerts:active"

    @property
    def alerts(self) -> str:
        """List of recent health alerts, newest first (JSON ``HealthAlert``)."""
        return f"{self.namespace}:alerts"

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

    def children(self, task_id: str) -> str:
        """Set of the ids of tasks that wait for ``task_id`` (``depends_on``)."""
        return f"{self.namespace}:task:{task_id}:children"

    @property
    def held(self) -> str:
        """Sorted set of held ``submitted`` tasks, scored by when to check each again (Unix s)."""
        return f"{self.namespace}:held"

    @property
    def schedules(self) -> str:
        """Set of the names of every recurring schedule."""
        return f"{self.namespace}:schedules"

    def schedule(self, name: str) -> str:
        """Hash holding one schedule (spec, paused, next due, last firing)."""
        return f"{self.namespace}:schedule:{name}"

    def schedule_runs(self, name: str) -> str:
        """List of a schedule's recent firings (JSON ``{occurrence, task_id, fired_at}``)."""
        return f"{self.namespace}:schedule:{name}:runs"

    @property
    def pattern(self) -> str:
        """Glob matching every key of this namespace (tests use it to clean up)."""
        return f"{self.namespace}:*"
