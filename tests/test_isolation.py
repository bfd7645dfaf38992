"""torch (and other task code) never loads in the scheduler, the CLI or the worker's own process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, service_env


def run_check(settings, *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "tests/import_check.py", *args],
        cwd=ROOT,
        env=service_env(settings),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_scheduler_worker_and_client_process_never_import_torch(settings):
    report = run_check(settings, "services")
    # The task really trained (in a forkserver child, where torch was loaded) ...
    assert report["outcome"] == "completed"
    # ... while the process running scheduler, worker and client loaded none of it.
    assert report["heavy_modules"] == []


def test_cli_remote_paths_never_import_torch(settings):
    for args in (
        ["task", "submit", "train_model", "--set", "epochs=1"],
        ["task", "list"],
        ["task", "submit", "train_model", "--set", "epochs=0"],
    ):
        assert run_check(settings, "cli", *args)["heavy_modules"] == []


def test_import_check_detects_torch(settings):
    """The check itself can fail: importing the task module loads torch."""
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, services.gpu_worker.tasks.train_model; print('torch' in sys.modules)",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.stdout.strip() == "True"
