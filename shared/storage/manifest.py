"""The per-task manifest (file, size, SHA-256) and the digests behind it."""

from __future__ import annotations

import hashlib
from pathlib import Path

from pydantic import BaseModel, Field

#: Read size for hashing (bytes): large enough that hashlib, not Python, sets the pace.
HASH_CHUNK = 4 * 1024 * 1024


class ManifestEntry(BaseModel):
    """A synced file: ``path`` relative to the task's prefix, ``size`` (bytes), ``sha256`` (hex)."""

    path: str
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    #: The stored object's ETag when it was uploaded (S3), so a re-sync notices an object that
    #: was overwritten since; None on the path backend.
    etag: str | None = Field(None, max_length=200)


class Manifest(BaseModel):
    """Every file of a task's synced set, written after all of them.

    ``complete`` is True when the task had finished (the set will not change); a manifest written
    for a checkpoint of a running task has ``complete`` False.
    """

    schema_version: int = 1
    task_id: str
    files: list[ManifestEntry]
    complete: bool
    created_at: float

    @property
    def total_bytes(self) -> int:
        """Sum of the files' sizes (bytes)."""
        return sum(f.size for f in self.files)

    def by_path(self) -> dict[str, ManifestEntry]:
        """Entries keyed by relative path."""
        return {f.path: f for f in self.files}


def file_digest(path: Path) -> tuple[int, str]:
    """``(size in bytes, SHA-256 hex)`` of a file, read in ``HASH_CHUNK`` pieces."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()
