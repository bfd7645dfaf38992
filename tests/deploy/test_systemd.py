"""The systemd units (``infra/systemd``) and ``scripts/install-systemd.sh``, without systemd.

systemd is not PID 1 on the test machines, so the units are checked in three ways that need none:
``systemd-analyze verify`` and ``security --offline`` on copies whose paths point at this checkout;
each service started exactly as its unit says (the ``ExecStart=`` command, ``Environment=``,
``WorkingDirectory=``, a ``$NOTIFY_SOCKET`` the test listens on) and stopped as systemd stops it
(``KillMode=mixed``: SIGTERM to the main process only, within ``TimeoutStopSec``); and the install
script run into a temporary root (``--root``), where ``systemctl --root`` enables units offline.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from shared.client import DistributedClient
from shared.messages import TaskState
from shared.service import sd_notify
from shared.settings import Settings, service_environment
from tests.conftest import ROOT
from tests.gitrepos import Repos
from tests.test_pipeline import wait_state

UNITS = ROOT / "infra" / "systemd"
INSTALL = ROOT / "scripts" / "install-systemd.sh"
#: Service unit -> the health check's kind (``python -m shared.healthcheck <kind>``).
KINDS = {
    "trading-scheduler.service": "scheduler",
    "trading-worker@.service": "gpu-worker",
    "trading-git-sync.service": "git-sync",
    "trading-artifact-sync.service": "artifact-sync",
    "trading-health-monitor.service": "health-monitor",
}
#: Where the units expect the project; replaced by this checkout in the copies.
PROJECT = "/opt/tradeplat"
#: ``systemd-analyze verify`` lines that are not problems (TESTING-NOTES: the user is missing here).
HARMLESS = ("Special user nobody configured",)
#: Highest ``systemd-analyze security`` exposure allowed (0 = locked down, 10 = unprotected).
#: The worker keeps the GPU devices, writable-executable memory (PyTorch, Triton and the CUDA
#: driver JIT-compile) and the kernel's /proc/driver/nvidia, so it is allowed more.
EXPOSURE_MAX = 2.0
EXPOSURE_MAX_WORKER = 3.0
WORKER_ENV = {
    # Probes only (a second to start, not torch's import); keep the code when the checkout
    # moves under the running test (a commit meanwhile), as the env file may say.
    "TP_WORKER_PRELOAD": '["services.gpu_worker.tasks.probe"]',
    "TP_WORKER_CODE_UPDATE": "ignore",
}


@dataclass
class Unit:
    """A parsed unit file: ``(section, key)`` -> every value, in order."""

    name: str
    entries: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    def get(self, section: str, key: str) -> str:
        values = self.entries.get((section, key), [])
        assert len(values) == 1, f"{self.name}: [{section}] {key}= set {len(values)} times"
        return values[0]

    def all(self, section: str, key: str) -> list[str]:
        return self.entries.get((section, key), [])


def parse_unit(path: Path) -> Unit:
    """The unit file's assignments (comments dropped, ``\\`` continuations joined)."""
    unit = Unit(path.name)
    section = ""
    text = re.sub(r"\\\n", " ", path.read_text())
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        unit.entries.setdefault((section, key.strip()), []).append(value.strip())
    return unit


def expand(value: str, instance: str = "0") -> str:
    """``value`` with the specifiers the units use (``%i``, ``%H``) as systemd expands them."""
    value = value.replace("%i", instance).replace("%H", socket.gethostname())
    assert "%" not in value, f"unexpected specifier in {value!r}"
    return value


def seconds(value: str) -> float:
    """A systemd time span as used here (``150``, ``30s``, ``2min``) in seconds."""
    match = re.fullmatch(r"(\d+)\s*(s|sec|min)?", value)
    assert match, f"unsupported time span {value!r}"
    return float(match[1]) * (60 if match[2] == "min" else 1)


def local_copy(path: Path, folder: Path, secrets: Path, env_file: Path) -> Path:
    """A copy of the unit whose paths exist here: this checkout, its venv, temporary files."""
    text = (
        path.read_text()
        .replace(f"{PROJECT}/.venv/bin/python", sys.executable)
        .replace(f"WorkingDirectory={PROJECT}", f"WorkingDirectory={ROOT}")
        .replace("/etc/tradeplat/tradeplat.env", str(env_file))
        .replace("/etc/tradeplat/secrets", str(secrets))
    )
    name = path.name.replace("@.", "@0.")  # verify an instance, as systemd would run it
    copy = folder / name
    copy.write_text(text)
    return copy


def require_tool(name: str) -> str:
    """The tool's path; fail under ``CI=true``, skip elsewhere, when it is missing."""
    found = shutil.which(name)
    if found:
        return found
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{name} is not installed")
    pytest.skip(f"{name} is not installed")


def test_units_share_the_deployment_contract() -> None:
    """Every service unit: notify, main-process kill, env file, credentials, user, restart.

    These are the lines the runtime tests below rely on and that ``verify`` cannot judge (a
    valid unit with ``KillMode=control-group`` would kill a draining worker's tasks at once).
    """
    target = parse_unit(UNITS / "trading.target")
    wanted = set(target.get("Unit", "Wants").split())
    assert target.get("Install", "WantedBy") == "multi-user.target"
    for name in KINDS:
        unit = parse_unit(UNITS / name)
        service = {key: unit.get("Service", key) for key in ("Type", "NotifyAccess", "KillMode")}
        assert service == {"Type": "notify", "NotifyAccess": "main", "KillMode": "mixed"}, name
        assert unit.get("Service", "KillSignal") == "SIGTERM"
        assert unit.get("Service", "User") == "tradeplat"
        assert unit.get("Service", "WorkingDirectory") == PROJECT
        assert unit.get("Service", "EnvironmentFile") == "/etc/tradeplat/tradeplat.env"
        assert unit.get("Service", "LoadCredential") == "tp:/etc/tradeplat/secrets"
        assert unit.get("Service", "Restart") == "always"
        assert unit.get("Service", "RestartSec")
        assert unit.get("Service", "SyslogIdentifier").startswith("trading-")
        assert unit.get("Unit", "PartOf") == "trading.target"
        assert unit.get("Install", "WantedBy") == "trading.target"
        assert "network-online.target" in unit.get("Unit", "Wants").split()
        argv = shlex.split(unit.get("Service", "ExecStart"))
        assert argv[:2] == [f"{PROJECT}/.venv/bin/python", "-m"]
        assert (ROOT / argv[2].replace(".", "/") / "__main__.py").is_file(), argv
        # No secret ever in the environment: they come as credentials.
        environment = " ".join(unit.all("Service", "Environment"))
        assert "PASSWORD" not in environment and "SECRET" not in environment
        if "worker" not in name and "artifact" not in name:
            assert name in wanted, f"trading.target does not want {name}"


def test_units_verify_cleanly_and_score_low_exposure(tmp_path: Path) -> None:
    """``systemd-analyze verify`` prints nothing (typos only warn, exit 0, so any line fails).

    The worker template is verified as the instance ``trading-worker@0.service``. A typo'd copy
    must print a line, so an empty output means verify did look. Exposure scores are printed
    (``pytest -s``) and bounded by ``EXPOSURE_MAX`` (the worker: ``EXPOSURE_MAX_WORKER``).
    """
    analyze = require_tool("systemd-analyze")
    secrets, env_file = tmp_path / "secrets", tmp_path / "tradeplat.env"
    secrets.mkdir()
    shutil.copy(UNITS / "tradeplat.env.example", env_file)
    copies = [
        local_copy(path, tmp_path, secrets, env_file)
        for path in sorted(UNITS.iterdir())
        if path.suffix in {".service", ".target"}
    ]
    assert len(copies) == 6
    verify = subprocess.run(
        [analyze, "verify", *copies], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    problems = [
        line
        for line in (verify.stdout + verify.stderr).splitlines()
        if line.strip() and not any(ok in line for ok in HARMLESS)
    ]
    assert verify.returncode == 0 and problems == [], "\n".join(problems)

    typo = tmp_path / "typo.service"
    typo.write_text(copies[0].read_text().replace("KillMode=", "KilMode="))
    caught = subprocess.run([analyze, "verify", typo], capture_output=True, text=True, timeout=60)
    assert "Unknown key 'KilMode'" in caught.stdout + caught.stderr

    scores = {}
    for copy in copies:
        if copy.suffix != ".service":
            continue
        shown = subprocess.run(
            [analyze, "security", "--offline=yes", copy], capture_output=True, text=True, timeout=60
        )
        found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", shown.stdout)
        assert found, shown.stdout + shown.stderr
        scores[copy.name] = float(found[1])
    print("systemd-analyze security exposure:", scores)
    for name, score in scores.items():
        limit = EXPOSURE_MAX_WORKER if name.startswith("trading-worker@") else EXPOSURE_MAX
        assert score <= limit, f"{name}: exposure {score} > {limit}"


def test_worker_stop_timeout_outlasts_its_drain() -> None:
    """The worker's ``TimeoutStopSec`` exceeds the longest drain with the default settings.

    Past ``TimeoutStopSec`` systemd SIGKILLs the whole cgroup: a task the worker is still
    finishing or handing back would be lost with it (left for the lease reaper).
    """
    unit = parse_unit(UNITS / "trading-worker@.service")
    longest = Settings(_env_file=None).worker_stop_bound_s
    assert seconds(unit.get("Service", "TimeoutStopSec")) > longest
    for name in KINDS:  # every service stops within systemd's patience
        assert seconds(parse_unit(UNITS / name).get("Service", "TimeoutStopSec")) >= 10


def test_sd_notify_sends_datagrams_to_path_and_abstract_sockets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sd_notify(3)'s protocol: one datagram of ``KEY=VALUE`` lines; ``@`` = abstract socket.

    Without ``$NOTIFY_SOCKET``, or with a socket nobody listens on, it returns False and raises
    nothing (a service must not die with its supervisor's socket).
    """
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify("READY=1") is False
    abstract = f"@tradeplat-test-{uuid.uuid4().hex}"
    for address, bind_to in ((str(tmp_path / "n.sock"), None), (abstract, "\0" + abstract[1:])):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
            listener.bind(bind_to or address)
            monkeypatch.setenv("NOTIFY_SOCKET", address)
            assert sd_notify("READY=1", "STATUS=running") is True
            assert listener.recv(4096) == b"READY=1\nSTATUS=running"
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody.sock"))
    assert sd_notify("STOPPING=1") is False


class NotifyListener:
    """A ``$NOTIFY_SOCKET`` (abstract) that records each datagram's fields and sender pid.

    The sender's pid comes from the kernel (``SO_PASSCRED``), as systemd checks it for
    ``NotifyAccess=main``.
    """

    def __init__(self) -> None:
        self.address = f"@tradeplat-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + self.address[1:])
        self.sock.setblocking(False)
        self.received: list[tuple[int, list[str]]] = []

    def drain(self) -> None:
        while True:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except BlockingIOError:
                return
            pid = next(
                struct.unpack("3i", d[:12])[0]
                for level, kind, d in ancillary
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
            )
            self.received.append((pid, data.decode().split("\n")))

    def fields_from(self, pid: int) -> list[str]:
        self.drain()
        return [f for sender, fields in self.received if sender == pid for f in fields]

    async def wait_for(self, pid: int, wanted: str, timeout: float, log: Path) -> None:
        deadline = time.monotonic() + timeout
        while wanted not in self.fields_from(pid):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no {wanted} from {pid} in {self.received}:\n{log.read_text()[-3000:]}"
                )
            await asyncio.sleep(0.05)


@dataclass
class UnitProcess:
    """A service started from its unit's ``ExecStart=``, as systemd would start it."""

    unit: Unit
    kind: str
    env: dict[str, str]
    proc: subprocess.Popen[bytes]
    log: Path
    notify: NotifyListener

    @property
    def stop_timeout_s(self) -> float:
        return seconds(self.unit.get("Service", "TimeoutStopSec"))


def start_unit(name: str, settings: Settings, tmp: Path, **env: str) -> UnitProcess:
    """Start ``name`` (instance 0 of a template) with its unit's command, folder and environment.

    The environment is the unit's ``Environment=`` lines, then ``env`` in the role of the env file
    (which systemd reads after them): the test's broker, Redis, namespace and folders.
    """
    unit = parse_unit(UNITS / name)
    argv = shlex.split(expand(unit.get("Service", "ExecStart")))
    assert argv[0] == f"{PROJECT}/.venv/bin/python"
    cwd = unit.get("Service", "WorkingDirectory").replace(PROJECT, str(ROOT))
    unit_env: dict[str, str] = {}
    for line in unit.all("Service", "Environment"):
        for assignment in shlex.split(expand(line)):
            key, _, value = assignment.partition("=")
            unit_env[key] = value
    notify = NotifyListener()
    full = service_environment(
        settings, os.environ, **{**unit_env, **env, "NOTIFY_SOCKET": notify.address}
    )
    log = tmp / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, *argv[1:]],
            cwd=cwd,
            env=full,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return UnitProcess(unit, KINDS[name], full, proc, log, notify)


async def healthcheck(service: UnitProcess) -> tuple[int, str]:
    """``python -m shared.healthcheck <kind>`` with the service's settings: (status, output)."""
    env = {k: v for k, v in service.env.items() if k != "NOTIFY_SOCKET"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "shared.healthcheck",
        service.kind,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode()


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (read from ``/proc``; zombies count as gone)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            children.setdefault(stat[1], []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of ``pid``, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state, ppid = text.rpartition(")")[2].split()[:2]
    return state, int(ppid)


async def stop_like_systemd(service: UnitProcess) -> float:
    """SIGTERM to the main process only (``KillMode=mixed``); its exit status 0 within the unit's
    ``TimeoutStopSec`` and a ``STOPPING=1`` from it. Returns how long the stop took (s)."""
    started = time.monotonic()
    service.proc.send_signal(signal.SIGTERM)
    try:
        code = await asyncio.to_thread(service.proc.wait, service.stop_timeout_s)
    except subprocess.TimeoutExpired:
        service.proc.kill()  # what systemd does then, to the whole cgroup
        raise AssertionError(f"{service.unit.name} outlived TimeoutStopSec") from None
    took = time.monotonic() - started
    assert code == 0, f"{service.unit.name} exited {code}:\n{service.log.read_text()[-3000:]}"
    assert "STOPPING=1" in service.notify.fields_from(service.proc.pid), service.notify.received
    return took


async def test_units_run_notify_ready_pass_healthcheck_and_drain_on_sigterm(
    settings: Settings, client: DistributedClient, repos: Repos, tmp_path: Path
) -> None:
    """The five services, each started from its unit, over the real RabbitMQ and Redis.

    Each sends ``READY=1`` from its main process (``NotifyAccess=main``) and then passes its
    health check. A probe task then runs on the worker (instance 0: named ``<host>-gpu0``) and
    the worker gets SIGTERM alone, as systemd sends it: it lets the task finish (completed on
    the first attempt: drained, not lost), ends every process it started itself (nothing left
    for systemd's final SIGKILL), exits 0 well within ``TimeoutStopSec`` and says
    ``STOPPING=1``; the other services keep running and then stop the same way.
    """
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    per_unit = {
        "trading-scheduler.service": {},
        "trading-worker@.service": WORKER_ENV,
        # Named after the desktop's worker, as compose sets it: its health check must follow.
        "trading-git-sync.service": {"TP_CODE_DIR": str(repos.desktop), "TP_WORKER_NAME": "desk-1"},
        "trading-artifact-sync.service": {
            "TP_ARTIFACT_BACKEND": "path",
            "TP_ARTIFACT_DIR": str(artifacts),
        },
        "trading-health-monitor.service": {"TP_HEALTH_PORT": "0"},
    }
    # The env file's part: the test's data folder instead of /var/lib/tradeplat.
    common = {"TP_DATA_DIR": str(settings.data_dir)}
    services = [start_unit(n, settings, tmp_path, **common, **e) for n, e in per_unit.items()]
    try:
        for s in services:
            await s.notify.wait_for(s.proc.pid, "READY=1", 60, s.log)
            assert "STATUS=running" in s.notify.fields_from(s.proc.pid)
        checks = await asyncio.gather(*(healthcheck(s) for s in services))
        for s, (code, out) in zip(services, checks, strict=True):
            assert code == 0, f"{s.kind}: {out}"
            assert f"{s.kind} " in out and " alive" in out

        worker = next(s for s in services if s.kind == "gpu-worker")
        others = [s for s in services if s is not worker]
        task = await client.submit("probe", {"sleep_s": 3, "steps": 6})
        running = await wait_state(client, task.task_id, TaskState.RUNNING)
        assert running.worker == f"{socket.gethostname()}-gpu0"
        await asyncio.sleep(0.5)  # the task's child is at work
        below = descendants(worker.proc.pid)
        assert below, "the worker runs its task in child processes"

        signalled_at = time.time()
        took = await stop_like_systemd(worker)
        record = await client.status(task.task_id)
        assert record.state is TaskState.COMPLETED and record.attempts == 1, record
        assert record.completed_at is not None and record.completed_at > signalled_at
        assert record.result is not None and record.result["pid"] in below
        assert [p for p in below if alive(p)] == []
        assert took < worker.stop_timeout_s
        assert all(s.proc.poll() is None for s in others)

        stops = await asyncio.gather(*(stop_like_systemd(s) for s in others))
        print("stop times (s):", dict(zip([s.kind for s in others], stops, strict=True)))
    finally:
        for s in services:
            if s.proc.poll() is None:
                s.proc.kill()
                s.proc.wait()
            s.notify.sock.close()


async def test_unit_waiting_for_its_broker_says_so_in_status_not_ready(
    settings: Settings, tmp_path: Path
) -> None:
    """Before RabbitMQ answers, a service reports ``STATUS=waiting ...`` and no ``READY=1``.

    So ``systemctl status`` shows why it is still activating, and units ordered after it wait.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens here
    service = start_unit(
        "trading-scheduler.service",
        settings,
        tmp_path,
        TP_DATA_DIR=str(settings.data_dir),
        TP_AMQP_URL=f"amqp://guest:guest@127.0.0.1:{port}/",
    )
    try:
        deadline = time.monotonic() + 30
        while not any(
            f.startswith("STATUS=waiting for RabbitMQ/Redis")
            for f in service.notify.fields_from(service.proc.pid)
        ):
            assert time.monotonic() < deadline, service.log.read_text()[-3000:]
            await asyncio.sleep(0.05)
        assert "READY=1" not in service.notify.fields_from(service.proc.pid)
        service.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(service.proc.wait, service.stop_timeout_s) == 0
    finally:
        if service.proc.poll() is None:
            service.proc.kill()
            service.proc.wait()
        service.notify.sock.close()


def fake_nvidia_smi(folder: Path, gpus: int) -> Path:
    """A ``nvidia-smi`` whose ``-L`` lists ``gpus`` GPUs, as the real one prints them."""
    folder.mkdir()
    lines = "".join(f"GPU {i}: NVIDIA H200 (UUID: GPU-{i:08d})\\n" for i in range(gpus))
    script = folder / "nvidia-smi"
    script.write_text(f'#!/bin/sh\nprintf "{lines}"\n')
    script.chmod(0o755)
    return folder


def install(root: Path, *args: str, path: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if path is not None:
        env["PATH"] = f"{path}{os.pathsep}{env['PATH']}"
    done = subprocess.run(
        ["bash", str(INSTALL), "--root", str(root), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o7777


def test_install_script_into_a_root_installs_files_with_modes_and_enables_units(
    tmp_path: Path,
) -> None:
    """``install-systemd.sh --root``: units 0644, env file from the example 0640 (kept once
    edited), secrets 0700, data folder 0750; trading.target enabled for multi-user.target, one
    worker per GPU that ``nvidia-smi -L`` lists, artifact-sync only once storage is configured.
    ``--dry-run`` changes nothing."""
    require_tool("systemctl")
    root = tmp_path / "root"
    dry = install(root, "--dry-run")
    assert "+ install -m 0644" in dry.stdout and list(root.iterdir()) == []

    install(root, path=fake_nvidia_smi(tmp_path / "bin", 2))
    units = root / "etc/systemd/system"
    shipped = sorted(p.name for p in UNITS.iterdir() if p.suffix in {".service", ".target"})
    assert sorted(p.name for p in units.iterdir() if p.is_file()) == shipped
    assert {mode(units / name) for name in shipped} == {0o644}
    env_file = root / "etc/tradeplat/tradeplat.env"
    assert env_file.read_text() == (UNITS / "tradeplat.env.example").read_text()
    assert mode(env_file) == 0o640
    assert mode(root / "etc/tradeplat/secrets") == 0o700
    assert mode(root / "var/lib/tradeplat") == 0o750
    wants = units / "trading.target.wants"
    assert (units / "multi-user.target.wants/trading.target").is_symlink()
    assert sorted(p.name for p in wants.iterdir()) == [
        "trading-worker@0.service",
        "trading-worker@1.service",
    ]
    assert os.readlink(wants / "trading-worker@1.service") == (
        "/etc/systemd/system/trading-worker@.service"
    )

    env_file.write_text(env_file.read_text().replace("BACKEND=none", "BACKEND=s3"))
    install(root, "--gpus", "0")
    assert "TP_ARTIFACT_BACKEND=s3" in env_file.read_text()
    assert "trading-artifact-sync.service" in {p.name for p in wants.iterdir()}
