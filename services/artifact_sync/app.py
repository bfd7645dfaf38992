"""artifact-sync wiring: consume ``<ns>.artifacts``, sync with retries, report state and events.

Ack policy: a request is acked once its outcome is recorded (``synced``, or ``failed`` after
``TP_ARTIFACT_MAX_ATTEMPTS`` tries with doubling back-off); a Redis or broker outage nacks it back
(``handle_delivery``). While the service is down requests wait in the durable queue. Syncs of one
task are serialised; different tasks sync concurrently (prefetch ``SYNC_PREFETCH``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict

import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from shared.artifacts import ArtifactEvent, ArtifactRequest, ArtifactState, ArtifactStatus
from shared.broker import Broker
from shared.constants import FINISHED_TASK_TTL_S, ROUTE_ARTIFACTS
from shared.consuming import handle_delivery, settle
from shared.errors import BrokerError, DecodeError, StoreError
from shared.gitinfo import head_commit
from shared.health import Beacon
from shared.messages import decode
from shared.settings import Settings
from shared.storage import Storage, StorageError, open_storage, safe_task_id
from shared.storage.base import Opener, open_binary
from shared.storage.naming import UnsafeNameError
from shared.storage.sync import Progress, status_of, sync_task
from shared.store import StatusStore

log = structlog.get_logger(__name__)

#: Tasks synced at once by one service (each also bounded by ``TP_ARTIFACT_CONCURRENCY``).
SYNC_PREFETCH = 4
#: How often a running sync's bytes done are written to Redis (s).
PROGRESS_WRITE_S = 0.5


class ArtifactSync:
    """The artifact-sync service."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = StatusStore(settings)
        self.broker = Broker(settings, name="artifact-sync")
        self.storage: Storage = open_storage(settings)
        self._channel: AbstractChannel | None = None
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        #: Tests replace it to inject read failures.
        self.opener: Opener = open_binary
        self.beacon = Beacon(
            settings,
            self.store,
            self.broker,
            kind="artifact-sync",
            code_commit=head_commit(settings.checkout_dir),
        )

    async def start(self) -> None:
        await self.store.start()
        await self.broker.start()
        await self.storage.__aenter__()
        self._channel = await self.broker.consumer_channel(SYNC_PREFETCH)
        queue = await self._channel.get_queue(self.broker.topology.queue(ROUTE_ARTIFACTS))
        await queue.consume(self.on_message)
        self.beacon.start()
        log.info("artifact_sync_ready", backend=self.storage.kind)

    async def stop(self) -> None:
        await self.beacon.stop()
        await self.broker.close_channel(self._channel)
        self._channel = None
        await self.storage.__aexit__(None, None, None)
        await self.broker.stop()
        await self.store.stop()

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        await handle_delivery(
            message,
            self._handle,
            broker=self.broker,
            source_queue=self.broker.topology.queue(ROUTE_ARTIFACTS),
        )

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        queue = self.broker.topology.queue(ROUTE_ARTIFACTS)
        try:
            request = decode(
                message.body, ArtifactRequest, max_bytes=self.settings.max_message_bytes
            )
            safe_task_id(request.task_id)
        except (DecodeError, UnsafeNameError) as e:
            await self.broker.dead_letter(message, str(e), source_queue=queue)
            await settle(message)
            return
        structlog.contextvars.bind_contextvars(task_id=request.task_id)
        try:
            await self.sync(request)
        finally:
            structlog.contextvars.unbind_contextvars("task_id")
        await settle(message)

    async def sync(self, request: ArtifactRequest) -> ArtifactStatus:
        """Sync one task, retrying with back-off; returns the final ``synced``/``failed`` status.

        Raises:
            StoreError: Redis failed (the caller hands the request back to the queue).
        """
        async with self._locks[request.task_id]:
            return await self._sync_with_retries(request)

    async def _sync_with_retries(self, request: ArtifactRequest) -> ArtifactStatus:
        s = self.settings
        delay = s.artifact_retry_base_s
        attempt = 0
        while True:
            attempt += 1
            progress = Progress()
            try:
                await self._sync_once(request, progress, attempt)
            except StoreError:
                raise
            except Exception as e:  # storage, disk, or a bug: recorded, never a silent stop
                error = str(e) if isinstance(e, (StorageError, OSError)) else repr(e)
                final = attempt >= s.artifact_max_attempts or not isinstance(e, StorageError)
                if final or isinstance(e, FileNotFoundError):
                    log.error("artifact_sync_failed", attempts=attempt, error=error)
                    failed = status_of(
                        request,
                        self.storage,
                        ArtifactState.FAILED,
                        progress,
                        attempts=attempt,
                        error=error,
                    )
                    return await self._record(failed)
                log.info("artifact_sync_retry", attempt=attempt, error=error, retry_in_s=delay)
                await asyncio.sleep(delay)
                delay *= 2
            else:
                status = status_of(
                    request, self.storage, ArtifactState.SYNCED, progress, attempts=attempt
                )
                log.info("artifacts_synced", uploaded=progress.uploaded, skipped=progress.skipped)
                return await self._record(status)

    async def _sync_once(self, request: ArtifactRequest, progress: Progress, attempt: int) -> None:
        task_dir = self.settings.tasks_dir / request.task_id

        def now(state: ArtifactState) -> ArtifactStatus:
            return status_of(request, self.storage, state, progress, attempts=attempt)

        await self._record(now(ArtifactState.SYNCING))
        job = asyncio.create_task(
            sync_task(self.storage, request, task_dir, progress, opener=self.opener)
        )
        try:
            while not job.done():
                await asyncio.wait({job}, timeout=PROGRESS_WRITE_S)
                if not job.done():
                    with contextlib.suppress(StoreError):  # progress is news; the end is not
                        await self._write(now(ArtifactState.SYNCING))
            await job
        finally:
            job.cancel()  # never left running behind a failure (a lost Redis, a cancel)
            await asyncio.gather(job, return_exceptions=True)

    async def _write(self, status: ArtifactStatus) -> None:
        key = self.store.keys.artifacts(status.task_id)
        await self.store.save_report(key, status, ttl_s=FINISHED_TASK_TTL_S)

    async def _record(self, status: ArtifactStatus) -> ArtifactStatus:
        """Write the status and announce a change of state."""
        await self._write(status)
        try:
            await self.broker.publish_artifact_event(
                ArtifactEvent(
                    task_id=status.task_id,
                    state=status.state,
                    location=status.location,
                    error=status.error,
                    ts=time.time(),
                )
            )
        except BrokerError as e:
            log.warning("artifact_event_not_published", error=str(e))
        return status
