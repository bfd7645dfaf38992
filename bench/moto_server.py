"""A real S3 server on loopback for benchmarks and tests: moto's server mode in its own process."""

from __future__ import annotations

import socket
import subprocess
import sys
import time


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(
    proc: subprocess.Popen[bytes], port: int, what: str, timeout_s: float = 30.0
) -> None:
    """Return once ``127.0.0.1:port`` accepts connections.

    Raises:
        RuntimeError: ``proc`` exited or nothing listened within ``timeout_s`` (it is killed).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), 0.5):
                return
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"{what} did not start") from None
            time.sleep(0.1)


def start_moto(port: int, timeout_s: float = 30.0) -> subprocess.Popen[bytes]:
    """Start ``python -m moto.server`` on 127.0.0.1:``port``; return once it accepts connections.

    Raises:
        RuntimeError: it exited or did not listen within ``timeout_s``.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_listening(proc, port, "moto server", timeout_s)
    return proc
