"""A RabbitMQ node of the test's own beside the shared one (TLS and permission tests).

Started with the real server script (``/usr/lib/rabbitmq/bin/rabbitmq-server -detached``) and
its own Erlang cookie, node name, ports, data and config folders, so the shared node on 5672 is
never touched (recipe: TESTING-NOTES "A private RabbitMQ node"). Ready about 5-6 s after start.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.test_service_lifecycle import free_port

SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
CTL = Path("/usr/lib/rabbitmq/bin/rabbitmqctl")


class PrivateRabbit:
    """One private node in ``folder``; ``tls_conf`` makes its only AMQP listener a TLS one.

    Args:
        folder: its data, logs, config and Erlang cookie.
        port: the AMQP port (default: a free one).
        tls_conf: ``rabbitmq.conf`` lines of a TLS listener on ``port`` (``listeners.ssl.default``
            and ``ssl_options.*``, as infra/rabbitmq/seed-users.sh writes them); with them there
            is no plain listener at all.
    """

    def __init__(
        self, folder: Path, *, port: int | None = None, tls_conf: list[str] | None = None
    ) -> None:
        if not SERVER.exists() or shutil.which("erl") is None:
            pytest.fail("RabbitMQ server not installed (Debian package rabbitmq-server)")
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.node = f"tp{uuid.uuid4().hex[:8]}@localhost"
        (folder / "home").mkdir(exist_ok=True)
        (folder / "enabled_plugins").write_text("[].\n")
        (folder / "rabbitmq-env.conf").write_text("")
        (folder / "advanced.config").write_text("[].\n")
        lines = ["loopback_users = none", "log.console = false", "log.file.level = info"]
        if tls_conf is None:
            lines.append(f"listeners.tcp.1 = 127.0.0.1:{self.port}")
        else:
            lines += ["listeners.tcp = none", *tls_conf]
        (folder / "rabbitmq.conf").write_text("\n".join(lines) + "\n")
        self.env = {
            **os.environ,
            "HOME": str(folder / "home"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(folder / "mnesia"),
            "RABBITMQ_LOG_BASE": str(folder / "log"),
            "RABBITMQ_CONFIG_FILE": str(folder / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(folder / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(folder / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(folder / "rabbit.pid"),
            "RABBITMQ_CONF_ENV_FILE": str(folder / "rabbitmq-env.conf"),
        }

    def ctl(self, *args: str, timeout: float = 60) -> str:
        """Run ``rabbitmqctl -n <node> <args>``; its stdout (raises on failure)."""
        done = subprocess.run(
            [str(CTL), "-n", self.node, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {args[0]} failed: {done.stdout}{done.stderr}")
        return done.stdout

    def start(self) -> None:
        """Start the node and wait until it takes AMQP connections."""
        subprocess.run(
            [str(SERVER), "-detached"], env=self.env, check=True, capture_output=True, timeout=60
        )
        self.ctl("wait", "--timeout", "60", str(self.folder / "rabbit.pid"), timeout=90)

    def add_user(self, user: str, password: str, vhost: str, perms: tuple[str, str, str]) -> None:
        """A user with ``perms`` (configure, write, read regexes) on ``vhost`` (created)."""
        self.ctl("add_vhost", vhost)
        self.ctl("add_user", user, password)
        self.ctl("set_permissions", "-p", vhost, user, *perms)

    def stop(self) -> None:
        """Stop the node (bounded; a stuck node is killed by its pid file)."""
        try:
            self.ctl("stop", str(self.folder / "rabbit.pid"), timeout=30)
        except (RuntimeError, subprocess.TimeoutExpired):
            pid_file = self.folder / "rabbit.pid"
            if pid_file.exists():
                subprocess.run(["kill", "-9", pid_file.read_text().strip()], check=False)
