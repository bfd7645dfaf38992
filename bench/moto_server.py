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
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), 0.5):
                return proc
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.1)
