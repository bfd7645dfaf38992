"""The storage interface both backends implement, and the factory that picks one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import IO, Protocol

from shared.errors import TradePlatError
from shared.settings import Settings
from shared.storage.manifest import Manifest, ManifestEntry

#: The manifest's name inside a task's prefix (a task file of that name is refused).
MANIFEST_NAME = "manifest.json"

#: Opens a local file for reading; tests pass one whose reads fail part-way.
Opener = Callable[[Path], IO[bytes]]


def open_binary(path: Path) -> IO[bytes]:
    """The default ``Opener``."""
    return path.open("rb")


class StorageError(TradePlatError):
    """A copy to or from shared storage failed (the message says which file and why)."""


class Storage(Protocol):
    """One backend. Use as ``async with open_storage(settings) as storage: ...``.

    Every ``rel`` is already normalised by ``safe_relpath``; every ``task_id`` by
    ``safe_task_id``.
    """

    kind: str

    async def __aenter__(self) -> Storage: ...

    async def __aexit__(self, *exc: object) -> None: ...

    def location(self, task_id: str) -> str:
        """Where the task's files live (``s3://bucket/prefix/<id>/`` or a folder path)."""
        ...

    async def read_manifest(self, task_id: str) -> Manifest | None:
        """The task's manifest, or None if none was written yet."""
        ...

    async def sizes(self, task_id: str) -> dict[str, int]:
        """Stored files of the task (not the manifest) and their sizes in bytes."""
        ...

    async def upload(
        self,
        task_id: str,
        entry: ManifestEntry,
        source: Path,
        *,
        on_bytes: Callable[[int], None],
        opener: Opener = open_binary,
    ) -> None:
        """Copy ``source`` to ``entry.path``, verified; nothing partial stays under that name.

        Raises:
            StorageError: the copy failed or did not verify (the partial copy was removed).
        """
        ...

    async def write_manifest(self, manifest: Manifest) -> None:
        """Store the manifest (after every file it lists)."""
        ...

    async def download(self, task_id: str, rel: str, dest: Path) -> None:
        """Copy a stored file to ``dest`` (the caller verifies it against the manifest)."""
        ...

    async def remove_partial(self, task_id: str) -> int:
        """Remove what an interrupted sync left (temporary files, open multipart uploads)."""
        ...


def artifact_location(settings: Settings, task_id: str) -> str | None:
    """Where the task's artifacts will be synced (as ``Storage.location`` says), or None."""
    prefix = settings.artifact_prefix.strip("/")
    inner = f"{prefix}/{task_id}/" if prefix else f"{task_id}/"
    if settings.artifact_backend == "s3":
        return f"s3://{settings.s3_bucket}/{inner}"
    if settings.artifact_backend == "path" and settings.artifact_dir is not None:
        return str(settings.artifact_dir / inner.rstrip("/"))
    return None


def open_storage(settings: Settings) -> Storage:
    """The backend ``TP_ARTIFACT_BACKEND`` names.

    Raises:
        StorageError: ``none``, or ``path`` without ``TP_ARTIFACT_DIR``.
    """
    if settings.artifact_backend == "s3":
        from shared.storage.s3 import S3Storage

        return S3Storage(settings)
    if settings.artifact_backend == "path":
        from shared.storage.path import PathStorage

        if settings.artifact_dir is None:
            raise StorageError("TP_ARTIFACT_BACKEND=path needs TP_ARTIFACT_DIR")
        return PathStorage(settings.artifact_dir, settings.artifact_prefix)
    raise StorageError("no shared storage configured (TP_ARTIFACT_BACKEND=none)")
