"""artifact-sync against a real S3 server (moto's server mode on loopback) and a real folder.

The service runs as a real process (end to end) or in the test's event loop (failure injection,
request counting); RabbitMQ and Redis are the real ones.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import signal
import time
import uuid
from pathlib import Path
from typing import IO

import boto3
import pytest
from pydantic import SecretStr

from services.artifact_sync.app import ArtifactSync
from shared.artifacts import ArtifactRequest, ArtifactState
from shared.client import DistributedClient
from shared.downloads import download_artifacts
from shared.messages import TaskState
from shared.settings import Settings
from shared.storage import Manifest, ManifestEntry, UnsafeNameError, safe_relpath
from shared.storage.base import open_binary
from shared.topology import Topology
from tests.conftest import LIGHT_WORKER, Platform, service_env, tradectl

MiB = 1024 * 1024
WAIT_S = 120


@pytest.fixture
def s3_settings(settings: Settings, s3_endpoint: str) -> Settings:
    """The test's settings with a fresh bucket on the moto server."""
    bucket = f"t-{settings.namespace}"
    s = settings.model_copy(
        update={
            "artifact_backend": "s3",
            "s3_endpoint_url": s3_endpoint,
            "s3_bucket": bucket,
            "s3_access_key_id": "test",
            "s3_secret_access_key": SecretStr("test"),
            "artifact_retry_base_s": 0.1,
        }
    )
    s3 = s3_client(s)
    s3.create_bucket(Bucket=bucket)
    return s


def s3_client(s: Settings):
    return boto3.client(
        "s3",
        endpoint_url=s.s3_endpoint_url,
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
    )


def storage_env(s: Settings, **extra: str) -> dict[str, str]:
    env = {"TP_ARTIFACT_BACKEND": s.artifact_backend, "TP_ARTIFACT_RETRY_BASE_S": "0.1"}
    if s.artifact_backend == "s3":
        env |= {
            "TP_S3_ENDPOINT_URL": str(s.s3_endpoint_url),
            "TP_S3_BUCKET": s.s3_bucket,
            "TP_S3_ACCESS_KEY_ID": "test",
            "TP_S3_SECRET_ACCESS_KEY": "test",
        }
    else:
        env["TP_ARTIFACT_DIR"] = str(s.artifact_dir)
    return env | extra


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): sha256(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".tp-partial" not in p.name
    }


async def wait_artifacts(client: DistributedClient, task_id: str, state: ArtifactState):
    deadline = time.monotonic() + WAIT_S
    while True:
        found = await client.artifact_status(task_id)
        if found and found[0].state is state:
            return found[0]
        assert time.monotonic() < deadline, found
        await asyncio.sleep(0.1)


# --- names -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("artifacts/model v1: final.pt", "artifacts/model v1: final.pt"),
        ("artifacts\\windows\\équité.csv", "artifacts/windows/équité.csv"),
        ("artifacts/./a//b.txt", "artifacts/a/b.txt"),
        ("e\u0301t\u00e9.txt", "\u00e9t\u00e9.txt"),  # NFD -> NFC: one key on every OS
    ],
)
def test_names_are_normalised(name: str, expected: str) -> None:
    assert safe_relpath(name) == expected


@pytest.mark.parametrize(
    "name", ["../escape", "a/../../b", "/etc/passwd", "C:\\x", "..\\..\\x", "", "a\nb", "./."]
)
def test_names_that_escape_are_refused(name: str) -> None:
    with pytest.raises(UnsafeNameError):
        safe_relpath(name)


# --- end to end --------------------------------------------------------------------------------


async def test_train_model_artifacts_reach_the_bucket_and_download_elsewhere(
    platform: Platform, s3_settings: Settings, tmp_path: Path
) -> None:
    env = storage_env(s3_settings)
    platform.start("artifact_sync", **env)
    await platform.start_all(**env)
    async with DistributedClient(s3_settings) as client:
        config = {"dataset": "GOOG", "epochs": 2, "hidden_size": 8, "feature_window": 8}
        record = await client.submit_and_wait("train_model", config, timeout_s=WAIT_S)
        assert record.state is TaskState.COMPLETED, record.error
        status = await wait_artifacts(client, record.task_id, ArtifactState.SYNCED)
    assert status.complete and status.bytes_done == status.bytes_total > 0
    assert status.location == f"s3://{s3_settings.s3_bucket}/tasks/{record.task_id}/"

    keys = {
        o["Key"]
        for o in s3_client(s3_settings).list_objects_v2(Bucket=s3_settings.s3_bucket)["Contents"]
    }
    base = f"tasks/{record.task_id}/"
    assert {
        f"{base}manifest.json",
        f"{base}artifacts/model.pt",
        f"{base}artifacts/metrics.json",
    } <= keys
    head = s3_client(s3_settings).head_object(
        Bucket=s3_settings.s3_bucket, Key=f"{base}artifacts/model.pt"
    )
    desktop = s3_settings.tasks_dir / record.task_id
    assert head["Metadata"]["sha256"] == sha256(desktop / "artifacts" / "model.pt")

    # The laptop: no access to the desktop's disk, and the desktop's services unreachable.
    laptop_dir = tmp_path / "laptop-download"
    offline = service_env(
        s3_settings,
        **storage_env(s3_settings),
        TP_AMQP_URL="amqp://guest:guest@127.0.0.1:1/",
        TP_REDIS_URL="redis://127.0.0.1:1/0",
        TP_DATA_DIR=str(tmp_path / "laptop-data"),
    )
    cli = await asyncio.to_thread(
        tradectl, "task", "result", record.task_id, "--download", str(laptop_dir), env=offline
    )
    assert cli.returncode == 0, cli.stderr
    assert "desktop unreachable" in cli.stderr and "verified" in cli.stdout
    assert tree(laptop_dir) == tree(desktop)
    assert "artifacts/model.pt" in tree(laptop_dir)

    from mlflow.tracking import MlflowClient

    run = MlflowClient(s3_settings.tracking_uri).get_run(record.result["mlflow_run_id"])
    assert run.data.tags["tp.artifact_location"] == status.location


async def test_requests_wait_while_artifact_sync_is_down(
    platform: Platform, s3_settings: Settings
) -> None:
    env = storage_env(s3_settings)
    await platform.start_all(**env, **LIGHT_WORKER)  # no artifact-sync yet
    async with DistributedClient(s3_settings) as client:
        done = [
            await client.submit_and_wait("probe", {"steps": 2}, timeout_s=WAIT_S) for _ in range(3)
        ]
        assert all(r.state is TaskState.COMPLETED for r in done)
        for r in done:
            assert (await client.artifact_status(r.task_id))[0].state is ArtifactState.PENDING
        queue = await client.broker.connection.channel()
        declared = await queue.declare_queue(
            Topology(s3_settings.namespace).queue("artifacts"), passive=True
        )
        # Per task: one request at its first checkpoint, one at its end; all waiting.
        assert declared.declaration_result.message_count == 6
        await queue.close()
        platform.start("artifact_sync", **env)
        for r in done:
            status = await wait_artifacts(client, r.task_id, ArtifactState.SYNCED)
            assert status.files == 1  # the probe's checkpoint
    shown = tradectl("artifacts", "status", "--json", env=service_env(s3_settings, **env))
    assert shown.returncode == 0, shown.stderr
    assert {s["task_id"] for s in json.loads(shown.stdout)} == {r.task_id for r in done}


# --- the service in this process: failures, idempotency, names ---------------------------------


@pytest.fixture
async def service(s3_settings: Settings) -> ArtifactSync:
    sync = ArtifactSync(s3_settings.model_copy(update={"artifact_max_attempts": 1}))
    await sync.store.start()
    await sync.broker.start()
    await sync.storage.__aenter__()
    yield sync
    await sync.storage.__aexit__(None, None, None)
    await sync.broker.stop()
    await sync.store.stop()


def make_task(s: Settings, files: dict[str, bytes]) -> str:
    task_id = f"task-{uuid.uuid4().hex[:8]}"
    for rel, data in files.items():
        path = s.tasks_dir / task_id / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return task_id


def request(task_id: str) -> ArtifactRequest:
    return ArtifactRequest(task_id=task_id, ts=time.time())


class FailingFile(io.FileIO):
    """A file whose reads fail after ``ok_reads`` successful ones (a disk error mid-upload)."""

    def __init__(self, path: Path, ok_reads: int) -> None:
        super().__init__(path, "rb")
        self.left = ok_reads

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            raise OSError(5, "Input/output error (injected)")
        self.left -= 1
        return super().read(size)


async def test_multipart_failure_aborts_the_upload_then_retry_succeeds(
    service: ArtifactSync, tmp_path: Path
) -> None:
    s = service.settings
    data = os.urandom(100 * MiB)
    task_id = make_task(s, {"artifacts/big.bin": data})
    s3 = s3_client(s)
    before = s3.list_multipart_uploads(Bucket=s.s3_bucket).get("Uploads", [])

    def failing(path: Path) -> IO[bytes]:
        return FailingFile(path, ok_reads=2)

    service.opener = failing
    failed = await service.sync(request(task_id))
    assert failed.state is ArtifactState.FAILED
    assert "Input/output error (injected)" in (failed.error or "")
    assert s3.list_multipart_uploads(Bucket=s.s3_bucket).get("Uploads", []) == before
    listed = s3.list_objects_v2(Bucket=s.s3_bucket, Prefix=f"tasks/{task_id}/")
    assert listed.get("KeyCount", 0) == 0  # nothing, not even a manifest
    stored = await service.store.redis.get(service.store.keys.artifacts(task_id))
    assert json.loads(stored)["state"] == "failed"

    service.opener = open_binary
    synced = await service.sync(request(task_id))
    assert synced.state is ArtifactState.SYNCED and synced.bytes_done == 100 * MiB
    head = s3.head_object(Bucket=s.s3_bucket, Key=f"tasks/{task_id}/artifacts/big.bin")
    assert head["ContentLength"] == 100 * MiB
    parts = -(-100 * MiB // s.artifact_part_size_bytes)
    assert head["ETag"].strip('"').endswith(f"-{parts}")  # multipart, every part present
    assert head["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
    body = s3.get_object(Bucket=s.s3_bucket, Key=f"tasks/{task_id}/artifacts/big.bin")["Body"]
    assert hashlib.sha256(body.read()).hexdigest() == hashlib.sha256(data).hexdigest()


async def test_resync_of_an_unchanged_folder_uploads_nothing(service: ArtifactSync) -> None:
    files = {f"artifacts/part-{i}.csv": os.urandom(2048) for i in range(20)}
    files["artifacts/weights.bin"] = os.urandom(20 * MiB)  # multipart
    task_id = make_task(service.settings, files)
    calls: list[str] = []

    def count(event_name: str, **_: object) -> None:
        calls.append(event_name.rsplit(".", 1)[-1])

    for s3 in (service.storage.client, service.storage.part_client):  # type: ignore[attr-defined]
        s3.meta.events.register("before-call.s3", count)
    first = await service.sync(request(task_id))
    assert first.uploaded == 21 and first.skipped == 0
    uploads = {"PutObject", "CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload"}
    parts = -(-20 * MiB // service.settings.artifact_part_size_bytes)
    # 20 small files, the manifest, then create + parts + complete for the large one.
    assert sum(c in uploads for c in calls) == 20 + 1 + 1 + parts + 1
    calls.clear()
    again = await service.sync(request(task_id))
    assert again.state is ArtifactState.SYNCED and (again.uploaded, again.skipped) == (0, 21)
    assert [c for c in calls if c in uploads] == []
    # Change one file: exactly that one is uploaded again (and the manifest).
    (service.settings.tasks_dir / task_id / "artifacts/part-3.csv").write_bytes(b"changed")
    calls.clear()
    third = await service.sync(request(task_id))
    assert (third.uploaded, third.skipped) == (1, 20)
    assert sorted(c for c in calls if c in uploads) == ["PutObject", "PutObject"]


async def test_odd_names_round_trip_and_a_malicious_manifest_is_refused(
    service: ArtifactSync, tmp_path: Path
) -> None:
    files = {
        "artifacts/model v1: best.pt": b"weights",
        "artifacts/données/équité über.csv": b"date,equity\n",
        "artifacts/回测 结果.json": b"{}",
    }
    task_id = make_task(service.settings, files)
    assert (await service.sync(request(task_id))).state is ArtifactState.SYNCED
    dest = tmp_path / "down"
    manifest = await download_artifacts(service.settings, task_id, dest)
    assert {e.path for e in manifest.files} == set(files)
    for rel, data in files.items():
        assert (dest / rel).read_bytes() == data

    # A tampered manifest naming ../ cannot make the laptop write outside its folder.
    evil = Manifest(
        task_id=task_id,
        files=[ManifestEntry(path="../../outside.txt", size=1, sha256="0" * 64)],
        complete=True,
        created_at=time.time(),
    )
    await service.storage.write_manifest(evil)
    with pytest.raises(UnsafeNameError):
        await download_artifacts(service.settings, task_id, tmp_path / "evil")
    assert (
        not (tmp_path / "outside.txt").exists() and not (tmp_path.parent / "outside.txt").exists()
    )


async def test_a_download_that_does_not_match_the_manifest_is_not_kept(
    service: ArtifactSync, tmp_path: Path
) -> None:
    task_id = make_task(service.settings, {"artifacts/a.txt": b"original"})
    await service.sync(request(task_id))
    s = service.settings
    s3_client(s).put_object(Bucket=s.s3_bucket, Key=f"tasks/{task_id}/artifacts/a.txt", Body=b"x")
    from shared.storage import StorageError

    with pytest.raises(StorageError, match="does not match the manifest"):
        await download_artifacts(s, task_id, tmp_path / "d")
    assert not (tmp_path / "d" / "artifacts" / "a.txt").exists()


# --- network drive -----------------------------------------------------------------------------


async def test_network_drive_never_shows_a_partial_file_under_its_final_name(
    platform: Platform, settings: Settings, tmp_path: Path
) -> None:
    drive = tmp_path / "drive"
    drive.mkdir()
    s = settings.model_copy(update={"artifact_backend": "path", "artifact_dir": drive})
    data = os.urandom(384 * MiB)
    task_id = make_task(s, {"artifacts/big.bin": data, "artifacts/small.txt": b"hello"})
    final = drive / "tasks" / task_id / "artifacts" / "big.bin"
    async with DistributedClient(s) as client:
        await client.broker.publish_artifact_request(request(task_id))
        service = platform.start("artifact_sync", **storage_env(s))
        deadline = time.monotonic() + 60
        folder = final.parent
        while not (folder.is_dir() and any(".tp-partial-" in p.name for p in folder.iterdir())):
            assert time.monotonic() < deadline and service.proc.poll() is None
        os.kill(service.proc.pid, signal.SIGKILL)  # mid-copy
        service.proc.wait()
        assert not final.exists()  # the partial copy never had the final name
        assert not (drive / "tasks" / task_id / "manifest.json").exists()

        platform.start("artifact_sync", **storage_env(s))  # the unacked request is redelivered
        status = await wait_artifacts(client, task_id, ArtifactState.SYNCED)
    assert status.location == str(drive / "tasks" / task_id)
    assert hashlib.sha256(final.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
    leftovers = [p for p in (drive / "tasks" / task_id).rglob("*") if ".tp-partial-" in p.name]
    assert leftovers == []
    manifest = Manifest.model_validate_json(
        (drive / "tasks" / task_id / "manifest.json").read_text()
    )
    assert {e.path for e in manifest.files} == {"artifacts/big.bin", "artifacts/small.txt"}


# --- found by trying to break it ---------------------------------------------------------------


async def test_an_object_overwritten_in_storage_is_sent_again(service: ArtifactSync) -> None:
    task_id = make_task(service.settings, {"artifacts/a.bin": b"A" * 4096})
    await service.sync(request(task_id))
    s = service.settings
    key = f"tasks/{task_id}/artifacts/a.bin"
    s3_client(s).put_object(Bucket=s.s3_bucket, Key=key, Body=b"B" * 4096)  # same size
    again = await service.sync(request(task_id))
    assert (again.uploaded, again.skipped) == (1, 0)
    body = s3_client(s).get_object(Bucket=s.s3_bucket, Key=key)["Body"].read()
    assert body == b"A" * 4096


async def test_a_corrupt_stored_manifest_is_rewritten_and_refused_on_download(
    service: ArtifactSync, tmp_path: Path
) -> None:
    task_id = make_task(service.settings, {"artifacts/a.txt": b"a"})
    s = service.settings
    key = f"tasks/{task_id}/manifest.json"
    s3_client(s).put_object(Bucket=s.s3_bucket, Key=key, Body=b'{"truncated')
    from shared.storage import StorageError

    with pytest.raises(StorageError, match="unreadable"):
        await download_artifacts(s, task_id, tmp_path / "d")
    status = await service.sync(request(task_id))
    assert status.state is ArtifactState.SYNCED
    await download_artifacts(s, task_id, tmp_path / "d")
    assert (tmp_path / "d" / "artifacts" / "a.txt").read_bytes() == b"a"


async def test_a_checkpoint_set_is_not_downloaded_as_the_result_unless_asked(
    service: ArtifactSync, tmp_path: Path
) -> None:
    task_id = make_task(service.settings, {"checkpoints/last.pt": b"epoch 3"})
    mid_run = ArtifactRequest(task_id=task_id, reason="checkpoint", final=False, ts=time.time())
    assert (await service.sync(mid_run)).complete is False
    from shared.storage import StorageError

    with pytest.raises(StorageError, match="checkpoint taken while it ran"):
        await download_artifacts(service.settings, task_id, tmp_path / "d")
    manifest = await download_artifacts(service.settings, task_id, tmp_path / "d", partial_ok=True)
    assert not manifest.complete and (tmp_path / "d" / "checkpoints" / "last.pt").exists()


async def test_symlinks_collisions_and_long_names(service: ArtifactSync, tmp_path: Path) -> None:
    s = service.settings
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "id_rsa").write_text("PRIVATE")
    long_name = "x" * 240 + ".csv"
    task_id = make_task(
        s,
        {
            f"artifacts/{long_name}": b"long",
            "artifacts/caf\u00e9.txt": b"nfc",
            "artifacts/cafe\u0301.txt": b"nfd",  # the same name once normalised
        },
    )
    (s.tasks_dir / task_id / "checkpoints").symlink_to(secret)  # a folder pointing elsewhere
    status = await service.sync(request(task_id))
    assert status.state is ArtifactState.SYNCED and status.files == 2
    manifest = await download_artifacts(s, task_id, tmp_path / "d")
    assert sorted(e.path for e in manifest.files) == sorted(
        [f"artifacts/{long_name}", "artifacts/caf\u00e9.txt"]
    )
    assert (tmp_path / "d" / "artifacts" / long_name).read_bytes() == b"long"
    assert not any("id_rsa" in e.path for e in manifest.files)


async def test_a_download_never_writes_through_planted_symlinks(
    service: ArtifactSync, tmp_path: Path
) -> None:
    task_id = make_task(service.settings, {"artifacts/deep/a.txt": b"a", "artifacts/b.txt": b"b"})
    await service.sync(request(task_id))
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / "artifacts").symlink_to(outside)
    from shared.storage import StorageError

    with pytest.raises(StorageError, match="outside"):
        await download_artifacts(service.settings, task_id, dest)
    assert list(outside.iterdir()) == []  # not even a folder was made there
    (dest / "artifacts").unlink()
    (dest / "artifacts").mkdir()
    victim = outside / "victim.txt"
    victim.write_text("keep me")
    (dest / "artifacts" / "b.txt").symlink_to(victim)  # a link at a final name is replaced
    await download_artifacts(service.settings, task_id, dest)
    assert victim.read_text() == "keep me"
    assert (dest / "artifacts" / "b.txt").read_bytes() == b"b"
    assert not (dest / "artifacts" / "b.txt").is_symlink()


async def test_a_redis_outage_mid_sync_hands_the_request_back_and_it_completes(
    platform: Platform, settings: Settings, tmp_path: Path
) -> None:
    from tests.netproxy import TcpProxy

    drive = tmp_path / "drive"
    drive.mkdir()
    s = settings.model_copy(update={"artifact_backend": "path", "artifact_dir": drive})
    data = os.urandom(256 * MiB)
    task_id = make_task(s, {"artifacts/big.bin": data})
    proxy = TcpProxy("127.0.0.1", 6379)
    try:
        proxied = f"redis://127.0.0.1:{proxy.port}/0"
        platform.start("artifact_sync", **storage_env(s), TP_REDIS_URL=proxied)
        async with DistributedClient(s) as client:
            await client.broker.publish_artifact_request(request(task_id))
            await wait_artifacts(client, task_id, ArtifactState.SYNCING)
            proxy.cut()
            await asyncio.sleep(3)
            proxy.restore()
            status = await wait_artifacts(client, task_id, ArtifactState.SYNCED)
        assert status.bytes_done == 256 * MiB
        final = drive / "tasks" / task_id / "artifacts" / "big.bin"
        assert hashlib.sha256(final.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
        assert "delivery_crashed" not in platform.procs["artifact_sync"].log_text()
    finally:
        proxy.cut()


def test_storage_settings_are_checked_before_anything_starts(settings: Settings) -> None:
    import subprocess
    import sys

    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="TP_ARTIFACT_DIR: required"):
        Settings(_env_file=None, artifact_backend="path")
    with pytest.raises(ValidationError, match="set both or neither"):
        Settings(_env_file=None, s3_access_key_id="only-the-key")
    for backend, expected in (("path", "TP_ARTIFACT_DIR"), ("none", "cannot start")):
        env = service_env(settings, TP_ARTIFACT_BACKEND=backend)
        done = subprocess.run(
            [sys.executable, "-m", "services.artifact_sync"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 2 and expected in done.stderr, done.stderr
