"""One task's sync: scan, hash, skip what is stored unchanged, copy the rest, manifest last.

The task's ``artifacts/`` and ``checkpoints/`` sub-folders are synced to
``<prefix>/<task_id>/artifacts/...`` and ``.../checkpoints/...``. A file is skipped when the
stored manifest lists the same SHA-256 and the stored object has the same size, so a re-sync of an
unchanged folder copies nothing (two requests: read the manifest, list the prefix).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from shared.artifacts import ArtifactRequest, ArtifactState, ArtifactStatus
from shared.storage import Manifest, ManifestEntry, Storage, file_digest, safe_relpath
from shared.storage.base import Opener, StorageError, open_binary
from shared.storage.naming import UnsafeNameError

log = structlog.get_logger(__name__)

#: Sub-folders of a task's folder that are synced.
SYNCED_FOLDERS = ("artifacts", "checkpoints")


@dataclass(frozen=True)
class LocalFile:
    """A file to sync: where it is, and its manifest entry."""

    path: Path
    entry: ManifestEntry


def scan(task_dir: Path) -> list[LocalFile]:
    """Every file under the synced sub-folders, hashed, with normalised relative names.

    A file whose name cannot be stored safely is left out with a warning (it never blocks the
    rest); symbolic links are not followed (a task cannot export files from elsewhere).
    """
    found: list[LocalFile] = []
    for folder in SYNCED_FOLDERS:
        root = task_dir / folder
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*")):
            if path.is_symlink() or not path.is_file():
                continue
            try:
                rel = safe_relpath(path.relative_to(task_dir).as_posix())
            except UnsafeNameError as e:
                log.warning("artifact_name_refused", error=str(e))
                continue
            size, sha256 = file_digest(path)
            found.append(LocalFile(path, ManifestEntry(path=rel, size=size, sha256=sha256)))
    return found


@dataclass
class Progress:
    """Counters of one sync, read by the status writer while it runs."""

    bytes_total: int = 0
    bytes_done: int = 0
    uploaded: int = 0
    skipped: int = 0
    files: int = 0
    errors: list[str] = field(default_factory=list)

    def add(self, n: int) -> None:
        """Count ``n`` more bytes done."""
        self.bytes_done += n


async def sync_task(
    storage: Storage,
    request: ArtifactRequest,
    task_dir: Path,
    progress: Progress,
    *,
    opener: Opener = open_binary,
) -> Manifest:
    """Copy the task folder's new and changed files to ``storage``, then write the manifest.

    Raises:
        StorageError: a copy failed or did not verify (nothing partial is left stored), or the
            task folder does not exist.
    """
    if not await asyncio.to_thread(task_dir.is_dir):
        raise StorageError(f"no task folder at {task_dir}")
    await storage.remove_partial(request.task_id)
    local = await asyncio.to_thread(scan, task_dir)
    progress.files = len(local)
    progress.bytes_total = sum(f.entry.size for f in local)
    previous = await storage.read_manifest(request.task_id)
    stored = await storage.sizes(request.task_id)
    known = previous.by_path() if previous else {}
    todo = []
    for f in local:
        old = known.get(f.entry.path)
        same = old is not None and old.sha256 == f.entry.sha256
        if same and stored.get(f.entry.path) == f.entry.size:
            progress.skipped += 1
            progress.add(f.entry.size)
        else:
            todo.append(f)
    await _copy_all(storage, request.task_id, todo, progress, opener)
    files = [f.entry for f in local]
    unchanged = previous is not None and not todo and previous.files == files
    if unchanged and previous is not None and (previous.complete or not request.final):
        return previous  # nothing changed: an unchanged folder costs no write at all
    manifest = Manifest(
        task_id=request.task_id, files=files, complete=request.final, created_at=time.time()
    )
    await storage.write_manifest(manifest)
    return manifest


async def _copy_all(
    storage: Storage,
    task_id: str,
    todo: list[LocalFile],
    progress: Progress,
    opener: Opener,
) -> None:
    """Copy files concurrently (the storage bounds how many); the first failure stops the rest."""

    async def copy(f: LocalFile) -> None:
        await storage.upload(task_id, f.entry, f.path, on_bytes=progress.add, opener=opener)
        progress.uploaded += 1

    try:
        async with asyncio.TaskGroup() as group:
            for f in todo:
                group.create_task(copy(f))
    except BaseExceptionGroup as e:
        raise e.exceptions[0] from None


def status_of(
    request: ArtifactRequest,
    storage: Storage,
    state: ArtifactState,
    progress: Progress,
    *,
    attempts: int,
    error: str | None = None,
) -> ArtifactStatus:
    """The status record for the sync as it stands."""
    return ArtifactStatus(
        task_id=request.task_id,
        state=state,
        backend=storage.kind,
        location=storage.location(request.task_id),
        files=progress.files,
        uploaded=progress.uploaded,
        skipped=progress.skipped,
        bytes_done=progress.bytes_done,
        bytes_total=progress.bytes_total,
        attempts=attempts,
        complete=request.final and state is ArtifactState.SYNCED,
        error=error,
        updated_at=time.time(),
    )
