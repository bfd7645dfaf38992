"""Key and path hygiene: nothing a task (or a tampered manifest) names can leave its prefix.

Rules (applied on upload and again on download): backslashes are path separators (a Windows
name), Unicode is NFC-normalised (so ``é`` typed on macOS and on Linux is one key), empty and
``.`` segments are dropped, and a ``..`` segment, an absolute path, a drive letter, a control
character or a name over ``MAX_KEY_CHARS`` is refused. Spaces, ``:`` and non-ASCII letters are kept
as they are and round-trip.
"""

from __future__ import annotations

import re
import unicodedata

from shared.errors import TradePlatError
from shared.messages import TASK_ID_PATTERN

#: S3 keys are at most 1024 bytes; leave room for the prefix and task id.
MAX_KEY_CHARS = 800
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DRIVE = re.compile(r"^[A-Za-z]:")


class UnsafeNameError(TradePlatError):
    """A file name that would escape its task's prefix or cannot be stored as a key."""


def safe_relpath(name: str) -> str:
    """``name`` as a normalised relative path (``/``-separated) inside a task's prefix.

    Raises:
        UnsafeNameError: ``..`` segments, absolute paths, drive letters, control characters,
            empty or over-long names.
    """
    text = unicodedata.normalize("NFC", name).replace("\\", "/")
    if _CONTROL.search(text):
        raise UnsafeNameError(f"file name {name!r} contains a control character")
    if text.startswith("/") or _DRIVE.match(text):
        raise UnsafeNameError(f"file name {name!r} is absolute")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeNameError(f"file name {name!r} climbs out of its folder (..)")
    if not parts:
        raise UnsafeNameError(f"file name {name!r} is empty")
    joined = "/".join(parts)
    if len(joined) > MAX_KEY_CHARS:
        raise UnsafeNameError(f"file name of {len(joined)} characters is too long")
    return joined


def safe_task_id(task_id: str) -> str:
    """``task_id`` if it matches the task id alphabet (it becomes a key prefix and a folder).

    Raises:
        UnsafeNameError: anything else (``..``, slashes, spaces).
    """
    if not re.match(TASK_ID_PATTERN, task_id) or task_id in (".", ".."):
        raise UnsafeNameError(f"not a valid task id: {task_id!r}")
    return task_id
