"""The storage interface both backends implement, and the factory that picks one."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Protocol

from pydantic import ValidationError

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


class ManifestCorruptError(StorageError):
    """The stored manifest is not a manifest (truncated, tampered with)."""


#: Temporary files are named ``.tp-partial-<8 hex>`` in the final file's folder: short, so a
#: long final name still fits the filesystem's limit, and exact, so no user file is mistaken
#: for one.
_PARTIAL = re.compile(r"^\.tp-partial-[0-9a-f]{8}$")


def partial_name() -> str:
    """A fresh temporary file name."""
    return f".tp-partial-{uuid.uuid4().hex[:8]}"


def is_partial(name: str) -> bool:
    """True for a name ``partial_name`` makes."""
    return bool(_PARTIAL.match(name))


def parse_manifest(data: str | bytes, where: str) -> Manifest:
    """Validate a stored manifest.

    Raises:
        ManifestCorruptError: it does not parse as one.
    """
    try:
        return Manifest.model_validate_json(data)
    except ValidationError as e:
        raise ManifestCorruptError(
            f"the manifest at {where} is unreadable: {e.errors()[0]['msg']}"
        ) from e


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

    async def stored(self, task_id: str) -> dict[str, tuple[int, str | None]]:
        """Stored files of the task (not the manifest): ``(size in bytes, ETag or None)``."""
        ...

    async def upload(
        self,
        task_id: str,
        entry: ManifestEntry,
        source: Path,
        *,
        on_bytes: Callable[[int], None],
        opener: Opener = open_binary,
    ) -> str | None:
        """Copy ``source`` to ``entry.path``, verified; nothing partial stays under that name.

        Returns:
            The stored object's ETag (S3), or None.

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
