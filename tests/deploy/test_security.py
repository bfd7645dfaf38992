"""Security settings against real servers: TLS, least-privilege users, secrets kept out of logs.

A private redis-server (TLS-only port; started by compose's own entrypoint, so with its config
and ACL: default user off, the platform user confined to ``tp:*`` without admin or dangerous
commands) and a private RabbitMQ node (TLS-only listener; the platform user in its own vhost with
exactly the permission regexes compose's seed script writes) are started once for the module
with a test CA made by openssl. The platform (scheduler, worker, artifact-sync to a moto S3,
health-monitor with a token) then runs a task over them with every password read from secret
files, and no secret may appear in any output.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aio_pika
import boto3
import httpx
import pytest
import redis
import structlog
from aiormq.exceptions import AMQPError
from pydantic import SecretStr, ValidationError

from services.health_monitor.app import HealthMonitor
from services.health_monitor.http import TOKEN_COOKIE, create_app
from shared.broker import Broker
from shared.errors import BrokerError, StoreError
from shared.logging import configure_logging
from shared.settings import Settings, redact_bytes, redact_text
from shared.settings import describe_settings_error as describe
from shared.store import StatusStore
from tests.conftest import AMQP_URL, ServiceProcess, require, tradectl
from tests.private_rabbit import PrivateRabbit
from tests.test_service_lifecycle import free_port

NAMESPACE = "tp"
AMQP_USER, AMQP_PASSWORD, VHOST = "tradeplat", "amqp-Pw-7c1e9d", "tradeplat"
REDIS_USER, REDIS_PASSWORD = "tradeplat", "redis-Pw-42b8f0"
S3_SECRET = "s3-Secret-9a7d3e51"
HEALTH_TOKEN = "health-Token-5e2c77"
SECRETS = (AMQP_PASSWORD, REDIS_PASSWORD, S3_SECRET, HEALTH_TOKEN)
ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"


def make_certs(secrets: Path) -> Path:
    """scripts/make-certs.sh into ``secrets``: a fresh CA and a certificate for localhost."""
    env = os.environ | {"SECRETS_DIR": str(secrets)}
    subprocess.run(
        ["sh", str(ROOT / "scripts/make-certs.sh"), "localhost"],
        env=env,
        check=True,
        capture_output=True,
        timeout=60,
    )
    return secrets / "tls_ca.pem"


def seed_rabbitmq(secrets: Path, conf_dir: Path, tls_port: int) -> dict[str, str]:
    """infra/rabbitmq/seed-users.sh as compose runs it with the TLS overlay (dry run).

    Returns the platform user's ``vhost``, ``configure``, ``write`` and ``read`` (permission
    regexes) and ``tls`` (the TLS listener's conf lines, newline-joined).
    """
    env = os.environ | {
        "SEED_SECRETS_DIR": str(secrets),
        "SEED_CONF_DIR": str(conf_dir),
        "SEED_DRY_RUN": "1",
        "TP_NAMESPACE": NAMESPACE,
        "RABBITMQ_VHOST": VHOST,
        "RABBITMQ_PLATFORM_USER": AMQP_USER,
        "RABBITMQ_TLS_DIR": str(secrets),
        "RABBITMQ_TLS_PORT": str(tls_port),
    }
    subprocess.run(
        ["sh", str(INFRA / "rabbitmq/seed-users.sh")], env=env, check=True, capture_output=True
    )
    conf = dict(
        line.split(" = ", 1)
        for line in (conf_dir / "90-tradeplat-users.conf").read_text().splitlines()
        if " = " in line
    )
    prefix = f"default_users.{AMQP_USER}."
    assert conf[prefix + "vhost_pattern"] == f"^{VHOST}$"
    tls = (conf_dir / "80-tradeplat-tls.conf").read_text()
    assert f"listeners.ssl.default = {tls_port}" in tls, tls
    perms = {k: conf[prefix + k] for k in ("configure", "write", "read")}
    return {"vhost": VHOST, "tls": tls} | perms


@dataclass
class TlsStack:
    """The private servers and the files a platform process needs to reach them."""

    ca: Path
    other_ca: Path
    rabbit: PrivateRabbit
    redis_port: int
    redis_proc: subprocess.Popen[bytes]

    @property
    def amqp_url(self) -> str:
        return f"amqps://{AMQP_USER}@localhost:{self.rabbit.port}/{VHOST}"

    @property
    def redis_url(self) -> str:
        return f"rediss://{REDIS_USER}@localhost:{self.redis_port}/0"

    def settings(self, **overrides: object) -> Settings:
        values: dict[str, object] = {
            "amqp_url": self.amqp_url,
            "amqp_password": AMQP_PASSWORD,
            "amqp_ca_file": self.ca,
            "redis_url": self.redis_url,
            "redis_password": REDIS_PASSWORD,
            "redis_ca_file": self.ca,
            "namespace": NAMESPACE,
            "socket_timeout_s": 5.0,
            "_env_file": None,
        }
        return Settings(**(values | overrides))  # type: ignore[arg-type]


def start_tls_redis(folder: Path, secrets: Path) -> tuple[int, subprocess.Popen[bytes]]:
    """redis-server started by compose's entrypoint with the TLS overlay's settings.

    Its config and ACL (default user off, the platform user confined to ``tp:*`` without admin
    or dangerous commands), its TLS port from the certificates in ``secrets``; the plain port
    off (``--port 0``) so a plain client meets the TLS port.
    """
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server not installed")
    port = free_port()
    env = os.environ | {
        "REDIS_SECRETS_DIR": str(secrets),
        "REDIS_ACL_DIR": str(folder / "acl"),
        "REDIS_CONF": str(INFRA / "redis/redis.conf"),
        "REDIS_PLATFORM_USER": REDIS_USER,
        "REDIS_TLS_DIR": str(secrets),
        "REDIS_TLS_PORT": str(port),
        "TP_NAMESPACE": NAMESPACE,
    }
    proc = subprocess.Popen(
        [
            "sh", str(INFRA / "redis/entrypoint.sh"), "--port", "0", "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(folder),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while True:
        try:
            client = redis.Redis(
                host="localhost", port=port, ssl=True, ssl_ca_certs=str(secrets / "tls_ca.pem"),
                username=REDIS_USER, password=REDIS_PASSWORD, socket_timeout=1,
            )  # fmt: skip
            client.ping()
            client.close()
            return port, proc
        except redis.RedisError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise TimeoutError("private TLS redis did not start") from None
            time.sleep(0.05)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsStack]:
    folder = tmp_path_factory.mktemp("tls")
    secrets = folder / "secrets"  # as on the desktop: make-secrets.sh's names, make-certs.sh's
    secrets.mkdir(mode=0o700)
    (secrets / "tp_amqp_password").write_text(AMQP_PASSWORD)
    (secrets / "tp_redis_password").write_text(REDIS_PASSWORD)
    (secrets / "rabbitmq_admin_password").write_text("admin-" + uuid.uuid4().hex)
    ca = make_certs(secrets)
    other_ca = make_certs(folder / "other")  # another CA: trusts nothing of the first
    redis_port, redis_proc = start_tls_redis(folder, secrets)
    tls_port = free_port()
    user = seed_rabbitmq(secrets, folder / "conf.d", tls_port)
    rabbit = PrivateRabbit(folder / "rabbit", port=tls_port, tls_conf=user["tls"].splitlines())
    try:
        rabbit.start()
        perms = (user["configure"], user["write"], user["read"])
        rabbit.add_user(AMQP_USER, AMQP_PASSWORD, user["vhost"], perms)
        yield TlsStack(ca, other_ca, rabbit, redis_port, redis_proc)
    finally:
        rabbit.stop()
        redis_proc.kill()
        redis_proc.wait(10)


# --------------------------------------------------------------------------------------------
# Redis over TLS


async def _store_error(s: Settings) -> str:
    store = StatusStore(s)
    with pytest.raises(StoreError) as caught:
        await store.start()
    return str(caught.value)


async def test_rediss_with_the_ca_and_acl_user_works_and_stays_in_its_key_prefix(
    stack: TlsStack,
) -> None:
    store = StatusStore(stack.settings())
    await store.start()
    try:
        assert await store.redis.set(f"{NAMESPACE}:probe", "1")
        with pytest.raises(redis.exceptions.NoPermissionError):
            await store.redis.set("other:probe", "1")
        with pytest.raises(redis.exceptions.NoPermissionError):
            await store.redis.flushall()
        with pytest.raises(redis.exceptions.NoPermissionError):
            await store.redis.config_get("requirepass")
    finally:
        await store.redis.delete(f"{NAMESPACE}:probe")
        await store.stop()


async def test_rediss_refuses_a_wrong_ca_a_wrong_password_and_a_plain_connection(
    stack: TlsStack,
) -> None:
    wrong_ca = await _store_error(stack.settings(redis_ca_file=stack.other_ca))
    assert "TLS certificate not trusted by TP_REDIS_CA_FILE=" in wrong_ca, wrong_ca
    assert "CERTIFICATE_VERIFY_FAILED" in wrong_ca, wrong_ca

    no_ca = await _store_error(stack.settings(redis_ca_file=None))
    assert "not trusted by the system's CAs" in no_ca, no_ca

    wrong_password = await _store_error(stack.settings(redis_password="not-the-password"))
    assert "refused the credentials" in wrong_password, wrong_password
    assert "not-the-password" not in wrong_password

    plain = await _store_error(
        stack.settings(redis_url=f"redis://{REDIS_USER}@localhost:{stack.redis_port}/0")
    )
    assert "closed the connection" in plain and "use rediss://" in plain, plain
    for message in (wrong_ca, no_ca, wrong_password, plain):
        assert REDIS_PASSWORD not in message, message


# --------------------------------------------------------------------------------------------
# RabbitMQ over TLS


async def _broker_error(s: Settings) -> str:
    broker = Broker(s, name="test")
    with pytest.raises(BrokerError) as caught:
        await broker.start(timeout_s=10)
    return str(caught.value)


async def test_amqps_with_the_ca_works_and_the_user_is_held_to_the_platform_names(
    stack: TlsStack,
) -> None:
    s = stack.settings(namespace=f"{NAMESPACE}")
    broker = Broker(s, name="test")
    await broker.start()  # declares the whole topology: configure/write/read on tp.* suffice
    await broker.stop()
    connection = await aio_pika.connect(s.amqp_url, ssl_context=s.amqp_ssl_context())
    async with connection:
        channel = await connection.channel()
        with pytest.raises(AMQPError, match="ACCESS_REFUSED"):
            await channel.declare_queue("other.queue")
    # the node's own users: only the platform's user exists in the vhost, without tags
    users = stack.rabbit.ctl("list_users", "--formatter", "json")
    tags = {u["user"]: u["tags"] for u in json.loads(users)}
    assert tags[AMQP_USER] == [], tags


async def test_amqps_refuses_a_wrong_ca_a_wrong_password_and_a_plain_connection(
    stack: TlsStack,
) -> None:
    wrong_ca = await _broker_error(stack.settings(amqp_ca_file=stack.other_ca))
    assert "TLS certificate not trusted by TP_AMQP_CA_FILE=" in wrong_ca, wrong_ca

    wrong_password = await _broker_error(stack.settings(amqp_password="not-the-password"))
    assert "refused the credentials" in wrong_password, wrong_password
    assert "ACCESS_REFUSED" in wrong_password, wrong_password

    plain = await _broker_error(stack.settings(amqp_url=stack.amqp_url.replace("amqps", "amqp")))
    assert "closed the connection" in plain and "use amqps://" in plain, plain
    for message in (wrong_ca, wrong_password, plain):
        assert AMQP_PASSWORD not in message and "not-the-password" not in message, message


# --------------------------------------------------------------------------------------------
# A whole task run over TLS with secrets from files: no secret in any output


def write_secrets(folder: Path) -> Path:
    """The secret files a deployment mounts (compose secrets, systemd LoadCredential=)."""
    folder.mkdir(mode=0o700)
    for name, value in {
        "tp_amqp_password": AMQP_PASSWORD,
        "tp_redis_password": REDIS_PASSWORD,
        "tp_s3_secret_access_key": S3_SECRET,
        "tp_health_token": HEALTH_TOKEN,
    }.items():
        (folder / name).write_text(value + "\n")
    return folder


def deploy_env(stack: TlsStack, tmp: Path, **extra: str) -> dict[str, str]:
    """A service's environment as compose or a unit gives it: URLs without passwords."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TP_")}
    return env | {
        "TP_AMQP_URL": stack.amqp_url,
        "TP_AMQP_CA_FILE": str(stack.ca),
        "TP_REDIS_URL": stack.redis_url,
        "TP_REDIS_CA_FILE": str(stack.ca),
        "TP_SECRETS_DIR": str(tmp / "secrets"),
        "TP_NAMESPACE": NAMESPACE,
        "TP_DATA_DIR": str(tmp / "data"),
        "TP_MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
        "TP_WORKER_NAME": "tls-worker",
        "TP_LOG_FORMAT": "json",
        "TP_LOG_LEVEL": "debug",
        "TP_FALLBACK": "never",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def test_a_task_runs_over_tls_with_secret_files_and_no_secret_reaches_any_output(
    stack: TlsStack, tmp_path: Path, s3_endpoint: str
) -> None:
    write_secrets(tmp_path / "secrets")
    bucket = f"t-{uuid.uuid4().hex[:10]}"
    s3_env = {
        "TP_ARTIFACT_BACKEND": "s3",
        "TP_S3_ENDPOINT_URL": s3_endpoint,
        "TP_S3_BUCKET": bucket,
        "TP_S3_ACCESS_KEY_ID": "test",
    }
    env = deploy_env(stack, tmp_path, **s3_env)
    health_port = free_port()
    procs = [
        ServiceProcess(module, env | extra, tmp_path / f"{module}.log")
        for module, extra in (
            ("scheduler", {}),
            ("gpu_worker", {}),
            ("artifact_sync", {}),
            ("health_monitor", {"TP_HEALTH_PORT": str(health_port)}),
        )
    ]
    outputs: list[str] = []
    try:
        boto3.client(  # the bucket, as compose's one-shot job makes it on MinIO
            "s3", endpoint_url=s3_endpoint, aws_access_key_id="test",
            aws_secret_access_key=S3_SECRET, region_name="us-east-1",
        ).create_bucket(Bucket=bucket)  # fmt: skip
        submit = tradectl(
            "task", "submit", "probe", "--set", "sleep_s=0.3", "--set", "print_lines=3",
            "--wait", "--timeout", "60", "--json", env=env, timeout=90,
        )  # fmt: skip
        outputs += [submit.stdout, submit.stderr]
        assert submit.returncode == 0, submit.stdout + submit.stderr
        task_id = json.loads(submit.stdout)["task_id"]
        # A task whose error text holds a secret: recorded, printed and logged redacted.
        leaky = tradectl(
            "task", "submit", "probe", "--set", f"fail_with=no luck with {AMQP_PASSWORD}",
            "--wait", "--timeout", "60", "--json", env=env, timeout=90,
        )  # fmt: skip
        assert leaky.returncode == 1, leaky.stdout + leaky.stderr
        leaky_id = json.loads(leaky.stdout)["task_id"]
        failed = tradectl("task", "status", leaky_id, "--json", env=env)
        record = json.loads(failed.stdout)  # its config holds the text as given, not its error
        assert record["error"] == "RuntimeError: no luck with ***", record
        leaked_logs = tradectl("task", "logs", leaky_id, env=env)
        outputs += [leaked_logs.stdout, leaked_logs.stderr]
        for args in (
            ("task", "logs", task_id),
            ("task", "status", task_id),
            ("config", "show"),
            ("config", "show", "--json"),
        ):
            done = tradectl(*args, env=env)
            assert done.returncode == 0, (args, done.stdout, done.stderr)
            outputs += [done.stdout, done.stderr]
        shown = {row["variable"]: row for row in json.loads(outputs[-2])}
        assert shown["TP_AMQP_PASSWORD"] == {
            "variable": "TP_AMQP_PASSWORD",
            "value": "***",
            "set": True,
        }
        assert shown["TP_AMQP_URL"]["value"] == stack.amqp_url.replace(
            "tradeplat@", "tradeplat:***@"
        )
        assert shown["TP_S3_SECRET_ACCESS_KEY"]["value"] == "***"
        assert "ts=" in outputs[-8], outputs[-8]  # the task's own output lines came back

        base = f"http://127.0.0.1:{health_port}"
        deadline = time.monotonic() + 20
        while True:  # the monitor's HTTP: its token from the secret file is required
            try:
                refused = httpx.get(f"{base}/api/workers", timeout=5)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert refused.status_code == 401
        auth = {"Authorization": f"Bearer {HEALTH_TOKEN}"}
        workers = httpx.get(f"{base}/api/workers", headers=auth, timeout=5)
        assert workers.status_code == 200
        assert [w["heartbeat"]["name"] for w in workers.json()] == ["tls-worker"], workers.text

        deadline = time.monotonic() + 30
        while True:  # artifact-sync uploaded the task folder with the secret key from its file
            status = tradectl("artifacts", "status", task_id, "--json", env=env)
            if '"synced"' in status.stdout or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        outputs += [status.stdout, status.stderr]
        assert '"synced"' in status.stdout, status.stdout + status.stderr
    finally:
        codes = [p.stop() for p in procs]
    logs = [p.log_text() for p in procs]
    assert codes == [0, 0, 0, 0], [
        (p.module, c, p.log_text()[-2000:]) for p, c in zip(procs, codes, strict=True)
    ]
    for log in logs:
        assert '"event": "service_started"' in log, log[-2000:]
    for text in [*logs, *outputs]:
        for secret in SECRETS:
            assert secret not in text, f"{secret!r} leaked:\n{text[-3000:]}"


# --------------------------------------------------------------------------------------------
# Pieces without the servers


def test_log_lines_redact_secrets_in_events_library_records_and_tracebacks(
    capfd: pytest.CaptureFixture[str],
) -> None:
    s = Settings(
        amqp_url="amqp://tradeplat@127.0.0.1:5672/tradeplat",
        amqp_password=AMQP_PASSWORD,
        redis_password=REDIS_PASSWORD,
        s3_secret_access_key=SecretStr(S3_SECRET),
        s3_access_key_id="test",
        health_token=HEALTH_TOKEN,
        log_format="json",
        _env_file=None,
    )
    configure_logging(s, service="test")
    log = structlog.get_logger("shared.test")
    log.info("connecting", url=s.amqp_url, nested={"urls": [s.redis_url]}, token=HEALTH_TOKEN)
    logging.getLogger("aiormq.connection").warning("reconnecting to %s", s.amqp_url)
    try:
        raise RuntimeError(f"S3 said no to {S3_SECRET} via http://u:other-pass@h/")
    except RuntimeError:
        log.exception("upload_failed")
    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines()]
    text = json.dumps(lines)
    assert len(lines) == 3, lines
    for secret in (*SECRETS, "other-pass"):
        assert secret not in text, text
    assert lines[0]["url"] == "amqp://tradeplat:***@127.0.0.1:5672/tradeplat", lines[0]
    assert lines[0]["token"] == "***" and "Traceback" in lines[2]["exception"], lines


def test_config_show_hides_secrets_from_the_environment_and_from_files(tmp_path: Path) -> None:
    secrets = write_secrets(tmp_path / "secrets")
    (secrets / "tp_health_token").unlink()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TP_")} | {
        "TP_SECRETS_DIR": str(secrets),
        "TP_AMQP_URL": "amqps://tradeplat@desktop.lan:5671/tradeplat",
        "TP_REDIS_URL": f"rediss://tradeplat:{REDIS_PASSWORD}@desktop.lan:6380/0",
        "TP_HEALTH_TOKEN": HEALTH_TOKEN,  # from the environment, beside the files
        "TP_S3_ACCESS_KEY_ID": "minio",
    }
    shown = tradectl("config", "show", "--set", env=env)
    assert shown.returncode == 0, shown.stderr
    for secret in SECRETS:
        assert secret not in shown.stdout + shown.stderr
    for variable in ("TP_AMQP_PASSWORD", "TP_S3_SECRET_ACCESS_KEY", "TP_HEALTH_TOKEN"):
        assert variable in shown.stdout, shown.stdout
    assert "amqps://tradeplat:***@desktop.lan:5671/tradeplat" in shown.stdout, shown.stdout

    missing = tradectl("config", "show", env=env | {"TP_SECRETS_DIR": str(tmp_path / "nope")})
    assert missing.returncode == 2 and "TP_SECRETS_DIR: no such folder" in missing.stderr


def test_passwords_and_secret_files_apply_to_urls_and_env_wins_over_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets = write_secrets(tmp_path / "secrets")
    monkeypatch.setenv("TP_SECRETS_DIR", str(secrets))
    monkeypatch.setenv("TP_REDIS_PASSWORD", "from-env")
    monkeypatch.setenv("TP_S3_ACCESS_KEY_ID", "test")
    s = Settings(amqp_url="amqp://tradeplat@h:5672/v", redis_url="redis://h:6379/0", _env_file=None)
    assert s.amqp_url == f"amqp://tradeplat:{AMQP_PASSWORD}@h:5672/v"
    assert s.redis_url == "redis://:from-env@h:6379/0"
    assert s.s3_secret_access_key is not None
    assert s.s3_secret_access_key.get_secret_value() == S3_SECRET
    assert s.health_token is not None and s.health_token.get_secret_value() == HEALTH_TOKEN
    monkeypatch.delenv("TP_SECRETS_DIR")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(secrets))  # systemd's LoadCredential=
    assert (
        Settings(amqp_url="amqp://u@h/", _env_file=None).amqp_url == f"amqp://u:{AMQP_PASSWORD}@h/"
    )
    with pytest.raises(ValidationError, match="names no user"):
        Settings(amqp_url="amqp://h:5672/", _env_file=None)


async def test_health_http_requires_the_token_except_on_healthz(tmp_path: Path) -> None:
    s = Settings(health_token=HEALTH_TOKEN, data_dir=tmp_path, _env_file=None)
    transport = httpx.ASGITransport(app=create_app(HealthMonitor(s)))
    async with httpx.AsyncClient(transport=transport, base_url="http://monitor") as http:
        assert (await http.get("/healthz")).status_code == 503  # open: "starting", no snapshot
        for path in ("/", "/metrics", "/api/workers", "/api/stream", "/static/dashboard.js"):
            refused = await http.get(path)
            assert refused.status_code == 401, path
            assert refused.headers["www-authenticate"] == "Bearer"
        wrong = await http.get("/metrics", headers={"Authorization": "Bearer wrong"})
        assert wrong.status_code == 401
        ok = await http.get("/metrics", headers={"Authorization": f"Bearer {HEALTH_TOKEN}"})
        assert ok.status_code == 200 and "tradeplat_" in ok.text
        login = await http.get(f"/?token={HEALTH_TOKEN}&x=1")
        assert login.status_code == 303 and HEALTH_TOKEN not in login.headers["location"]
        assert login.headers["location"].endswith("/?x=1")
        cookie = login.headers["set-cookie"]
        assert f"{TOKEN_COOKIE}=" in cookie and "httponly" in cookie.lower()
        assert "samesite=strict" in cookie.lower()
        assert (await http.get("/")).status_code == 200  # the client kept the cookie
    open_app = create_app(HealthMonitor(Settings(data_dir=tmp_path, _env_file=None)))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=open_app), base_url="http://monitor"
    ) as http:
        assert (await http.get("/metrics")).status_code == 200


# --------------------------------------------------------------------------------------------
# Found by a breaker's pass: each of these leaked or misled before


def test_urls_with_unencoded_characters_are_redacted_whole_or_refused() -> None:
    s = Settings(redis_url="redis://tradeplat:p@ss0rdX@127.0.0.1:6399/0", _env_file=None)
    assert s.redact(s.redis_url) == "redis://tradeplat:***@127.0.0.1:6399/0"
    spaced = Settings(amqp_url="amqp://tradeplat:pa ss0rdX@127.0.0.1:5673/", _env_file=None)
    assert spaced.redact(spaced.amqp_url) == "amqp://tradeplat:***@127.0.0.1:5673/"
    with pytest.raises(ValidationError) as refused:
        Settings(amqp_url="amqp://tradeplat:pa/ss0rdX@127.0.0.1:5673/", _env_file=None)
    assert "cannot be parsed" in str(refused.value) and "ss0rdX" not in describe(refused.value)


def test_redaction_of_long_unbroken_output_does_not_stall_the_task() -> None:
    """A long run of letters (a base64 blob, a progress bar without line ends) is redacted in
    linear time: the URL pattern once scanned the whole run from every letter (256 KB took
    about 70 s, stalling the task's child). Still finds a URL password inside such a run."""
    blob = "a" * 256 * 1024
    started = time.monotonic()
    assert redact_bytes(blob.encode(), []) == blob.encode()
    assert redact_text(blob + " amqp://u:" + blob + "@h/", []) == blob + " amqp://u:***@h/"
    assert time.monotonic() - started < 5, "redaction is not linear in the text's length"


def test_redis_tls_verification_cannot_be_switched_off_from_the_url() -> None:
    for query in ("ssl_cert_reqs=none", "ssl_check_hostname=false", "SSL_CA_CERTS=/x"):
        with pytest.raises(ValidationError, match="TLS options are not taken from the URL"):
            Settings(redis_url=f"rediss://localhost:6380/0?{query}", _env_file=None)


def test_bad_tls_files_empty_secrets_and_unreadable_settings_are_refused_at_start(
    tmp_path: Path,
) -> None:
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate\n")
    with pytest.raises(ValidationError, match="TP_REDIS_CA_FILE: cannot be used for TLS"):
        Settings(redis_ca_file=not_pem, _env_file=None)
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "tp_amqp_password").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TP_")}
    empty = tradectl("config", "show", env=env | {"TP_SECRETS_DIR": str(secrets)})
    assert empty.returncode == 2 and "TP_AMQP_PASSWORD: empty" in empty.stderr, empty.stderr
    unreadable = tradectl("config", "show", env=env | {"TP_WORKER_PRELOAD": "notjson"})
    assert unreadable.returncode == 2, unreadable.stderr
    assert "worker_preload" in unreadable.stderr and "Traceback" not in unreadable.stderr


async def test_a_tls_client_on_a_plain_port_is_told_so() -> None:
    require("RabbitMQ", AMQP_URL, 5672)
    plain = urlsplit(AMQP_URL)
    s = Settings(amqp_url=AMQP_URL.replace("amqp://", "amqps://", 1), _env_file=None)
    message = await _broker_error(s)
    assert "not a TLS answer" in message and "use amqp://" in message, message
    assert (
        plain.password is None or plain.password == plain.username or plain.password not in message
    )


def test_task_output_and_errors_are_redacted_in_the_child(tmp_path: Path) -> None:
    """The task child's captured lines, the copy on the worker's stderr and the error it reports.

    MLflow prints run URLs with the tracking server's credentials; a task may print or raise
    with a secret in the text. Run in a process of its own: the capture takes over fds 1 and 2.
    """
    script = tmp_path / "child.py"
    script.write_text(
        "import sys, time\n"
        "from services.gpu_worker.capture import OutputCapture\n"
        "sent = []\n"
        f"capture = OutputCapture(1, sent.append, [{AMQP_PASSWORD!r}])\n"
        "capture.start()\n"
        f"print('View run at http://mlu:MlflowPw_777@h:5000/#/runs/1 and {AMQP_PASSWORD}')\n"
        f"sys.stdout.write('{AMQP_PASSWORD[:5]}')\n"
        "sys.stdout.flush()\n"
        f"sys.stdout.write('{AMQP_PASSWORD[5:]} split across writes\\n')\n"
        "sys.stdout.flush()\n"
        "time.sleep(0.3)\n"
        "capture.stop()\n"
        "lines = [l.text for kind, batch in sent for l in batch]\n"
        "print('CAPTURED', lines, file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "CAPTURED" in done.stderr and "***" in done.stderr, done.stderr
    for text in (done.stdout, done.stderr):
        assert AMQP_PASSWORD not in text and "MlflowPw_777" not in text, text
    assert "View run at http://mlu:***@h:5000/" in done.stdout, done.stdout
