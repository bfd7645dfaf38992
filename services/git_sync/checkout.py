"""What a fetched checkout looks like against its upstream, and the one change git-sync makes.

Read with GitPython; the only write is ``git merge --ff-only``, made only on a clean tree that is
strictly behind. Nothing here resets, stashes, rebases or checks out: local work is never touched.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import git

from shared.gitinfo import GIT_ENV
from shared.gitsync import SyncState


@dataclass(frozen=True)
class Inspection:
    """The checkout after a fetch.

    Attributes:
        state: ``up_to_date``, ``ahead``, ``diverged``, ``dirty``, ``detached``, ``off_branch``,
            ``upstream_missing`` or ``error``; ``behind`` with a clean tree is reported as
            ``up_to_date`` only after ``fast_forward`` (the caller does it).
        branch: the tracked branch.
        local_sha, remote_sha: ``HEAD`` and ``<remote>/<branch>`` (None when missing).
        ahead, behind: commits only on the local side / only on the remote side.
        dirty: tracked files with local changes.
        message: one line for people.
    """

    state: SyncState
    branch: str | None
    local_sha: str | None = None
    remote_sha: str | None = None
    ahead: int = 0
    behind: int = 0
    dirty: tuple[str, ...] = ()
    message: str = ""

    @property
    def can_fast_forward(self) -> bool:
        """Strictly behind a clean tree's upstream: the one case git-sync changes the checkout."""
        return self.state is SyncState.UP_TO_DATE and self.behind > 0


def _open(repo_dir: Path) -> git.Repo:
    repo = git.Repo(repo_dir)
    repo.git.update_environment(**GIT_ENV)
    return repo


def current_branch(repo_dir: Path) -> str | None:
    """The branch checked out, or None (detached ``HEAD``, not a repository)."""
    try:
        with _open(repo_dir) as repo:
            return None if repo.head.is_detached else repo.active_branch.name
    except (git.GitError, ValueError, TypeError):
        return None


def inspect(repo_dir: Path, remote: str, branch: str | None) -> Inspection:
    """Compare the checkout at ``repo_dir`` with ``<remote>/<branch>`` as last fetched.

    Args:
        repo_dir: the desktop checkout.
        remote: remote name (``origin``).
        branch: the tracked branch; None tracks the branch checked out.
    """
    try:
        with _open(repo_dir) as repo:
            if not repo.head.is_valid():
                name = "HEAD" if repo.head.is_detached else repo.head.reference.path
                return Inspection(
                    SyncState.ERROR, branch, message=f"{name} has no commit yet (unborn branch)"
                )
            return _inspect(repo, remote, branch)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        return Inspection(SyncState.ERROR, branch, message=f"{repo_dir} is not a git checkout")
    except git.GitCommandError as e:
        return Inspection(SyncState.ERROR, branch, message=f"git failed: {e.stderr.strip()}")
    except (ValueError, TypeError, OSError) as e:  # GitPython on a damaged or odd checkout
        return Inspection(SyncState.ERROR, branch, message=f"cannot read the checkout: {e}")


def _inspect(repo: git.Repo, remote: str, branch: str | None) -> Inspection:
    if repo.head.is_detached:
        sha = repo.head.commit.hexsha
        return Inspection(
            SyncState.DETACHED,
            branch,
            local_sha=sha,
            message=f"HEAD is detached at {sha[:12]}; check out a branch to follow {remote}",
        )
    active = repo.active_branch.name
    branch = branch or active
    local = repo.head.commit.hexsha
    # -z: names with spaces or non-ASCII letters come out whole and unquoted.
    dirty = tuple(n for n in repo.git.diff("HEAD", "--name-only", "-z").split("\0") if n)
    if active != branch:
        return Inspection(
            SyncState.OFF_BRANCH,
            branch,
            local_sha=local,
            dirty=dirty,
            message=f"branch {active!r} is checked out, not the tracked {branch!r}",
        )
    upstream = f"refs/remotes/{remote}/{branch}"
    try:
        remote_sha = repo.commit(upstream).hexsha
    except (git.BadName, ValueError):
        return Inspection(
            SyncState.UPSTREAM_MISSING,
            branch,
            local_sha=local,
            dirty=dirty,
            message=f"{remote}/{branch} does not exist",
        )
    counts = repo.git.rev_list("--left-right", "--count", f"{local}...{remote_sha}").split()
    return _compare(
        Inspection(
            SyncState.UP_TO_DATE,
            branch,
            local_sha=local,
            remote_sha=remote_sha,
            ahead=int(counts[0]),
            behind=int(counts[1]),
            dirty=dirty,
        ),
        remote,
    )


def _compare(facts: Inspection, remote: str) -> Inspection:
    """The state of a branch whose upstream exists, from its ahead/behind counts and dirt."""
    ahead, behind, dirty, branch = facts.ahead, facts.behind, facts.dirty, facts.branch
    if ahead and behind:
        message = (
            f"{branch} and {remote}/{branch} have diverged ({ahead} local, {behind} remote "
            "commits); merge or rebase by hand, git-sync only fast-forwards"
        )
        return replace(facts, state=SyncState.DIVERGED, message=message)
    if dirty:
        shown = ", ".join(dirty[:5]) + (" ..." if len(dirty) > 5 else "")
        waiting = (
            f"; {behind} upstream commit(s) will be fast-forwarded once these local changes are "
            "committed or removed"
        )
        message = f"local changes in {shown}" + (waiting if behind else "")
        return replace(facts, state=SyncState.DIRTY, message=message)
    if ahead:
        message = f"{ahead} local commit(s) not on {remote}/{branch}"
        return replace(facts, state=SyncState.AHEAD, message=message)
    message = "up to date" if not behind else f"{behind} commit(s) behind {remote}/{branch}"
    return replace(facts, message=message)


def fast_forward(repo_dir: Path, sha: str) -> str | None:
    """``git merge --ff-only sha``; None on success, else git's reason (nothing changed then).

    git refuses on its own, changing nothing, when an untracked file would be overwritten.
    """
    try:
        with _open(repo_dir) as repo:
            repo.git.merge("--ff-only", sha)
    except git.GitCommandError as e:
        return str(e.stderr).strip() or str(e)
    return None
