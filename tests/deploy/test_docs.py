"""The deploy commands in the README and docs/deploy.md name things that exist.

Every script, compose file, unit and `just` recipe the deployment instructions tell a user to
run is checked against the repository, so a rename cannot leave the docs pointing at nothing.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "docs/deploy.md"]


def deploy_text() -> str:
    """The README's deploy section and the whole of docs/deploy.md."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Deploying the desktop") :]
    section = section[: section.index("\n## ")]
    return section + (ROOT / "docs/deploy.md").read_text()


def test_files_named_by_the_deploy_docs_exist() -> None:
    text = deploy_text()
    named = set(
        re.findall(r"\b((?:scripts|infra|docs)/[\w./@-]+\.(?:sh|md|example|conf|service))", text)
    )
    named |= set(re.findall(r"\b(docker-compose[\w.]*\.yml|Dockerfile(?:\.gpu)?)\b", text))
    assert {"scripts/make-secrets.sh", "scripts/make-certs.sh", "docker-compose.tls.yml"} <= named
    missing = sorted(n for n in named if not (ROOT / n).exists())
    assert missing == [], missing


def test_just_recipes_and_tradectl_commands_in_the_deploy_docs_exist() -> None:
    text = deploy_text()
    recipes = set(re.findall(r"\bjust ([a-z][\w-]*)", text))
    assert "install-systemd" in recipes
    listed = subprocess.run(
        [str(Path(sys.executable).parent / "just"), "--summary"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert recipes <= set(listed), recipes - set(listed)
    for command in sorted(set(re.findall(r"tradectl ([a-z-]+ [a-z-]+)", text))):
        done = subprocess.run(
            [sys.executable, "-m", "shared.cli", *command.split(), "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, (command, done.stderr)


def test_units_named_by_the_deploy_docs_exist() -> None:
    units = {p.name for p in (ROOT / "infra/systemd").iterdir()}
    for name in set(re.findall(r"\b(trading[\w@-]*\.(?:service|target))", deploy_text())):
        template = re.sub(r"@[^.]+\.", "@.", name)
        assert name in units or template in units, name
