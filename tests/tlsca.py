"""A test certificate authority made with the openssl command line, per test run.

``TestCA(folder, "name").issue("localhost")`` gives a server certificate for ``localhost`` and
``127.0.0.1`` signed by a fresh self-signed CA (RSA 2048, one day); two CAs made this way do not
trust each other, which is what the wrong-CA tests need. Takes well under a second.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key (PEM files)."""

    cert: Path
    key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


class TestCA:
    """A self-signed CA in ``folder`` (``<name>-ca.pem``, ``<name>-ca.key``)."""

    __test__ = False  # not a pytest test class

    def __init__(self, folder: Path, name: str) -> None:
        if shutil.which("openssl") is None:
            pytest.fail("openssl not installed (Debian package openssl)")
        self.folder = folder
        self.name = name
        folder.mkdir(parents=True, exist_ok=True)
        self.cert = folder / f"{name}-ca.pem"
        self.key = folder / f"{name}-ca.key"
        _openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", f"/CN={name} test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout", str(self.key), "-out", str(self.cert),
            cwd=folder,
        )  # fmt: skip

    def issue(self, host: str = "localhost") -> Issued:
        """A server certificate for ``host`` and ``127.0.0.1``, signed by this CA."""
        stem = self.folder / f"{self.name}-{host}"
        key, csr, cert = (
            stem.with_suffix(".key"),
            stem.with_suffix(".csr"),
            stem.with_suffix(".pem"),
        )
        ext = stem.with_suffix(".ext")
        ext.write_text(
            f"subjectAltName=DNS:{host},IP:127.0.0.1\n"
            "extendedKeyUsage=serverAuth,clientAuth\n"
            "basicConstraints=critical,CA:FALSE\n"
        )
        _openssl(
            "req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={host}",
            "-keyout", str(key), "-out", str(csr),
            cwd=self.folder,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey", str(self.key),
            "-CAcreateserial", "-days", "1", "-extfile", str(ext), "-out", str(cert),
            cwd=self.folder,
        )  # fmt: skip
        key.chmod(0o644)  # RabbitMQ runs as this user here, but keep it readable for any node
        return Issued(cert, key)
