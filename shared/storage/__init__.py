"""Shared storage for task artifacts: an S3-compatible bucket or a mounted folder.

Layout (both backends): ``<prefix>/<task_id>/<relative path>`` per file and
``<prefix>/<task_id>/manifest.json`` (``Manifest``), written last so a reader knows the set is
complete. ``open_storage(settings)`` gives the configured backend.
"""

from __future__ import annotations

from shared.storage.base import Storage, StorageError, open_storage
from shared.storage.manifest import Manifest, ManifestEntry, file_digest
from shared.storage.naming import UnsafeNameError, safe_relpath, safe_task_id

__all__ = [
    "Manifest",
    "ManifestEntry",
    "Storage",
    "StorageError",
    "UnsafeNameError",
    "file_digest",
    "open_storage",
    "safe_relpath",
    "safe_task_id",
]
