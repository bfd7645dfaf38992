"""Settings for every process, read once at start-up from the environment (``TP_*``) and ``.env``.

Every field here is documented in the README's settings table; a bad value is refused at start-up
with the variable's name (pydantic's ``ValidationError``), before anything is queued.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SecretsSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from shared.constants import CHILD_EXIT_GRACE_S, DEFAULT_MAX_MESSAGE_BYTES, HAND_BACK_BOUND_S
from shared.eventloop import EventLoopKind

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["auto", "json", "console"]
CommitCheck = Literal["warn", "refuse", "off"]
CodeUpdate = Literal["reexec", "exit", "ignore"]
ArtifactBackend = Literal["none", "s3", "path"]
ChecksumMode = Literal["when_supported", "when_required"]
AddressingStyle = Literal["auto", "path", "virtual"]
PartChecksum = Literal["crc32", "md5"]
FallbackMode = Literal["local", "never", "ask"]

#: The checkout this code runs from (``shared/`` sits at its top level).
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
#: Replaces a secret in logs, error messages and ``tradectl config show``.
REDACTED = "***"
#: ``scheme://user:password@`` in any text: the password part is redacted even when it is not one
#: of this process's own secrets (a URL quoted in a library's error, another machine's URL).
#: The scheme is bounded (32 characters): unbounded, a long run of letters made each match
#: attempt scan to its end, quadratic time (64 KB of letters took 4.5 s in a task's output).
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]{0,31}://[^:/?#@\s]*:)([^@/\s]+)(@)")
_URL_PASSWORD_BYTES = re.compile(_URL_PASSWORD.pattern.encode())


#: Error texts of refused credentials: aiormq (RabbitMQ), redis-py (Redis 6+ ACL and AUTH).
_AUTH_REFUSED = (
    "ACCESS_REFUSED",
    "invalid username-password",
    "WRONGPASS",
    "NOAUTH",
    "Authentication required",
)
#: Error texts of a TLS client talking to a plain port: garbage instead of a TLS record (the broker
#: answers AMQP's header), or silence until the timeout (Redis waits for a command).
_NOT_TLS = ("WRONG_VERSION_NUMBER", "record layer failure")
_SILENT = ("Timeout connecting", "timed out")
#: Error texts of a server dropping a connection that did not speak TLS to its TLS port.
_RESET = ("Connection reset", "connection reset", "Connection closed by server", "(104,")


def secrets_dir() -> Path | None:
    """The folder secret files are read from: ``TP_SECRETS_DIR``, else systemd's credentials.

    ``$CREDENTIALS_DIRECTORY`` is where systemd puts the files of a unit's ``LoadCredential=``;
    compose mounts its ``secrets:`` in ``/run/secrets`` (``TP_SECRETS_DIR=/run/secrets``).
    Only the environment is read (not ``.env``): the folder must be known before the settings.
    """
    raw = os.environ.get("TP_SECRETS_DIR") or os.environ.get("CREDENTIALS_DIRECTORY")
    return Path(raw) if raw else None


#: What ``Settings()`` raises for bad settings: a value that fails validation, or one that
#: cannot even be read (``TP_WORKER_PRELOAD=notjson``: pydantic-settings' ``SettingsError``).
SETTINGS_ERRORS = (ValidationError, SettingsError)


def describe_settings_error(error: ValidationError | SettingsError) -> str:
    """One line naming each bad variable: ``TP_WORKER_GPU_SLOTS: Input should be ...; ...``.

    Never the value itself (it may be a secret): pydantic's messages say what is wrong only.
    """
    if isinstance(error, SettingsError):
        return str(error).replace('from source "EnvSettingsSource"', "from the environment")
    parts = []
    for err in error.errors():
        loc = [str(p) for p in err["loc"]]
        message = err["msg"].removeprefix("Value error, ")
        parts.append(f"TP_{loc[0].upper()}: {message}" if loc else message)
    return "; ".join(parts)


class Settings(BaseSettings):
    """Platform settings. Env var = ``TP_`` + field name in upper case (``TP_AMQP_URL``)."""

    model_config = SettingsConfigDict(
        env_prefix="TP_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    amqp_url: str = Field(
        "amqp://guest:guest@127.0.0.1:5672/",
        description="RabbitMQ URL with credentials; amqps:// turns TLS on.",
    )
    amqp_password: SecretStr | None = Field(
        None,
        description=(
            "RabbitMQ password; replaces the one in TP_AMQP_URL, so the URL in an env file "
            "carries none (best read from the secret file tp_amqp_password)."
        ),
    )
    amqp_ca_file: Path | None = Field(None, description="CA bundle to verify the broker (TLS).")
    amqp_cert_file: Path | None = Field(None, description="Client certificate (mutual TLS).")
    amqp_key_file: Path | None = Field(None, description="Client key (mutual TLS).")
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis URL with credentials; rediss:// turns TLS on.",
    )
    redis_password: SecretStr | None = Field(
        None,
        description=(
            "Redis password (of the ACL user named in TP_REDIS_URL, else of the default user); "
            "replaces the one in the URL (best read from the secret file tp_redis_password)."
        ),
    )
    secrets_dir: Path | None = Field(
        None,
        description=(
            "Folder of secret files named after the lower-case variable (tp_amqp_password, "
            "tp_redis_password, tp_s3_secret_access_key, tp_health_token), read as those "
            "settings; default $CREDENTIALS_DIRECTORY (systemd LoadCredential=). Environment "
            "only; a variable set in the environment wins over its file."
        ),
    )
    redis_ca_file: Path | None = Field(None, description="CA bundle to verify Redis (TLS).")
    redis_cert_file: Path | None = Field(None, description="Client certificate for Redis (mTLS).")
    redis_key_file: Path | None = Field(None, description="Client key for Redis (mutual TLS).")
    namespace: str = Field(
        "tp",
        pattern=r"^[a-z][a-z0-9_-]{0,39}$",
        description="Prefix of every exchange, queue and Redis key; one platform per namespace.",
    )
    data_dir: Path = Field(Path("data"), description="Task folders, MLflow SQLite store, logs.")
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default sqlite:///<data_dir>/mlflow.db."
    )
    worker_name: str = Field(
        default_factory=socket.gethostname, description="This worker's name in records and events."
    )
    worker_gpu_slots: int = Field(
        1, ge=0, le=16, description="Tasks run at once from the gpu queue."
    )
    worker_cpu_slots: int = Field(
        1, ge=0, le=64, description="Tasks run at once from the cpu queue."
    )
    worker_preload: list[str] = Field(
        [
            "torch",
            "pandas",
            "mlflow.tracking",
            "services.gpu_worker.tasks.train_model",
            "services.gpu_worker.tasks.backtest",
            "services.gpu_worker.tasks.hyperopt",
            "services.gpu_worker.tasks.probe",
        ],
        description=(
            "Modules the worker's forkserver imports once, so each task starts warm (about 2.5 s "
            "saved per training, 0.5 s per backtest on 2 cores); none may initialise CUDA or "
            "start threads at import. The worker's task runner is always preloaded."
        ),
    )
    direct_dispatch: bool = Field(
        True,
        description=(
            "The client records a task without parents or start time as queued and publishes "
            "it to its lane itself (one broker hop); false sends every task through the "
            "scheduler's intake. Held tasks always go through the scheduler."
        ),
    )
    direct_dispatch_pump_after_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description=(
            "A directly dispatched task is also listed for the scheduler's dispatch pump this "
            "far ahead (s): if the client's own publish fails or never happens, the pump "
            "publishes it then."
        ),
    )
    worker_ack_hold_s: float = Field(
        60.0,
        ge=0.0,
        le=600.0,
        description=(
            "A claimed task's delivery stays unacked while the task runs, up to this long (s): "
            "its end acks it and the broker hands out the next task in one step. A longer task's "
            "delivery is acked then (consumer cancelled first). 0: ack right after the claim. "
            "Keep it far below RabbitMQ's consumer_timeout (30 min by default)."
        ),
    )
    worker_child_max_tasks: int = Field(
        100,
        ge=1,
        le=1_000_000,
        description=(
            "Tasks one child process runs, one after another, before it is replaced; a failed, "
            "stopped or timed-out task always retires its child (1: a fresh child per task)."
        ),
    )
    worker_gpu_isolate: bool = Field(
        False,
        description=(
            "A fresh child process for every task of the gpu queue (no CUDA state or memory "
            "carried from one training to the next), whatever TP_WORKER_CHILD_MAX_TASKS says."
        ),
    )
    task_timeout_s: float = Field(
        6 * 3600.0, gt=0, description="Default maximum run time of a task (s)."
    )
    max_attempts: int = Field(
        3,
        ge=1,
        le=100,
        description="Runs a task gets (worker lost, retryable error) before failing.",
    )
    retry_base_s: float = Field(
        2.0, gt=0, description="First retry back-off (s); doubles per attempt, full jitter."
    )
    retry_max_s: float = Field(300.0, gt=0, description="Longest retry back-off (s).")
    lease_s: float = Field(
        60.0, ge=1, description="Lease a worker holds on a running task (s); heartbeat = lease / 3."
    )
    reaper_interval_s: float = Field(
        5.0,
        gt=0,
        description="How often the scheduler looks for expired leases and due retries (s).",
    )
    cancel_grace_s: float = Field(
        10.0, ge=0, description="SIGTERM-to-SIGKILL grace for a cancelled or drained task (s)."
    )
    drain_timeout_s: float = Field(
        60.0, ge=0, description="On SIGTERM, how long a worker lets running tasks finish (s)."
    )
    redis_max_connections: int = Field(
        32, ge=1, le=10_000, description="Redis pool size; callers wait for a free connection."
    )
    max_message_bytes: int = Field(
        DEFAULT_MAX_MESSAGE_BYTES, ge=1024, description="Largest message body accepted (bytes)."
    )
    log_level: LogLevel = Field("info")
    event_loop: EventLoopKind = Field(
        "auto",
        description=(
            "A service's asyncio event loop: auto (uvloop when installed), uvloop, asyncio "
            "(shared/eventloop.py)."
        ),
    )
    log_format: LogFormat = Field("auto", description="auto: console on a TTY, JSON otherwise.")
    socket_timeout_s: float = Field(
        10.0, gt=0, description="Redis socket timeout, so no call hangs on a dead socket (s)."
    )
    code_dir: Path | None = Field(
        None,
        description=(
            "The platform's git checkout on this machine: the laptop pins tasks to its HEAD, "
            "git-sync keeps the desktop's current, the worker checks commits against it; "
            "default the checkout this code runs from."
        ),
    )
    commit_check: CommitCheck = Field(
        "warn",
        description=(
            "Submitting from a dirty or unpushed checkout: warn, refuse, or off (no commit "
            "recorded, tasks run on whatever the desktop has)."
        ),
    )
    commit_wait_s: float = Field(
        900.0,
        ge=0,
        description="How long a worker holds a task whose commit the desktop lacks (s).",
    )
    git_remote: str = Field(
        "origin", pattern=r"^[A-Za-z0-9_.-]+$", description="Remote git-sync fetches."
    )
    git_branch: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_./-]+$",
        description="Branch git-sync fast-forwards; default the branch checked out.",
    )
    git_sync_interval_s: float = Field(60.0, gt=0, description="Pause between two fetches (s).")
    git_timeout_s: float = Field(
        60.0, gt=0, description="A fetch running longer is killed with all its processes (s)."
    )
    worker_code_update: CodeUpdate = Field(
        "reexec",
        description=(
            "When the checkout moves to a new commit, the worker finishes its running tasks, then "
            "re-executes itself (reexec), exits 75 for systemd/compose to restart it (exit), or "
            "keeps running the old code (ignore)."
        ),
    )

    artifact_backend: ArtifactBackend = Field(
        "none",
        description=(
            "Where finished tasks' artifacts are copied: s3 (S3/MinIO), path (a mounted network "
            "drive), or none (they stay on the desktop's disk)."
        ),
    )
    artifact_dir: Path | None = Field(None, description="Root folder of the path backend.")
    artifact_prefix: str = Field(
        "tasks",
        pattern=r"^[A-Za-z0-9_./-]{0,200}$",
        description="Key prefix (S3) or sub-folder (path) holding one folder per task.",
    )
    s3_endpoint_url: str | None = Field(
        None, description="S3 endpoint for MinIO or another S3-compatible server; unset = AWS."
    )
    s3_bucket: str = Field(
        "tradeplat-artifacts",
        pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$",
        description="Bucket for artifacts.",
    )
    s3_region: str = Field("us-east-1", description="S3 region.")
    s3_access_key_id: str | None = Field(
        None, description="S3 access key; unset = the AWS default chain (AWS_* env, profiles)."
    )
    s3_secret_access_key: SecretStr | None = Field(None, description="S3 secret key.")
    s3_checksum: ChecksumMode = Field(
        "when_required",
        description=(
            "botocore's request_checksum_calculation and response_checksum_validation: "
            "when_required suits MinIO and other S3-compatible servers (uploads are verified by "
            "Content-MD5 and ETag either way); when_supported adds CRC checksums."
        ),
    )
    s3_part_checksum: PartChecksum = Field(
        "crc32",
        description=(
            "How each multipart part is verified: crc32 (x-amz-checksum-crc32, checked by the "
            "server on receipt; AWS, MinIO, Ceph RGW 17+) or md5 (the part's ETag, for servers "
            "without flexible checksums)."
        ),
    )
    s3_addressing_style: AddressingStyle = Field(
        "path", description="path suits MinIO and servers without bucket DNS names."
    )
    artifact_multipart_threshold_bytes: int = Field(
        16 * 1024 * 1024, ge=5 * 1024 * 1024, description="Files this large or more go multipart."
    )
    artifact_part_size_bytes: int = Field(
        8 * 1024 * 1024, ge=5 * 1024 * 1024, le=5 * 1024**3, description="Multipart part size."
    )
    artifact_concurrency: int = Field(
        32, ge=1, le=256, description="Files uploaded at once (parts of one file: at most 8)."
    )
    artifact_max_attempts: int = Field(
        4, ge=1, le=20, description="Tries of one artifact sync before it is marked failed."
    )
    artifact_retry_base_s: float = Field(
        2.0, gt=0, description="First back-off between artifact sync tries (s); doubles."
    )
    heartbeat_interval_s: float = Field(
        2.0, gt=0, le=60, description="Pause between two heartbeats of a service (s)."
    )
    heartbeat_ttl_s: float = Field(
        6.0,
        gt=0,
        le=600,
        description="A service whose heartbeat is older than this is offline (s).",
    )
    health_host: str = Field(
        "127.0.0.1", description="Address the health-monitor's HTTP server listens on."
    )
    health_port: int = Field(8400, ge=0, le=65535, description="Its port (0: any free port).")
    health_token: SecretStr | None = Field(
        None,
        description=(
            "Bearer token the health-monitor's HTTP requires on every path but /healthz "
            "(Authorization header, or ?token= once in the browser); unset = open."
        ),
    )
    health_interval_s: float = Field(
        1.0, gt=0, le=60, description="Pause between two health checks of the monitor (s)."
    )
    schedule_poll_s: float = Field(
        1.0,
        gt=0,
        le=60,
        description=(
            "How often the scheduler fires due schedules and releases tasks whose start time "
            "came (s): how late a firing or an --at start may be."
        ),
    )
    task_log_max_lines: int = Field(
        10_000, ge=100, le=1_000_000, description="Lines of output kept per task in Redis."
    )
    fallback: FallbackMode = Field(
        "local",
        description=(
            "When the desktop cannot run a task the client waits for: run it on this machine "
            "(local), never, or ask on the terminal (ask; never without one)."
        ),
    )
    fallback_start_timeout_s: float = Field(
        30.0,
        gt=0,
        description=(
            "With no worker online for the task's queue, how long a waiting client lets a "
            "queued task sit before running it locally (s)."
        ),
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Arguments, then the environment, then ``.env``, then the secret files' folder."""
        del file_secret_settings  # model_config names no folder; ours comes from the environment
        folder = secrets_dir()
        if folder is None or not folder.is_dir():  # a missing TP_SECRETS_DIR: _check_folder
            return init_settings, env_settings, dotenv_settings
        return (
            init_settings,
            env_settings,
            dotenv_settings,
            SecretsSettingsSource(settings_cls, secrets_dir=folder),
        )

    @field_validator("amqp_url")
    @classmethod
    def _check_amqp_url(cls, value: str) -> str:
        if urlsplit(value).scheme not in {"amqp", "amqps"}:
            raise ValueError("must start with amqp:// or amqps://")
        _check_parses(value)
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in {"redis", "rediss", "unix"}:
            raise ValueError("must start with redis://, rediss:// or unix://")
        _check_parses(value)
        options = {k.lower() for k, _ in parse_qsl(parts.query)}
        if any(k.startswith("ssl") for k in options):
            # redis-py would let ?ssl_cert_reqs=none or ?ssl_check_hostname=false turn off the
            # verification TP_REDIS_CA_FILE sets up: TLS options come from the TLS settings only.
            raise ValueError("TLS options are not taken from the URL (ssl_*): use TP_REDIS_CA_FILE")
        return value

    @field_validator("code_dir", "artifact_dir", "secrets_dir")
    @classmethod
    def _check_folder(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir():
            raise ValueError(f"no such folder: {value}")
        return value

    @model_validator(mode="after")
    def _apply_passwords(self) -> Settings:
        if self.amqp_password is not None:
            if not urlsplit(self.amqp_url).username:
                raise ValueError(
                    "TP_AMQP_PASSWORD: TP_AMQP_URL names no user (amqp://USER@host:5672/vhost)"
                )
            self.amqp_url = _with_password(self.amqp_url, self.amqp_password.get_secret_value())
        if self.redis_password is not None:
            if urlsplit(self.redis_url).scheme == "unix":
                raise ValueError("TP_REDIS_PASSWORD: not for unix:// URLs (put it in the URL)")
            self.redis_url = _with_password(self.redis_url, self.redis_password.get_secret_value())
        return self

    @model_validator(mode="after")
    def _check_storage(self) -> Settings:
        if self.artifact_backend == "path" and self.artifact_dir is None:
            raise ValueError("TP_ARTIFACT_DIR: required with TP_ARTIFACT_BACKEND=path")
        if (self.s3_access_key_id is None) != (self.s3_secret_access_key is None):
            raise ValueError("TP_S3_ACCESS_KEY_ID and TP_S3_SECRET_ACCESS_KEY: set both or neither")
        return self

    @model_validator(mode="after")
    def _check_heartbeat(self) -> Settings:
        if self.heartbeat_ttl_s <= self.heartbeat_interval_s:
            raise ValueError(
                "TP_HEARTBEAT_TTL_S: must be longer than TP_HEARTBEAT_INTERVAL_S "
                f"({self.heartbeat_ttl_s} <= {self.heartbeat_interval_s})"
            )
        return self

    @model_validator(mode="after")
    def _check_tls_files(self) -> Settings:
        for name in (
            "amqp_ca_file",
            "amqp_cert_file",
            "amqp_key_file",
            "redis_ca_file",
            "redis_cert_file",
            "redis_key_file",
        ):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"TP_{name.upper()}: no such file: {path}")
        for link in ("amqp", "redis"):
            ca, cert, key = (getattr(self, f"{link}_{kind}_file") for kind in ("ca", "cert", "key"))
            if ca is None and cert is None and key is None:
                continue
            try:  # load them now: a bad file is a bad setting (exit 2), not an endless retry
                context = ssl.create_default_context(cafile=str(ca) if ca else None)
                if cert is not None:
                    context.load_cert_chain(str(cert), str(key) if key else None)
            except (ssl.SSLError, OSError) as e:
                names = (
                    f"TP_{link.upper()}_CA_FILE" if cert is None else f"TP_{link.upper()}_*_FILE"
                )
                raise ValueError(f"{names}: cannot be used for TLS: {e}") from None
            if key is not None and cert is None:
                raise ValueError(f"TP_{link.upper()}_KEY_FILE: needs TP_{link.upper()}_CERT_FILE")
        return self

    @model_validator(mode="after")
    def _check_secrets(self) -> Settings:
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr) and not value.get_secret_value():
                raise ValueError(
                    f"TP_{name.upper()}: empty (an empty secret file?); unset it instead"
                )
        return self

    @property
    def tracking_uri(self) -> str:
        """MLflow tracking URI: the setting, else SQLite under ``data_dir``."""
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        return f"sqlite:///{(self.data_dir / 'mlflow.db').resolve()}"

    @property
    def worker_stop_bound_s(self) -> float:
        """Longest a worker takes to stop on SIGTERM (s): its drain, then its tasks' end.

        ``drain_timeout_s`` for running tasks to finish, then ``cancel_grace_s`` (SIGTERM to
        SIGKILL) + ``CHILD_EXIT_GRACE_S`` + ``HAND_BACK_BOUND_S`` for them to stop and go back
        to the queue. A supervisor must wait longer before it kills (systemd ``TimeoutStopSec``,
        compose ``stop_grace_period``), else a task still finishing is lost mid-way.
        """
        return self.drain_timeout_s + self.cancel_grace_s + CHILD_EXIT_GRACE_S + HAND_BACK_BOUND_S

    @property
    def checkout_dir(self) -> Path:
        """``code_dir``, else the checkout this code runs from."""
        return self.code_dir if self.code_dir is not None else PACKAGE_ROOT

    @property
    def tasks_dir(self) -> Path:
        """Folder that holds one sub-folder per task (artifacts, checkpoints)."""
        return self.data_dir / "tasks"

    def amqp_ssl_context(self) -> ssl.SSLContext | None:
        """TLS context for ``amqps://`` (verifying with ``amqp_ca_file`` if set), else ``None``."""
        if urlsplit(self.amqp_url).scheme != "amqps":
            return None
        context = ssl.create_default_context(
            cafile=str(self.amqp_ca_file) if self.amqp_ca_file else None
        )
        if self.amqp_cert_file:
            context.load_cert_chain(
                str(self.amqp_cert_file), str(self.amqp_key_file) if self.amqp_key_file else None
            )
        return context

    def redis_tls_kwargs(self) -> dict[str, Any]:
        """redis-py keyword arguments for ``rediss://`` (empty for ``redis://``).

        Verification is always on: the server's certificate must chain to ``redis_ca_file``
        (else the system's CAs) and name the host of the URL; a client certificate is sent
        when ``redis_cert_file`` is set (mutual TLS).
        """
        if urlsplit(self.redis_url).scheme != "rediss":
            return {}
        kwargs: dict[str, Any] = {"ssl_cert_reqs": "required", "ssl_check_hostname": True}
        if self.redis_ca_file:
            kwargs["ssl_ca_certs"] = str(self.redis_ca_file)
        if self.redis_cert_file:
            kwargs["ssl_certfile"] = str(self.redis_cert_file)
            kwargs["ssl_keyfile"] = str(self.redis_key_file) if self.redis_key_file else None
        return kwargs

    def secret_values(self) -> list[str]:
        """Every secret this process holds, as it may appear in text (raw and URL-quoted).

        The passwords of the broker, Redis and MLflow URLs and the ``SecretStr`` settings; what
        :meth:`redact_text` and the log processor (:mod:`shared.logging`) replace.
        """
        found: set[str] = set()
        for url in (self.amqp_url, self.redis_url, self.mlflow_tracking_uri or ""):
            parts = urlsplit(url)
            # guest/guest: a password that is its own user name hides nothing, and replacing it
            # everywhere would blank the user name too (URLs still redact it: redact_text).
            if parts.password and parts.password != parts.username:
                found.update({parts.password, unquote(parts.password)})
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr) and value.get_secret_value():
                secret = value.get_secret_value()
                found.update({secret, quote(secret, safe="")})
        return sorted((s for s in found if len(s) >= 3), key=len, reverse=True)

    def redact_text(self, text: str) -> str:
        """``text`` with every secret of :meth:`secret_values` and every URL password as ``***``."""
        return redact_text(text, self.secret_values())

    def connection_error(self, link: Literal["amqp", "redis"], error: BaseException) -> str:
        """Why connecting to the broker (``amqp``) or Redis failed, URL redacted, for errors.

        Tells apart refused credentials, a certificate not trusted (naming the CA setting), a
        plain connection to a TLS port (the server resets it) and an unreachable server, from
        the client library's error text (aiormq, redis-py and ``ssl`` word them differently).
        """
        what = "broker" if link == "amqp" else "Redis"
        url = self.amqp_url if link == "amqp" else self.redis_url
        ca = self.amqp_ca_file if link == "amqp" else self.redis_ca_file
        text = self.redact_text(str(error) or repr(error))
        var, tls = f"TP_{link.upper()}", urlsplit(url).scheme in {"amqps", "rediss"}
        trusted = f"{var}_CA_FILE={ca}" if ca else f"the system's CAs ({var}_CA_FILE unset)"
        other = f"{link}s" if not tls else link
        # (applies?, what it means); the first that applies names the cause.
        causes = (
            (
                any(m in text for m in _AUTH_REFUSED),
                f"refused the credentials (check {var}_URL's user, {var}_PASSWORD)",
            ),
            (
                "CERTIFICATE_VERIFY_FAILED" in text and "mismatch" in text,
                f"its TLS certificate does not name {urlsplit(url).hostname} (connect by a name "
                "or IP the certificate lists)",
            ),
            ("CERTIFICATE_VERIFY_FAILED" in text, f"TLS certificate not trusted by {trusted}"),
            (
                not tls and any(m in text for m in _RESET),
                f"closed the connection (a TLS-only port? use {other}://)",
            ),
            (
                tls and any(m in text for m in _NOT_TLS),
                f"not a TLS answer (a plain port? use {other}://, or the TLS port)",
            ),
            (
                tls and any(m in text for m in _SILENT),
                f"no answer (a firewall dropping it, or a plain port waiting for a command: use "
                f"{other}:// there, or the TLS port)",
            ),
        )
        for applies, meaning in causes:
            if applies:
                return f"{what} at {self.redact(url)}: {meaning}: {text}"
        return f"{what} unreachable at {self.redact(url)}: {text}"

    def redact(self, url: str) -> str:
        """``url`` with its password replaced by ``***``, for logs and error messages.

        Split at the last ``@`` of the authority (as the URL parser does), so a password with an
        unencoded ``@``, ``:`` or space is hidden whole.
        """
        scheme, sep, rest = url.partition("://")
        if not sep:
            return redact_text(url, self.secret_values())
        authority, slash, tail = rest.partition("/")
        userinfo, at, host = authority.rpartition("@")
        if at and ":" in userinfo:
            authority = f"{userinfo.split(':', 1)[0]}:{REDACTED}@{host}"
        return redact_text(f"{scheme}://{authority}{slash}{tail}", self.secret_values())

    def shown(self) -> Iterator[tuple[str, str, bool]]:
        """``(variable, value, set)`` per setting for ``tradectl config show``, secrets hidden.

        ``set`` says whether the value came from the environment, ``.env`` or a secret file
        rather than the default; secrets show as ``***`` (or empty when unset), URLs redacted.
        """
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                text = REDACTED if value.get_secret_value() else ""
            elif value is None:
                text = ""
            elif isinstance(value, list):
                text = ",".join(str(v) for v in value)
            else:
                text = self.redact_text(str(value))
            yield f"TP_{name.upper()}", text, name in self.model_fields_set


def redact_text(text: str, secrets: list[str]) -> str:
    """``text`` with each of ``secrets`` (longest first) and every URL password as ``***``."""
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return _URL_PASSWORD.sub(rf"\1{REDACTED}\3", text) if "://" in text else text


def _check_parses(url: str) -> None:
    """Refuse a URL the client libraries would misread, without repeating it (it has secrets).

    Raises:
        ValueError: the port is not a number (often a password with an unencoded ``/``, ``#``
            or ``?``, which ends the authority early).
    """
    try:
        urlsplit(url).port  # noqa: B018 - parsing it is the check
    except ValueError:
        raise ValueError(
            "cannot be parsed (its port is not a number); URL-encode / # ? @ and spaces in the "
            "user name and password, or set the password with TP_*_PASSWORD"
        ) from None


def redact_bytes(data: bytes, secrets: list[bytes]) -> bytes:
    """:func:`redact_text` for raw output (a task's stdout): ``secrets`` UTF-8 encoded."""
    for secret in secrets:
        data = data.replace(secret, REDACTED.encode())
    return _URL_PASSWORD_BYTES.sub(rb"\1***\3", data) if b"://" in data else data


def _with_password(url: str, password: str) -> str:
    """``url`` with its password set to ``password`` (URL-quoted), user and host kept."""
    parts = urlsplit(url)
    userinfo, _, host = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    netloc = f"{user}:{quote(password, safe='')}@{host}"
    return parts._replace(netloc=netloc).geturl()


def service_environment(
    settings: Settings, base: Mapping[str, str], **extra: str
) -> dict[str, str]:
    """The environment for a service started as a child process (tests, benchmarks, scripts).

    Args:
        settings: whose broker and Redis URLs, namespace, data folder and tracking URI it gets.
        base: the environment to start from (``os.environ``); its ``TP_*`` variables are dropped
            so nothing leaks in from the caller's shell.
        **extra: further variables, applied last (``TP_WORKER_GPU_SLOTS="0"``).

    Returns:
        A new mapping with JSON logs and unbuffered output set.
    """
    env = {k: v for k, v in base.items() if not k.startswith("TP_")}
    env.update(
        {
            "TP_AMQP_URL": settings.amqp_url,
            "TP_REDIS_URL": settings.redis_url,
            "TP_NAMESPACE": settings.namespace,
            "TP_DATA_DIR": str(settings.data_dir),
            "TP_MLFLOW_TRACKING_URI": settings.tracking_uri,
            "TP_LOG_FORMAT": "json",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env
