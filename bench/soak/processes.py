"""Starting, killing and finding the soak's service processes.

Every process of one service incarnation carries ``SOAK_INCARNATION=<namespace>/<name>/<n>`` in its
environment (children inherit it), so a worker's forkserver and task children can be found in
``/proc`` after the worker itself is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .console import say
from .constants import INCARNATION_VAR, ROOT


@dataclass
class Incarnation:
    """One started service process (a restarted worker is a new incarnation)."""

    role: str
    name: str
    tag: str
    log_path: Path
    proc: subprocess.Popen[bytes]
    started_wall: float
    started_mono: float
    ready_after_s: float | None = None
    killed: bool = False
    exit_code: int | None = None

    def check_ready(self) -> bool:
        """True once the service logged that it is ready (time to ready is recorded)."""
        if self.ready_after_s is not None:
            return True
        marker = "worker_ready" if self.role == "worker" else "service_started"
        with contextlib.suppress(OSError):
            for line in self.log_path.read_text(errors="replace").splitlines():
                if f'"{marker}"' not in line:
                    continue
                try:
                    ts = datetime.fromisoformat(json.loads(line)["timestamp"]).timestamp()
                except (ValueError, KeyError, TypeError):
                    ts = time.time()
                self.ready_after_s = max(0.0, ts - self.started_wall)
                return True
        return False


def processes_tagged(prefix: str) -> dict[int, str]:
    """Pids of live processes whose ``SOAK_INCARNATION`` starts with ``prefix`` -> the tag.

    Children inherit the environment, so this finds a worker's forkserver and task children too.
    """
    found: dict[int, str] = {}
    needle = f"{INCARNATION_VAR}={prefix}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[-1].split()[0] == "Z":  # a zombie is already dead
            continue
        for var in environ.split(b"\0"):
            if var.startswith(needle):
                found[int(entry.name)] = var.split(b"=", 1)[1].decode()
                break
    return found


def describe_pid(pid: int) -> str:
    """``forkserver``, ``resource_tracker``, ``task child`` or ``service``, with its parent pid."""
    try:
        cmdline = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ")
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return f"{pid} (gone)"
    ppid = int(stat.rsplit(")", 1)[-1].split()[1])
    if b"resource_tracker" in cmdline:
        kind = "resource_tracker"
    elif b"forkserver" in cmdline:
        # A task child is forked from the forkserver and keeps its command line.
        parent = (Path("/proc") / str(ppid) / "cmdline").read_bytes() if ppid > 1 else b""
        kind = "task child" if b"forkserver" in parent else "forkserver"
    else:
        kind = "service"
    return f"{pid} {kind} (ppid {ppid})"


def _sigkill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


class Fleet:
    """The scheduler and workers of one soak, as real processes with logs in files."""

    def __init__(self, base_env: dict[str, str], log_dir: Path, namespace: str) -> None:
        self.base_env = base_env
        self.log_dir = log_dir
        self.namespace = namespace
        self.current: dict[str, Incarnation] = {}
        self.history: list[Incarnation] = []
        self._counts: Counter[str] = Counter()
        self.kills: list[dict[str, Any]] = []
        self.unexpected_exits: list[dict[str, Any]] = []
        self.lingering_after_kill: list[dict[str, Any]] = []

    def start(self, role: str, name: str) -> Incarnation:
        """Start (or start again) the service called ``name``."""
        self._counts[name] += 1
        tag = f"{self.namespace}/{name}/{self._counts[name]}"
        env = dict(self.base_env)
        env[INCARNATION_VAR] = tag
        module = "gpu_worker" if role == "worker" else "scheduler"
        if role == "worker":
            env.update(TP_WORKER_NAME=name, TP_WORKER_GPU_SLOTS="0", TP_WORKER_CPU_SLOTS="1")
        log_path = self.log_dir / f"{name}-{self._counts[name]:04d}.log"
        with log_path.open("wb") as log_file:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                [sys.executable, "-m", f"services.{module}"],
                cwd=ROOT,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        inc = Incarnation(role, name, tag, log_path, proc, time.time(), time.monotonic())
        self.current[name] = inc
        self.history.append(inc)
        return inc

    def kill_and_restart(self, name: str) -> None:
        """SIGKILL the worker's main process only (a crash), reap it, start a new one."""
        inc = self.current[name]
        was_ready = inc.check_ready()
        inc.killed = True
        _sigkill(inc.proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            inc.proc.wait(5)
        inc.exit_code = inc.proc.returncode
        self.kills.append(
            {
                "t": time.monotonic(),
                "name": name,
                "tag": inc.tag,
                "pid": inc.proc.pid,
                "was_ready": was_ready,
                "uptime_s": round(time.monotonic() - inc.started_mono, 2),
            }
        )
        self.start("worker", name)

    def check_lingering(self, older_than_s: float) -> None:
        """Record killed incarnations whose processes still live ``older_than_s`` after the kill.

        Each kill is looked at once.
        """
        now = time.monotonic()
        for kill in self.kills:
            if kill.get("checked") or now - kill["t"] < older_than_s:
                continue
            kill["checked"] = True
            tag = kill["tag"]
            left = [describe_pid(p) for p, t in processes_tagged(tag).items() if t == tag]
            if left:
                self.lingering_after_kill.append(
                    {"tag": tag, "after_s": round(now - kill["t"], 1), "pids": left}
                )

    def restart_dead(self) -> list[Incarnation]:
        """Start again any service that exited by itself (recorded as unexpected)."""
        restarted = []
        for name, inc in list(self.current.items()):
            code = inc.proc.poll()
            if code is None:
                continue
            inc.exit_code = code
            tail = inc.log_path.read_text(errors="replace").splitlines()[-5:]
            self.unexpected_exits.append(
                {"name": name, "tag": inc.tag, "exit_code": code, "log_tail": tail}
            )
            say(f"!! {inc.tag} exited by itself with {code}; restarting. log tail:")
            for line in tail:
                say(f"   {line}")
            restarted.append(self.start(inc.role, name))
        return restarted

    def stop_gracefully(self, timeout_s: float = 20.0) -> dict[str, int | None]:
        """SIGTERM every current service, wait, then SIGKILL what is left of it."""
        for inc in self.current.values():
            if inc.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(inc.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        codes: dict[str, int | None] = {}
        for name, inc in self.current.items():
            with contextlib.suppress(subprocess.TimeoutExpired):
                inc.proc.wait(max(0.1, deadline - time.monotonic()))
            if inc.proc.poll() is None:
                say(f"!! {inc.tag} did not stop within {timeout_s:g} s of SIGTERM; SIGKILL")
                _sigkill(inc.proc.pid)
                inc.proc.wait()
            inc.exit_code = codes[name] = inc.proc.returncode
        return codes

    def kill_everything(self) -> list[int]:
        """SIGKILL every process that carries this soak's namespace tag; returns their pids."""
        for inc in self.history:
            if inc.proc.poll() is None:
                _sigkill(inc.proc.pid)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    inc.proc.wait(5)
        killed: list[int] = []
        for _ in range(50):
            left = processes_tagged(self.namespace + "/")
            if not left:
                break
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.1)
        return sorted(set(killed))
