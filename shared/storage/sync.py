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
from shared.storage.base import ManifestCorruptError, Opener, StorageError, is_partial, open_binary
from shared.storage.naming import UnsafeNameError

log = structlog.get_logger(__name__)

#: Sub-folders of a task's folder that are synced.
SYNCED_FOLDERS = ("artifacts", "checkpoints")


@dataclass(frozen=True)
class LocalFile:
    """A file to sync: where it is, its manifest entry, and its identity when it was hashed."""

    path: Path
    entry: ManifestEntry
    identity: tuple[int, int, int] = (0, 0, 0)


def identity(path: Path) -> tuple[int, int, int]:
    """``(inode, size, mtime in ns)``: changes when a file is rewritten or replaced."""
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def scan(task_dir: Path) -> list[LocalFile]:
    """Every file under the synced sub-folders, hashed, with normalised relative names.

    A file whose name cannot be stored safely, or that normalises to the name of a file already
    taken (a backslash name next to the same path with slashes, NFD next to NFC), is left out
    with a warning (it never blocks the rest); symbolic links, to files or folders, are not
    followed (a task cannot export files from elsewhere).
    """
    found: list[LocalFile] = []
    taken: set[str] = set()
    for folder in SYNCED_FOLDERS:
        root = task_dir / folder
        if root.is_symlink() or not root.is_dir():
            continue
        for path in sorted(root.rglob("*")):
            if path.is_symlink() or not path.is_file() or is_partial(path.name):
                continue
            try:
                rel = safe_relpath(path.relative_to(task_dir).as_posix())
            except UnsafeNameError as e:
                log.warning("artifact_name_refused", error=str(e))
                continue
            if rel in taken:
                log.warning("artifact_name_collision", name=rel, left_out=str(path))
                continue
            taken.add(rel)
            before = identity(path)
            size, sha256 = file_digest(path)
            entry = ManifestEntry(path=rel, size=size, sha256=sha256)
            found.append(LocalFile(path, entry, before))
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
    await storage.remove_partial(request.task_id)  # first: even a gone folder leaves nothing open
    if not await asyncio.to_thread(task_dir.is_dir):
        raise StorageError(f"no task folder at {task_dir}")
    local = await asyncio.to_thread(scan, task_dir)
    progress.files = len(local)
    progress.bytes_total = sum(f.entry.size for f in local)
    try:
        previous = await storage.read_manifest(request.task_id)
    except ManifestCorruptError as e:  # rewritten below; every file is sent again
        log.warning("stored_manifest_unreadable", error=str(e))
        previous = None
    stored = await storage.stored(request.task_id)
    known = previous.by_path() if previous else {}
    etags: dict[str, str | None] = {}
    todo = []
    for f in local:
        old = known.get(f.entry.path)
        if old is not None and _still_stored(old, f.entry, stored.get(f.entry.path)):
            etags[f.entry.path] = old.etag
            progress.skipped += 1
            progress.add(f.entry.size)
        else:
            todo.append(f)
    etags |= await _copy_all(storage, request.task_id, todo, progress, opener)
    files = [f.entry.model_copy(update={"etag": etags[f.entry.path]}) for f in local]
    unchanged = previous is not None and not todo and previous.files == files
    if unchanged and previous is not None and (previous.complete or not request.final):
        return previous  # nothing changed: an unchanged folder costs no write at all
    manifest = Manifest(
        task_id=request.task_id, files=files, complete=request.final, created_at=time.time()
    )
    await storage.write_manifest(manifest)
    return manifest


def _still_stored(
    old: ManifestEntry, new: ManifestEntry, stored: tuple[int, str | None] | None
) -> bool:
    """True when the stored object is the one the manifest recorded for this content.

    Same SHA-256 as before, an object of the same size, and (S3) the ETag recorded at upload: an
    object overwritten since, even with the same size, is sent again.
    """
    if old.sha256 != new.sha256 or stored is None or stored[0] != new.size:
        return False
    return old.etag is None or stored[1] == old.etag


async def _copy_all(
    storage: Storage,
    task_id: str,
    todo: list[LocalFile],
    progress: Progress,
    opener: Opener,
) -> dict[str, str | None]:
    """Copy files concurrently (the storage bounds how many); the first failure stops the rest.

    Returns:
        The stored ETag of each copied file, by relative path.
    """
    etags: dict[str, str | None] = {}

    async def copy(f: LocalFile) -> None:
        etag = await storage.upload(task_id, f.entry, f.path, on_bytes=progress.add, opener=opener)
        # A file rewritten or replaced while it was hashed or sent may be stored half old, half
        # new: the sync fails (and is retried) rather than record a hash the object does not have.
        if await asyncio.to_thread(identity, f.path) != f.identity:
            raise StorageError(f"{f.entry.path} changed while it was synced; trying again")
        etags[f.entry.path] = etag
        progress.uploaded += 1

    try:
        async with asyncio.TaskGroup() as group:
            for f in todo:
                group.create_task(copy(f))
    except BaseExceptionGroup as e:
        raise e.exceptions[0] from None
    return etags


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
