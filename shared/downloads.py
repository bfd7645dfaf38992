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
    StorageError,
    file_digest,
    open_storage,
    safe_relpath,
    safe_task_id,
)


async def download_artifacts(settings: Settings, task_id: str, dest: Path) -> Manifest:
    """Download task ``task_id``'s synced files into ``dest`` (created), verified.

    Returns:
        The manifest (``complete`` False means the task had not finished when it was synced).

    Raises:
        StorageError: no manifest (not synced yet), a download failed, or a file's size or SHA-256
            differs from the manifest (that file is not kept).
        UnsafeNameError: a task id or manifest entry that would escape ``dest``.
    """
    task_id = safe_task_id(task_id)
    root = await asyncio.to_thread(dest.resolve)
    async with open_storage(settings) as storage:
        manifest = await storage.read_manifest(task_id)
        if manifest is None:
            raise StorageError(
                f"no synced artifacts for task {task_id} at {storage.location(task_id)} "
                "(not finished, not synced yet, or artifact-sync is not running)"
            )
        for entry in manifest.files:
            rel = safe_relpath(entry.path)
            target = root / rel
            partial = target.with_name(f".{target.name}.tp-partial-download")
            await asyncio.to_thread(_check_inside, partial, root)
            await storage.download(task_id, rel, partial)
            await asyncio.to_thread(_verify_and_place, partial, target, entry)
    return manifest


def _check_inside(path: Path, root: Path) -> None:
    """Refuse a path that resolves outside ``root`` (a symlink planted in the folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.parent.resolve().is_relative_to(root):
        raise StorageError(f"{path.name} would be written outside {root}")


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
    partial.replace(target)
