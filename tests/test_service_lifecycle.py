"""Service processes: bad settings refused naming the variable; broker down at start is retried."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

from tests.conftest import ROOT, ServiceProcess, service_env, tradectl


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_setting_refused_at_start_naming_the_variable(settings):
    env = service_env(settings, TP_WORKER_GPU_SLOTS="abc")
    proc = subprocess.run(
        [sys.executable, "-m", "services.gpu_worker"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "bad settings: TP_WORKER_GPU_SLOTS: Input should be a valid integer" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_scheduler_started_before_broker_retries_and_stops_cleanly(settings, tmp_path):
    port = free_port()  # nothing listens here
    env = service_env(settings, TP_AMQP_URL=f"amqp://guest:guest@127.0.0.1:{port}/")
    proc = ServiceProcess("scheduler", env, tmp_path / "scheduler.log")
    deadline = time.monotonic() + 20
    while proc.log_text().count('"start_failed"') < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.proc.poll() is None, proc.log_text()
    assert f"broker unreachable at amqp://guest:***@127.0.0.1:{port}/" in proc.log_text()
    proc.proc.send_signal(signal.SIGTERM)
    # Wait for this one SIGTERM to end it: stop() sends another if the process is still alive,
    # and one landing after the event loop closed (its handlers gone) is a plain SIGTERM death.
    assert proc.proc.wait(20) == 0, proc.log_text()
    assert proc.stop() == 0


async def test_wait_timeout_names_the_state(settings, client):
    cli = tradectl(
        "task", "submit", "probe", "--wait", "--timeout", "1", env=service_env(settings), timeout=60
    )
    assert cli.returncode == 124
    # Queued by the client itself (direct dispatch); no worker takes it.
    assert "still queued after 1 s (is a worker running?)" in cli.stderr, cli.stderr
