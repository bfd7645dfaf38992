"""Alerts: conditions a person should look at, raised and resolved from pass to pass.

An alert is identified by ``(kind, subject)``. It fires (a ``health.alert.<kind>`` event, a line
in ``<ns>:alerts``) when its condition first holds, and resolves (the same event with
``resolved: true``) when it no longer does. While any but a warning (``WARNING_KINDS``) is active
the monitor is unhealthy (``/healthz`` answers 503 and lists their messages).

Conditions (Flower and the RabbitMQ management UI show the same facts; these are the ones that
need a person):
- ``worker_offline`` / ``service_offline``: its heartbeat expired without a clean stop (a clean
  stop, ``tradectl worker stop`` or SIGTERM, records ``stopped`` and raises nothing).
- ``queue_without_consumer``: a work queue holds messages and nothing will consume them: no
  consumer on ``submit`` (scheduler down) or ``artifacts`` (artifact-sync down), and for ``gpu``
  and ``cpu`` no live worker serving that lane (a busy worker pauses its consumer on purpose, so
  the consumer count alone would cry wolf).
- ``sync_failed``: git-sync reports a problem state, or an artifact sync ended ``failed``.
- ``dead_letters_growing``: the dead-letter queue holds more messages than when it was last
  quiet; resolved once it is back to that level (requeued or purged; two low readings in a row,
  since listing dead letters takes them out for a moment).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from services.health_monitor.snapshot import HealthSnapshot
from shared.artifacts import ArtifactState
from shared.constants import ROUTE_CPU, ROUTE_GPU
from shared.health import HealthAlert, ServiceState

Key = tuple[str, str]
#: Alerts that are news, not ill health: a bad message is the sender's problem, so it does not
#: turn ``/healthz`` to 503 (the dashboard and ``/api/alerts`` still show it).
WARNING_KINDS = frozenset({"dead_letters_growing"})
LIVE = (ServiceState.ONLINE, ServiceState.BUSY)


class AlertTracker:
    """Remembers active alerts between passes and reports what changed."""

    def __init__(self, own: tuple[str, str] | None = None) -> None:
        self.active: dict[Key, HealthAlert] = {}
        #: ``(kind, name)`` of the monitor itself: never reported offline by itself (its first
        #: pass after a restart can run before its own heartbeat is written).
        self._own = own
        #: Dead letters when the queue was last quiet (None until the first pass).
        self._dead_baseline: int | None = None
        self._dead_last: int | None = None

    def update(self, snapshot: HealthSnapshot) -> list[HealthAlert]:
        """Compare ``snapshot`` with the active alerts; return those fired and resolved now."""
        now = snapshot.ts
        holding = dict(self._conditions(snapshot))
        changes: list[HealthAlert] = []
        for key, message in holding.items():
            current = self.active.get(key)
            if current is None or current.message != message:
                alert = HealthAlert(kind=key[0], subject=key[1], message=message, ts=now)
                self.active[key] = alert
                if current is None or key[0] == "dead_letters_growing":
                    changes.append(alert)
        for key in [k for k in self.active if k not in holding]:
            gone = self.active.pop(key)
            message = f"resolved: {gone.kind} {gone.subject} (was: {gone.message})"
            changes.append(
                gone.model_copy(update={"resolved": True, "ts": now, "message": message})
            )
        return changes

    def restore(self, alerts: Iterable[HealthAlert]) -> None:
        """Take the alerts that held when an earlier monitor stopped.

        So a restart neither fires them again nor forgets to resolve them.
        """
        for alert in alerts:
            if not alert.resolved:
                self.active[(alert.kind, alert.subject)] = alert

    @property
    def problems(self) -> list[str]:
        """Messages of the active alerts that make the desktop unhealthy, oldest first."""
        current = sorted(self.active.values(), key=lambda a: a.ts)
        return [a.message for a in current if a.kind not in WARNING_KINDS]

    def _conditions(self, snapshot: HealthSnapshot) -> Iterator[tuple[Key, str]]:
        yield from self._offline(snapshot)
        yield from self._unconsumed(snapshot)
        yield from self._sync(snapshot)
        yield from self._dead_letters(snapshot)

    def _offline(self, snapshot: HealthSnapshot) -> Iterator[tuple[Key, str]]:
        for service in snapshot.services:
            beat = service.heartbeat
            if service.state is not ServiceState.OFFLINE or beat.stopped:
                continue
            if (beat.kind, beat.name) == self._own:
                continue
            kind = "worker_offline" if beat.worker is not None else "service_offline"
            yield (
                (kind, f"{beat.kind}:{beat.name}"),
                (
                    f"{beat.kind} {beat.name} on {beat.host} is offline: no heartbeat for "
                    f"{service.age_s:.0f} s (pid {beat.pid})"
                ),
            )

    @staticmethod
    def _unconsumed(snapshot: HealthSnapshot) -> Iterator[tuple[Key, str]]:
        serving = {
            lane
            for s in snapshot.services
            if s.heartbeat.worker is not None and s.state in LIVE
            for lane, slots in s.heartbeat.worker.slots.items()
            if slots > 0
        }
        for queue in snapshot.queues:
            if queue.route == "dead" or queue.messages == 0 or queue.consumers > 0:
                continue
            if queue.route in (ROUTE_GPU, ROUTE_CPU) and queue.route in serving:
                continue  # its workers are busy and paused their consumer on purpose
            yield (
                ("queue_without_consumer", queue.name),
                (f"queue {queue.name} holds {queue.messages} message(s) and has no consumer"),
            )

    @staticmethod
    def _sync(snapshot: HealthSnapshot) -> Iterator[tuple[Key, str]]:
        for git in snapshot.sync.git:
            if git.state.is_problem:
                yield (
                    ("sync_failed", f"git:{git.host}"),
                    (
                        f"git-sync on {git.host} is {git.state.value}: "
                        f"{git.message or git.last_error}"
                    ),
                )
        for artifact in snapshot.sync.artifacts:
            if artifact.state is ArtifactState.FAILED:
                yield (
                    ("sync_failed", f"artifacts:{artifact.task_id}"),
                    (f"artifact sync of task {artifact.task_id} failed: {artifact.error}"),
                )

    def _dead_letters(self, snapshot: HealthSnapshot) -> Iterator[tuple[Key, str]]:
        dead = next((q for q in snapshot.queues if q.route == "dead"), None)
        if dead is None:
            return
        # The higher of the last two readings: ``tradectl queue dead`` takes the messages out
        # for a moment while it lists them, and one low reading must not resolve (or re-fire).
        level = max(dead.messages, self._dead_last if self._dead_last is not None else 0)
        self._dead_last = dead.messages
        if self._dead_baseline is None or level < self._dead_baseline:
            self._dead_baseline = level
        if level == self._dead_baseline:
            return
        grown = level - self._dead_baseline
        yield (
            ("dead_letters_growing", dead.name),
            (
                f"dead-letter queue {dead.name} grew by {grown} to {level} message(s) "
                "(tradectl queue dead)"
            ),
        )
