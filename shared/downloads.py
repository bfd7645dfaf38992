"""Fetching a task's artifacts from shared storage on the laptop (no desktop needed).

Reads the task's manifest, downloads every file it lists into a folder, and checks each file's
size and SHA-256 against it before giving it its final name. Names in the manifest pass the same
hygiene as on upload (``safe_relpath``), so a tampered manifest cannot write outside the folder.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from shared.settings import Settings
from shared.storage import (
    Manifest,
    ManifestEntry,
    Storage,
    StorageError,
    file_digest,
    open_storage,
    safe_relpath,
    safe_task_id,
)
from shared.storage.base import partial_name


async def download_artifacts(
    settings: Settings, task_id: str, dest: Path, *, partial_ok: bool = False
) -> Manifest:
    """Download task ``task_id``'s synced files into ``dest`` (created), verified.

    Args:
        settings: the storage settings (``TP_ARTIFACT_BACKEND`` and its ``TP_S3_*``/dir).
        task_id: the full task id.
        dest: the folder to fill.
        partial_ok: accept a set synced from a checkpoint while the task was still running
            (manifest ``complete`` False); by default that is refused, since the final set is
            then still to come.

    Returns:
        The manifest.

    Raises:
        StorageError: no manifest (not synced yet), an incomplete set (unless ``partial_ok``), a
            download failed, or a file's size or SHA-256 differs from the manifest (that file is
            not kept, nor any temporary file).
        UnsafeNameError: a task id or manifest entry that would escape ``dest``.
    """
    task_id = safe_task_id(task_id)
    await asyncio.to_thread(dest.mkdir, parents=True, exist_ok=True)
    root = await asyncio.to_thread(dest.resolve)
    async with open_storage(settings) as storage:
        manifest = await storage.read_manifest(task_id)
        if manifest is None:
            raise StorageError(
                f"no synced artifacts for task {task_id} at {storage.location(task_id)} "
                "(not finished, not synced yet, artifact-sync not running, or not the full id)"
            )
        if not manifest.complete and not partial_ok:
            raise StorageError(
                f"the stored set of {task_id} is a checkpoint taken while it ran; its final sync "
                "is still to come (tradectl artifacts status), or pass --partial to take it"
            )
        for entry in manifest.files:
            await _fetch_one(storage, task_id, entry, root)
    return manifest


async def _fetch_one(storage: Storage, task_id: str, entry: ManifestEntry, root: Path) -> None:
    rel = safe_relpath(entry.path)
    target = root / rel
    await asyncio.to_thread(_make_folder_inside, target.parent, root)
    partial = target.parent / partial_name()
    try:
        await storage.download(task_id, rel, partial)
        await asyncio.to_thread(_verify_and_place, partial, target, entry)
    except OSError as e:
        raise StorageError(f"download of {rel} failed: {e}") from e
    finally:
        with contextlib.suppress(OSError):
            await asyncio.to_thread(partial.unlink)


def _make_folder_inside(folder: Path, root: Path) -> None:
    """Create ``folder`` only if it, and every part of it that exists, resolves inside ``root``.

    Checked before anything is created, so a symlink planted in the destination cannot make the
    download create folders (or write files) elsewhere.
    """
    existing = folder
    while not existing.exists() and existing != root:
        existing = existing.parent
    if not existing.resolve().is_relative_to(root):
        raise StorageError(f"{folder} would be outside {root} (a symbolic link in the way)")
    folder.mkdir(parents=True, exist_ok=True)
    if not folder.resolve().is_relative_to(root):
        raise StorageError(f"{folder} would be outside {root} (a symbolic link in the way)")


def _verify_and_place(partial: Path, target: Path, entry: ManifestEntry) -> None:
    """Give a downloaded file its final name if its size and SHA-256 match the manifest."""
    size, sha256 = file_digest(partial)
    if (size, sha256) != (entry.size, entry.sha256):
        with contextlib.suppress(OSError):
            partial.unlink()
        raise StorageError(
            f"{entry.path} does not match the manifest: {size} bytes, SHA-256 {sha256[:16]}... "
            f"(expected {entry.size} bytes, {entry.sha256[:16]}...)"
        )
    partial.replace(target)  # a symlink at ``target`` is replaced, never written through
