"""Local facts about a git checkout, read without prompting or hanging.

Every call runs ``git`` with ``GIT_TERMINAL_PROMPT=0`` and a short timeout, and only reads local
state (no network): the commit at ``HEAD``, whether the tree is dirty, whether a commit is pushed
(on a remote-tracking branch as last fetched), whether one commit contains another. Any failure
(not a repository, git missing, timeout) gives the "don't know" answer documented per function
rather than an error.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

#: Local git commands are instant; anything slower means a broken filesystem (s).
GIT_TIMEOUT_S = 5.0

#: Environment for every git process: never prompt for a credential, never open an editor.
GIT_ENV = {"GIT_TERMINAL_PROMPT": "0", "GIT_EDITOR": "true", "GCM_INTERACTIVE": "never"}


def _git(path: Path, *args: str) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(
            ["git", "-C", str(path), *args],
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            env={**os.environ, **GIT_ENV},
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None


def head_commit(path: Path) -> str | None:
    """Full SHA of ``HEAD`` in the git checkout containing ``path``, or None if there is none."""
    done = _git(path, "rev-parse", "--verify", "HEAD")
    sha = done.stdout.strip() if done is not None else ""
    return sha if done is not None and done.returncode == 0 and len(sha) >= 40 else None


def resolve_commit(path: Path, commit: str) -> str | None:
    """Full SHA of ``commit`` (full or abbreviated) if the checkout has it, else None."""
    done = _git(path, "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}")
    return done.stdout.strip() if done is not None and done.returncode == 0 else None


def contains(path: Path, head: str, commit: str) -> bool:
    """True if ``head`` contains ``commit`` (``commit`` is ``head`` or one of its ancestors).

    False when either commit is unknown to the checkout (not fetched yet) or git fails.
    """
    done = _git(path, "merge-base", "--is-ancestor", commit, head)
    return done is not None and done.returncode == 0


def dirty_files(path: Path) -> list[str]:
    """Tracked files with uncommitted changes (staged or not); untracked files are ignored."""
    done = _git(path, "status", "--porcelain", "--untracked-files=no")
    if done is None or done.returncode != 0:
        return []
    return [line[3:] for line in done.stdout.splitlines() if line.strip()]


def remote_branches_containing(path: Path, commit: str) -> set[str]:
    """Remote-tracking branches (``origin/main``), as of the last fetch, that contain ``commit``."""
    done = _git(path, "branch", "--remotes", "--contains", commit, "--format=%(refname:short)")
    if done is None or done.returncode != 0:
        return set()
    return {line.strip() for line in done.stdout.splitlines() if line.strip()}


def git_dirs(path: Path) -> tuple[Path, Path] | None:
    """``(git dir, common dir)`` of the checkout containing ``path``, read from disk, no git run.

    The common dir holds the refs (it differs from the git dir in a linked worktree). None when
    no ``.git`` is found above ``path`` or it cannot be read.
    """
    try:
        start = path.resolve()
        for folder in (start, *start.parents):
            dot = folder / ".git"
            if dot.is_dir():
                git_dir = dot
            elif dot.is_file():
                text = dot.read_text().strip()
                if not text.startswith("gitdir:"):
                    return None
                git_dir = (folder / text.removeprefix("gitdir:").strip()).resolve()
            else:
                continue
            common = git_dir / "commondir"
            if common.is_file():
                return git_dir, (git_dir / common.read_text().strip()).resolve()
            return git_dir, git_dir
    except OSError:
        return None
    return None


def checkout_fingerprint(path: Path) -> tuple[object, ...] | None:
    """A cheap stamp of what ``checkout_state`` reads, from a few ``stat`` calls (no git run).

    It changes when ``HEAD`` moves (commit, checkout, reset), when the index changes (``git add``),
    and when refs change (a fetch or push moves a remote-tracking branch). An edit of a tracked
    file that is not staged does not change it. None when the git folder is not found.
    """
    dirs = git_dirs(path)
    if dirs is None:
        return None
    git_dir, common = dirs
    try:
        head = (git_dir / "HEAD").read_text().strip()
        remotes = common / "refs" / "remotes"
        files = [git_dir / "HEAD", git_dir / "index", common / "packed-refs", remotes]
        if head.startswith("ref:"):
            files.append(common / head.removeprefix("ref:").strip())
        if remotes.is_dir():
            files.extend(sorted(p for p in remotes.iterdir() if p.is_dir()))
    except OSError:
        return None
    stamps: list[tuple[int, int, int] | None] = []
    for file in files:
        try:
            st = file.stat()
        except OSError:
            stamps.append(None)
        else:
            stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return (str(path), head, tuple(stamps))


@dataclass(frozen=True)
class CheckoutState:
    """What the laptop's checkout says about the commit a task is submitted from.

    Attributes:
        path: the checkout's folder.
        commit: full SHA of ``HEAD``; None when ``path`` is not a git checkout.
        dirty: tracked files with uncommitted changes (they will not run on the desktop).
        on: remote-tracking branches (as last fetched) that contain ``commit``.
        followed: the branches the desktop follows (``origin/main``); empty when unknown, and
            then any remote branch counts as pushed.
    """

    path: Path
    commit: str | None
    dirty: tuple[str, ...] = ()
    on: frozenset[str] = frozenset()
    followed: frozenset[str] = frozenset()

    @property
    def pushed(self) -> bool:
        """Whether the desktop can fetch ``commit`` (on a branch it follows, if known)."""
        return bool(self.on & self.followed) if self.followed else bool(self.on)

    def problems(self) -> list[str]:
        """Why the desktop may not run exactly this code (empty when it will)."""
        if self.commit is None:
            return [f"{self.path} is not a git checkout: the task is not pinned to a commit"]
        found = []
        if self.dirty:
            shown = ", ".join(self.dirty[:5]) + (" ..." if len(self.dirty) > 5 else "")
            found.append(f"uncommitted changes in {shown} will not run on the desktop")
        if not self.pushed and self.followed and self.on:
            found.append(
                f"commit {self.commit[:12]} is on {', '.join(sorted(self.on))} but the desktop "
                f"follows {', '.join(sorted(self.followed))}; push or merge it there"
            )
        elif not self.pushed:
            found.append(f"commit {self.commit[:12]} is not pushed; the desktop cannot fetch it")
        return found


def checkout_state(path: Path, followed: frozenset[str] = frozenset()) -> CheckoutState:
    """Commit, dirty files and pushed-ness of the checkout at ``path`` (local facts only).

    Args:
        path: the laptop's checkout.
        followed: remote-tracking branches the desktop follows (``origin/main``), if known.
    """
    commit = head_commit(path)
    if commit is None:
        return CheckoutState(path, None)
    on = frozenset(remote_branches_containing(path, commit))
    return CheckoutState(path, commit, tuple(dirty_files(path)), on, followed)
