"""A real S3 server on loopback for the tests: moto's server mode, one process per session."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from bench.moto_server import free_port, start_moto


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """Endpoint URL of a moto S3 server shared by the session's tests (each uses its own bucket).

    Fails under ``CI=true`` (skips elsewhere) when moto is not installed or does not start.
    """
    try:
        import moto.server  # noqa: F401
    except ImportError:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("moto[server] is not installed")
        pytest.skip("moto[server] is not installed")
    port = free_port()
    try:
        proc = start_moto(port)
    except RuntimeError as e:
        pytest.fail(str(e))
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)
