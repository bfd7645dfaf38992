"""The client's view of the desktop: workers, queues, dead letters, git-sync and artifact-sync.

A part of ``DistributedClient`` (``tradectl worker|queue|sync|artifacts ...``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import structlog

from shared.artifacts import ArtifactRequest, ArtifactStatus
from shared.broker import Broker
from shared.errors import TaskNotFoundError
from shared.gitsync import SyncRequest, SyncStatus
from shared.health import WORKER_KIND, ServiceState, ServiceStatus, load_services
from shared.messages import DrainRequest
from shared.queues import (
    DeadLetter,
    DeadLetterList,
    QueueReport,
    Requeued,
    drop_dead_letter,
    peek_dead_letters,
    queue_report,
    requeue_dead_letter,
)
from shared.settings import Settings
from shared.store import StatusStore

log = structlog.get_logger(__name__)

#: ``sync_now`` with no git-sync report at all waits this long for a first one (s).
NO_REPORT_WAIT_S = 10.0


class DesktopOps:
    """Workers, queues, dead letters, git-sync and artifact sync; see ``DistributedClient``."""

    settings: Settings
    store: StatusStore
    broker: Broker

    async def artifact_status(self, task_id: str | None = None) -> list[ArtifactStatus]:
        """Artifact sync state of one task (id or unique prefix), or of every task, newest first.

        Raises:
            StoreError: Redis failed.
        """
        keys = self.store.keys
        if task_id is None:
            found = await self.store.load_reports(ArtifactStatus, pattern=keys.artifacts_pattern)
        else:
            # The sync state can outlive (or predate) the task's record.
            with contextlib.suppress(TaskNotFoundError):
                task_id = await self.store.resolve_id(task_id)
            found = await self.store.load_reports(ArtifactStatus, keys=[keys.artifacts(task_id)])
        return sorted(found, key=lambda st: st.updated_at, reverse=True)

    async def request_artifact_sync(self, task_id: str) -> str:
        """Queue a (re)sync of a finished task's artifacts; returns the full task id."""
        task_id = await self.store.resolve_id(task_id)
        record = await self.store.get(task_id)
        await self.broker.publish_artifact_request(
            ArtifactRequest(
                task_id=task_id, reason="requested", final=record.state.is_terminal, ts=time.time()
            )
        )
        return task_id

    async def sync_status(self) -> list[SyncStatus]:
        """git-sync's last report from every desktop, by host name.

        Raises:
            StoreError: Redis failed.
        """
        index = self.store.keys.git_sync_index
        found = await self.store.load_reports(SyncStatus, index=index)
        return sorted(found, key=lambda st: st.host)

    async def sync_now(self, *, host: str | None = None, wait_s: float = 90.0) -> list[SyncStatus]:
        """Ask git-sync to fetch now and wait for the report(s) of that pass.

        Args:
            host: one desktop, or None for all.
            wait_s: how long to wait for fresh reports (s).

        Returns:
            Every report of the asked host(s); one that did not refresh within ``wait_s`` is
            returned as it was (compare ``checked_at``). Reports already stale (that desktop's
            git-sync is not running) are not waited for.
        """
        # Fresh = checked after the request; judged by each desktop's own clock (its previous
        # report's time), so laptop/desktop clock skew cannot fool it.
        known = [r for r in await self.sync_status() if host in (None, r.host)]
        before = {r.host: r.checked_at for r in known}
        live = {r.host for r in known if not r.is_stale(time.time())}
        await self.broker.request_sync(
            SyncRequest(host=host, requested_by=f"client:{socket.gethostname()}", ts=time.time())
        )
        # With no report at all there may be no git-sync: wait a little, not the whole time.
        deadline = time.monotonic() + (wait_s if live else min(wait_s, NO_REPORT_WAIT_S))
        while True:
            reports = [r for r in await self.sync_status() if host in (None, r.host)]
            # Stale hosts are not waited for; a host with no earlier report counts once it has one.
            waiting = [
                r for r in reports if r.host in live and r.checked_at <= before.get(r.host, 0.0)
            ]
            if (reports and not waiting) or time.monotonic() > deadline:
                return reports
            await asyncio.sleep(0.2)

    # Workers and queues (``tradectl worker ...``, ``tradectl queue ...``).

    async def workers(self) -> list[ServiceStatus]:
        """Every known gpu-worker, by name, with the state its heartbeat implies.

        ``online``, ``busy`` (every slot taken), ``draining`` or ``offline`` (heartbeat expired;
        listed for a day). Each carries the last heartbeat: host, pid, version, commit, slots,
        running tasks, GPUs.

        Raises:
            StoreError: Redis failed.
        """
        return await load_services(self.store, kind=WORKER_KIND)

    async def drain_workers(self, name: str | None = None) -> list[ServiceStatus]:
        """Ask worker ``name`` (None: every worker) to drain and exit, as SIGTERM does.

        Each one stops consuming, lets its running tasks finish within ``TP_DRAIN_TIMEOUT_S``,
        else hands them back to the queue, then exits 0. The request is published only when a
        worker it is meant for is alive (heartbeat not expired).

        Returns:
            The live workers the request went to (empty: nothing was published).

        Raises:
            StoreError: Redis failed.
            BrokerError: the request was not confirmed.
        """
        targets = [
            w
            for w in await self.workers()
            if w.state is not ServiceState.OFFLINE and name in (None, w.heartbeat.name)
        ]
        if targets:
            by = f"client:{socket.gethostname()}"
            await self.broker.publish_drain(
                DrainRequest(worker=name, requested_by=by, ts=time.time())
            )
        return targets

    async def wait_workers_stopped(
        self, workers: list[ServiceStatus], *, timeout_s: float, poll_s: float = 0.2
    ) -> list[ServiceStatus]:
        """Wait until each of ``workers`` has stopped: its heartbeat removed or expired.

        A worker is told apart from a later process of the same name (a supervisor restarting
        it) by its pid and start time.

        Args:
            workers: statuses as ``workers`` or ``drain_workers`` returned them.
            timeout_s: how long to wait (s).
            poll_s: pause between two reads of the heartbeats (s).

        Returns:
            Those still alive when the time ran out, as last read (empty: all stopped).

        Raises:
            StoreError: Redis failed.
        """
        wanted = {_process_key(w) for w in workers}
        deadline = time.monotonic() + timeout_s
        while True:
            alive = [
                w
                for w in await self.workers()
                if w.state is not ServiceState.OFFLINE and _process_key(w) in wanted
            ]
            if not alive or time.monotonic() >= deadline:
                return alive
            await asyncio.sleep(poll_s)

    async def queue_status(self) -> QueueReport:
        """Depth and consumers per queue (as RabbitMQ counts them), queued tasks per priority.

        Raises:
            BrokerError: RabbitMQ failed.
            StoreError: Redis failed.
        """
        return await queue_report(self.broker, self.store)

    async def dead_letters(self, limit: int = 100) -> DeadLetterList:
        """The first ``limit`` dead letters with their reasons; every one stays in the queue.

        Raises:
            BrokerError: RabbitMQ failed.
        """
        return await peek_dead_letters(self.broker, limit)

    async def requeue_dead_letter(self, letter_id: str) -> Requeued:
        """Put one dead letter (by id, message id or task id) back into its source queue.

        Raises:
            DeadLetterNotFoundError: no dead letter has that id.
            BrokerError: RabbitMQ failed (the dead letter stays where it was).
        """
        return await requeue_dead_letter(self.broker, letter_id)

    async def drop_dead_letter(self, letter_id: str) -> DeadLetter:
        """Delete one dead letter (by id, message id or task id) for good.

        Raises:
            DeadLetterNotFoundError: no dead letter has that id.
            BrokerError: RabbitMQ failed (the dead letter stays where it was).
        """
        return await drop_dead_letter(self.broker, letter_id)


def _process_key(worker: ServiceStatus) -> tuple[str, int, float]:
    """One worker process: its name, pid and start time (a restart gets a new one)."""
    beat = worker.heartbeat
    return beat.name, beat.pid, beat.started_at
