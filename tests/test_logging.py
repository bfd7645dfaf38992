"""Service logs: our events and third-party stdlib records leave as the same JSON lines."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import textwrap
import time
from typing import Any

from shared.settings import Settings
from tests.conftest import ROOT, ServiceProcess, service_env

#: Configures logging like a service does, then logs through structlog and the stdlib.
SCRIPT = textwrap.dedent(
    """
    import logging, sys, threading, warnings
    import structlog
    from shared.logging import configure_logging
    from shared.settings import Settings

    settings = Settings(log_format=sys.argv[1], log_level=sys.argv[2], _env_file=None)
    configure_logging(settings, service="svc")
    configure_logging(settings, service="svc")  # a second call replaces, never duplicates
    log = structlog.get_logger("services.demo")
    logging.getLogger("aio_pika").warning("x")
    logging.getLogger("aio_pika").info("third-party info is below WARNING")
    logging.getLogger("aiormq").debug("third-party debug is below WARNING")
    logging.getLogger("shared.demo").debug("own stdlib debug")
    log.info("structlog_event", n=1)
    log.debug("own_debug")
    try:
        1 / 0
    except ZeroDivisionError:
        log.exception("own_failure")
        logging.getLogger("aiormq").error("foreign failure", exc_info=True)
    worker = threading.Thread(target=lambda: logging.getLogger("mlflow").warning("in a thread"))
    worker.start()
    worker.join()
    warnings.warn("careful [x]", stacklevel=1)
    print("stdout is not the log")
    """
)


def run_script(fmt: str, level: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, fmt, level],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def json_lines(text: str) -> list[dict[str, Any]]:
    lines = text.splitlines()
    assert lines
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON line: {line!r}\nin:\n{text}") from None
    return parsed


def by_event(lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {line["event"]: line for line in lines}


def test_stdlib_and_structlog_lines_are_all_json() -> None:
    proc = run_script("json", "info")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "stdout is not the log\n"
    lines = json_lines(proc.stderr)
    for line in lines:
        assert {"event", "level", "timestamp", "logger"} <= set(line)
        assert line["service"] == "svc"
    events = by_event(lines)
    assert events["x"]["level"] == "warning"
    assert events["x"]["logger"] == "aio_pika"
    assert events["structlog_event"]["n"] == 1
    assert events["structlog_event"]["level"] == "info"
    assert events["structlog_event"]["logger"] == "services.demo"
    assert "ZeroDivisionError" in events["own_failure"]["exception"]
    assert "ZeroDivisionError" in events["foreign failure"]["exception"]
    assert events["in a thread"]["logger"] == "mlflow"
    assert any("careful [x]" in e for e in events)
    assert len(lines) == 6  # nothing below the levels, nothing twice


def test_own_loggers_follow_the_level_third_party_stays_at_warning() -> None:
    proc = run_script("json", "debug")
    assert proc.returncode == 0, proc.stderr
    events = by_event(json_lines(proc.stderr))
    assert {"own_debug", "own stdlib debug", "x"} <= set(events)
    assert events["own stdlib debug"]["level"] == "debug"
    assert not any("third-party" in e for e in events)


def test_console_format_renders_stdlib_records_too() -> None:
    proc = run_script("console", "info")
    assert proc.returncode == 0, proc.stderr
    (aio_line,) = [line for line in proc.stderr.splitlines() if "[aio_pika]" in line]
    assert "warning" in aio_line
    assert "service=svc" in aio_line
    assert "structlog_event" in proc.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_service_log_with_broker_down_is_all_json(settings: Settings, tmp_path) -> None:
    # aio-pika logs "error when creating transport" itself on each failed connect.
    port = free_port()
    env = service_env(settings, TP_AMQP_URL=f"amqp://guest:guest@127.0.0.1:{port}/")
    proc = ServiceProcess("scheduler", env, tmp_path / "scheduler.log")
    deadline = time.monotonic() + 20
    while proc.log_text().count('"start_failed"') < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.proc.wait(20) == 0, proc.log_text()  # this SIGTERM alone ends it (see lifecycle)
    assert proc.stop() == 0
    lines = json_lines(proc.log_text())
    assert sum(line["event"] == "start_failed" for line in lines) >= 2
    assert all(line["service"] == "scheduler" for line in lines)
    transport = [line for line in lines if line.get("logger", "").startswith("aio")]
    assert transport, "aio-pika's own connect error is expected in the log"
    assert all(line["level"] in ("warning", "error") for line in transport)
