"""Running git for network operations: no prompts, a deadline, and no process left behind.

GitPython's ``kill_after_timeout`` kills the ``git`` process but can leave its helpers
(``git-remote-https``, ``ssh``) running, holding the connection. Here each network command runs
in its own session (``start_new_session``), so on time-out one ``killpg`` ends ``git`` and every
process it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from shared.gitinfo import GIT_ENV
from shared.gitsync import SyncState

#: ssh must fail rather than ask (host key, passphrase); the connect time-out bounds a dead host and
#: the keep-alives a host that stops answering, even if git-sync itself is gone.
SSH_COMMAND = (
    "ssh -o BatchMode=yes -o ConnectTimeout=15 -o ServerAliveInterval=15 -o ServerAliveCountMax=4"
)
#: PR_SET_PDEATHSIG from <linux/prctl.h>.
_PR_SET_PDEATHSIG = 1

#: Substrings of git's stderr (lower-cased) that mean "the remote wants credentials".
AUTH_MARKERS = (
    "authentication failed",
    "could not read username",
    "could not read password",
    "terminal prompts disabled",
    "permission denied (publickey",
    "invalid username or password",
    "the requested url returned error: 401",
    "the requested url returned error: 403",
    "host key verification failed",
)
#: ... and "the remote has no such branch".
MISSING_MARKERS = ("couldn't find remote ref", "could not find remote ref")


@dataclass(frozen=True)
class GitResult:
    """How a git command ended: exit status (None when killed on time-out) and its output."""

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        """True for exit status 0."""
        return self.returncode == 0


def git_environment() -> dict[str, str]:
    """The environment git runs with: no terminal prompt, no askpass program, batch-mode ssh.

    An empty ``GIT_ASKPASS`` stops git from falling back to ``core.askPass``/``SSH_ASKPASS``;
    a user's own ``GIT_SSH_COMMAND`` is kept.
    """
    env = {**os.environ, **GIT_ENV, "GIT_ASKPASS": "", "SSH_ASKPASS": ""}
    env.setdefault("GIT_SSH_COMMAND", SSH_COMMAND)
    return env


async def run_git(
    repo_dir: Path, *args: str, timeout_s: float, group_file: Path | None = None
) -> GitResult:
    """Run ``git -C repo_dir args...``; past ``timeout_s`` kill its whole process group.

    ``group_file``, if given, holds the process group's id while git runs, so a git-sync that was
    SIGKILLed mid-fetch can end what it left behind when it starts again
    (``kill_leftover_group``); git itself dies with git-sync (``PR_SET_PDEATHSIG``).

    Returns:
        The result; ``timed_out`` is True (``returncode`` None) when it was killed.

    Raises:
        OSError: git could not be started (not installed).
    """
    # A transfer stalled this long ends inside git too (curl's low-speed limit), so even a fetch
    # orphaned by a SIGKILLed git-sync cannot hang for ever.
    stall = str(max(1, int(timeout_s)))
    proc = await asyncio.create_subprocess_exec(
        "git",
        "-c",
        "http.lowSpeedLimit=1",
        "-c",
        f"http.lowSpeedTime={stall}",
        "-C",
        str(repo_dir),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=git_environment(),
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    if group_file is not None:
        with contextlib.suppress(OSError):
            group_file.write_text(str(proc.pid))  # noqa: ASYNC240 - a few bytes, local disk
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        await _kill_group(proc)
        return GitResult(None, "", f"git {args[0]} timed out after {timeout_s:g} s", True)
    except asyncio.CancelledError:
        await _kill_group(proc)
        raise
    finally:
        if group_file is not None:
            with contextlib.suppress(OSError):
                group_file.unlink()  # noqa: ASYNC240 - local disk
    return GitResult(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


def kill_leftover_group(group_file: Path) -> bool:
    """SIGKILL the git process group an earlier git-sync recorded, if it still runs git.

    Returns True if one was killed. The group id is checked against ``/proc`` (a process of that
    group whose command line starts with git) so a reused id is never killed by mistake.
    """
    try:
        pgid = int(group_file.read_text().strip())
    except (OSError, ValueError):
        return False
    with contextlib.suppress(OSError):
        group_file.unlink()
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(") ", 1)[1].split()
                cmdline = (entry / "cmdline").read_bytes()
            except (OSError, IndexError):
                continue
            if int(stat[2]) == pgid and b"git" in cmdline.split(b"\0")[0]:
                members.append(entry.name)
    if not members:
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    return True


def _die_with_parent() -> None:
    """In the forked child before exec: SIGKILL it when git-sync dies (Linux; else nothing)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


async def _kill_group(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL git's process group (git and every helper it started), then reap git."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    await proc.wait()


def classify_fetch_failure(result: GitResult) -> SyncState:
    """The state a failed fetch puts the checkout in, from git's stderr."""
    if result.timed_out:
        return SyncState.UNREACHABLE
    text = result.stderr.lower()
    if any(marker in text for marker in AUTH_MARKERS):
        return SyncState.AUTH_FAILED
    if any(marker in text for marker in MISSING_MARKERS):
        return SyncState.UPSTREAM_MISSING
    return SyncState.UNREACHABLE


def summarise(stderr: str, limit: int = 500) -> str:
    """Git's error lines (``fatal:``/``error:`` first) as one line, for status and logs."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    important = [ln for ln in lines if ln.lower().startswith(("fatal:", "error:"))]
    return " / ".join(important or lines)[:limit] or "git failed without a message"
