"""The commit a checkout is at, read without prompting or hanging."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

#: ``git rev-parse`` is local and instant; anything slower means a broken filesystem (s).
GIT_TIMEOUT_S = 5.0


def head_commit(path: Path) -> str | None:
    """Full SHA of ``HEAD`` in the git checkout containing ``path``, or None if there is none.

    Runs ``git rev-parse HEAD`` with ``GIT_TERMINAL_PROMPT=0`` and a timeout; any failure (not a
    repository, git missing, timeout) gives None rather than an error.
    """
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
    try:
        done = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            env=env,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    sha = done.stdout.strip()
    return sha if done.returncode == 0 and len(sha) >= 40 else None
