"""Real git repositories in a temporary folder: a bare "origin", a desktop clone, a laptop clone.

Every git call runs with an isolated configuration (no global or system config, no credential
helper) so the machine's own git set-up cannot change what a test sees.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

#: Isolated git: no user/system config, a fixed identity, never a prompt.
GIT_TEST_ENV = {
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.invalid",
}


def require_git() -> None:
    """Fail under ``CI=true``, skip elsewhere, when git is not installed."""
    if shutil.which("git"):
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("git is not installed")
    pytest.skip("git is not installed")


def git(cwd: Path, *args: str) -> str:
    """Run git in ``cwd`` with the isolated config; returns stdout (stripped); raises on failure."""
    done = subprocess.run(
        ["git", *args],
        cwd=cwd,
        env={**os.environ, **GIT_TEST_ENV},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed: {done.stderr}")
    return done.stdout.strip()


@dataclass
class Repos:
    """The three repositories of a test."""

    origin: Path
    desktop: Path
    laptop: Path

    def head(self, where: Path) -> str:
        """Full SHA of ``HEAD`` in ``where``."""
        return git(where, "rev-parse", "HEAD")

    def commit(self, where: Path, name: str, text: str, *, push: bool = False) -> str:
        """Write ``text`` to ``name`` in ``where``, commit it (and push it); returns the SHA."""
        (where / name).write_text(text)
        git(where, "add", name)
        git(where, "commit", "-q", "-m", f"change {name}")
        if push:
            git(where, "push", "-q", "origin", "HEAD:main")
        return self.head(where)


def make_repos(root: Path) -> Repos:
    """Origin (bare, branch ``main``) with one commit, cloned to a desktop and a laptop."""
    require_git()
    origin, desktop, laptop = root / "origin.git", root / "desktop", root / "laptop"
    git(root, "init", "-q", "--bare", "-b", "main", str(origin))
    git(root, "clone", "-q", str(origin), str(laptop))
    git(laptop, "checkout", "-q", "-b", "main")
    repos = Repos(origin, desktop, laptop)
    repos.commit(laptop, "strategy.py", "FAST = 10\n", push=True)
    git(root, "clone", "-q", str(origin), str(desktop))
    return repos


@pytest.fixture
def isolated_git(monkeypatch: pytest.MonkeyPatch) -> None:
    """git in the test process and its children ignores the machine's config and helpers."""
    for name, value in GIT_TEST_ENV.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def repos(tmp_path: Path, isolated_git: None) -> Repos:
    """Origin, desktop and laptop repositories for one test."""
    return make_repos(tmp_path)
