"""A mounted folder (network drive) as shared storage.

Every file is written to a hidden temporary name in its final folder, fsynced, then renamed over
the final name (atomic on POSIX filesystems and SMB/NFS renames within one folder), and the folder
is fsynced. Only data is copied, never permissions or times: network filesystems that refuse
``chmod``/``utime`` cannot leave a copy half-done.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from shared.storage.base import (
    MANIFEST_NAME,
    Opener,
    StorageError,
    is_partial,
    open_binary,
    parse_manifest,
    partial_name,
)
from shared.storage.manifest import HASH_CHUNK, Manifest, ManifestEntry


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some network filesystems cannot fsync a directory; the rename still holds
        pass
    finally:
        os.close(fd)


def atomic_copy(
    read: Callable[[int], bytes], dest: Path, on_bytes: Callable[[int], None] | None = None
) -> str:
    """Write what ``read`` yields to ``dest`` via a temporary name; returns the data's SHA-256.

    The temporary file is removed if anything fails, so ``dest`` is either absent, the old
    version, or complete.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(partial_name())
    digest = hashlib.sha256()
    try:
        with tmp.open("wb") as out:
            while chunk := read(HASH_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                if on_bytes is not None:
                    on_bytes(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(dest.parent)
    return digest.hexdigest()


class PathStorage:
    """Artifacts under ``<root>/<prefix>/<task_id>/``."""

    kind = "path"

    def __init__(self, root: Path, prefix: str) -> None:
        self.base = root / prefix.strip("/") if prefix.strip("/") else root

    async def __aenter__(self) -> PathStorage:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def folder(self, task_id: str) -> Path:
        """The task's folder on the drive."""
        return self.base / task_id

    def location(self, task_id: str) -> str:  # noqa: D102
        return str(self.folder(task_id))

    async def read_manifest(self, task_id: str) -> Manifest | None:  # noqa: D102
        path = self.folder(task_id) / MANIFEST_NAME
        try:
            text = await asyncio.to_thread(path.read_text)
        except FileNotFoundError:
            return None
        return parse_manifest(text, str(path))

    async def stored(self, task_id: str) -> dict[str, tuple[int, str | None]]:  # noqa: D102
        return await asyncio.to_thread(self._stored, self.folder(task_id))

    @staticmethod
    def _stored(folder: Path) -> dict[str, tuple[int, str | None]]:
        found: dict[str, tuple[int, str | None]] = {}
        if not folder.is_dir():
            return found
        for path in folder.rglob("*"):
            if path.is_file() and not is_partial(path.name):
                rel = path.relative_to(folder).as_posix()
                if rel != MANIFEST_NAME:
                    found[rel] = (path.stat().st_size, None)
        return found

    async def upload(  # noqa: D102
        self,
        task_id: str,
        entry: ManifestEntry,
        source: Path,
        *,
        on_bytes: Callable[[int], None],
        opener: Opener = open_binary,
    ) -> str | None:
        dest = self.folder(task_id) / entry.path

        def copy() -> str:
            with opener(source) as f:
                return atomic_copy(f.read, dest, on_bytes)

        try:
            written = await asyncio.to_thread(copy)
        except OSError as e:
            raise StorageError(f"copy of {entry.path} to {dest} failed: {e}") from e
        if written != entry.sha256:
            raise StorageError(f"{entry.path} changed while it was copied (SHA-256 differs)")
        return None

    async def write_manifest(self, manifest: Manifest) -> None:  # noqa: D102
        data = manifest.model_dump_json(indent=1).encode()
        dest = self.folder(manifest.task_id) / MANIFEST_NAME
        view = memoryview(data)
        position = 0

        def read(n: int) -> bytes:
            nonlocal position
            chunk = bytes(view[position : position + n])
            position += len(chunk)
            return chunk

        await asyncio.to_thread(atomic_copy, read, dest)

    async def download(self, task_id: str, rel: str, dest: Path) -> None:  # noqa: D102
        source = self.folder(task_id) / rel

        def copy() -> None:
            with source.open("rb") as f:
                atomic_copy(f.read, dest)

        try:
            await asyncio.to_thread(copy)
        except OSError as e:
            raise StorageError(f"download of {rel} from {source} failed: {e}") from e

    async def remove_partial(self, task_id: str) -> int:  # noqa: D102
        def remove() -> int:
            folder = self.folder(task_id)
            found = folder.rglob(".tp-partial-*") if folder.is_dir() else []
            stale = [p for p in found if is_partial(p.name)]
            for path in stale:
                with contextlib.suppress(OSError):
                    path.unlink()
            return len(stale)

        return await asyncio.to_thread(remove)
