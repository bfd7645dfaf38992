"""An S3-compatible bucket (AWS S3, MinIO) as shared storage, with aioboto3.

Small files (below ``TP_ARTIFACT_MULTIPART_THRESHOLD_BYTES``) go in one ``PutObject`` with
``Content-MD5``; larger ones as a multipart upload of ``TP_ARTIFACT_PART_SIZE_BYTES`` parts, at
most ``PART_CONCURRENCY`` in flight (and ``TP_ARTIFACT_CONCURRENCY`` files at once). Each object
carries its SHA-256 as metadata (``x-amz-meta-sha256``) and is verified after upload by its ETag:
the MD5 of the body for a single PUT, and MD5(concatenated part MD5s)-N for a multipart upload
(S3's documented ETag for unencrypted objects; MinIO and moto follow it); with
``TP_S3_PART_CHECKSUM=crc32`` (the default) each part carries a CRC32 the server checks on
receipt and returns, and that is compared instead. A multipart upload that
fails is aborted before the error is reported, and uploads an interrupted sync left open are
aborted at the next sync.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import threading
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aioboto3
import aiohttp
import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from shared.settings import Settings
from shared.storage.base import (
    MANIFEST_NAME,
    Opener,
    StorageError,
    open_binary,
    parse_manifest,
)
from shared.storage.manifest import HASH_CHUNK, Manifest, ManifestEntry

#: Parts of one file in flight at most: 8 x 16 MiB parts bound the memory a large file takes.
PART_CONCURRENCY = 8
#: What botocore and aiohttp raise for a failed request.
S3_FAILURES = (BotoCoreError, ClientError, OSError, asyncio.TimeoutError, aiohttp.ClientError)


@dataclass(frozen=True)
class _Upload:
    """A multipart upload in progress."""

    key: str
    upload_id: str
    part_size: int
    crc: bool


@dataclass(frozen=True)
class _Part:
    """An uploaded part: its entry for CompleteMultipartUpload, its digest, its size."""

    listing: dict[str, Any]
    digest: bytes
    size: int


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


class S3Storage:
    """Artifacts under ``s3://<bucket>/<prefix>/<task_id>/``."""

    kind = "s3"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.bucket = settings.s3_bucket
        self.prefix = settings.artifact_prefix.strip("/")
        self._session = aioboto3.Session()
        self._client_cm: Any = None
        self._client: Any = None
        #: botocore's blocking client, used from the part threads.
        self.part_client: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._files = asyncio.Semaphore(settings.artifact_concurrency)
        self._parts = asyncio.Semaphore(min(PART_CONCURRENCY, settings.artifact_concurrency))

    async def __aenter__(self) -> S3Storage:
        s = self.settings
        config = Config(
            request_checksum_calculation=s.s3_checksum,
            response_checksum_validation=s.s3_checksum,
            max_pool_connections=2 * s.artifact_concurrency + 2,
            s3={"addressing_style": s.s3_addressing_style},
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=10,
            read_timeout=120,
        )
        secret = s.s3_secret_access_key.get_secret_value() if s.s3_secret_access_key else None
        self._client_cm = self._session.client(
            "s3",
            endpoint_url=s.s3_endpoint_url,
            region_name=s.s3_region,
            aws_access_key_id=s.s3_access_key_id,
            aws_secret_access_key=secret,
            config=config,
        )
        self._client = await self._client_cm.__aenter__()
        self.part_client = boto3.session.Session().client(
            "s3",
            endpoint_url=s.s3_endpoint_url,
            region_name=s.s3_region,
            aws_access_key_id=s.s3_access_key_id,
            aws_secret_access_key=secret,
            config=config,
        )
        self._pool = ThreadPoolExecutor(PART_CONCURRENCY, thread_name_prefix="s3-part")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._client_cm is not None:
            await self._client_cm.__aexit__(None, None, None)
            self._client_cm = self._client = None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if self.part_client is not None:
            self.part_client.close()
            self.part_client = None

    @property
    def client(self) -> Any:
        """The aiobotocore S3 client (only inside ``async with``)."""
        if self._client is None:
            raise StorageError("S3 storage used outside 'async with'")
        return self._client

    def key(self, task_id: str, rel: str) -> str:
        """Object key of a task's file."""
        return f"{self.prefix}/{task_id}/{rel}" if self.prefix else f"{task_id}/{rel}"

    def location(self, task_id: str) -> str:  # noqa: D102
        return f"s3://{self.bucket}/{self.key(task_id, '')}"

    async def read_manifest(self, task_id: str) -> Manifest | None:  # noqa: D102
        try:
            response = await self.client.get_object(
                Bucket=self.bucket, Key=self.key(task_id, MANIFEST_NAME)
            )
            body = response["Body"]
            try:
                data = await body.read()
            finally:
                body.close()
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise StorageError(f"reading the manifest of {task_id} failed: {e}") from e
        except S3_FAILURES as e:
            raise StorageError(f"reading the manifest of {task_id} failed: {e}") from e
        return parse_manifest(data, self.location(task_id) + MANIFEST_NAME)

    async def stored(self, task_id: str) -> dict[str, tuple[int, str | None]]:  # noqa: D102
        base = self.key(task_id, "")
        found: dict[str, tuple[int, str | None]] = {}
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=base):
                for item in page.get("Contents", []):
                    rel = item["Key"][len(base) :]
                    if rel != MANIFEST_NAME:
                        found[rel] = (int(item["Size"]), str(item["ETag"]).strip('"'))
        except S3_FAILURES as e:
            raise StorageError(f"listing {self.location(task_id)} failed: {e}") from e
        return found

    async def upload(  # noqa: D102
        self,
        task_id: str,
        entry: ManifestEntry,
        source: Path,
        *,
        on_bytes: Callable[[int], None],
        opener: Opener = open_binary,
    ) -> str | None:
        key = self.key(task_id, entry.path)
        async with self._files:
            try:
                if entry.size < self.settings.artifact_multipart_threshold_bytes:
                    return await self._put_small(key, entry, source, opener, on_bytes)
                return await self._put_multipart(key, entry, source, opener, on_bytes)
            except S3_FAILURES as e:
                raise StorageError(f"upload of {entry.path} to {key} failed: {e}") from e

    async def _put_small(
        self,
        key: str,
        entry: ManifestEntry,
        source: Path,
        opener: Opener,
        on_bytes: Callable[[int], None],
    ) -> str:
        def read() -> tuple[bytes, bytes, str]:
            with opener(source) as f:
                data = f.read()
            return data, hashlib.md5(data).digest(), hashlib.sha256(data).hexdigest()  # noqa: S324

        data, md5, sha256 = await asyncio.to_thread(read)
        if sha256 != entry.sha256:
            raise StorageError(f"{entry.path} changed while it was synced (SHA-256 differs)")
        response = await self.client.put_object(
            Bucket=self.bucket,
            Key=key,
            Body=data,
            ContentMD5=_b64(md5),
            Metadata={"sha256": entry.sha256},
        )
        self._verify(entry, response["ETag"], md5.hex())
        on_bytes(len(data))
        return str(response["ETag"]).strip('"')

    async def _put_multipart(
        self,
        key: str,
        entry: ManifestEntry,
        source: Path,
        opener: Opener,
        on_bytes: Callable[[int], None],
    ) -> str:
        part_size = self.settings.artifact_part_size_bytes
        count = max(1, -(-entry.size // part_size))
        crc = self.settings.s3_part_checksum == "crc32"
        extra = {"ChecksumAlgorithm": "CRC32"} if crc else {}
        created = await self.client.create_multipart_upload(
            Bucket=self.bucket, Key=key, Metadata={"sha256": entry.sha256}, **extra
        )
        upload_id = created["UploadId"]
        try:
            with opener(source) as f:
                upload = _Upload(key, upload_id, part_size, crc)
                parts = await self._send_parts(f, upload, count, on_bytes)
            done = await self.client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": [p.listing for p in parts]},
            )
        except BaseException:
            await asyncio.shield(self._abort(key, upload_id))
            raise
        if not crc:
            digests = b"".join(p.digest for p in parts)
            expected = hashlib.md5(digests).hexdigest() + f"-{count}"  # noqa: S324
            self._verify(entry, done["ETag"], expected)
        return str(done["ETag"]).strip('"')

    async def _send_parts(
        self, f: Any, upload: _Upload, count: int, on_bytes: Callable[[int], None]
    ) -> list[_Part]:
        """Upload every part from a thread pool; the first failure cancels the rest.

        Parts go through botocore's blocking client in ``PART_CONCURRENCY`` threads: on this
        kind of machine it moves large bodies about twice as fast as aiohttp does.
        """
        lock = threading.Lock()
        loop = asyncio.get_running_loop()

        def send(index: int) -> _Part:
            with lock:
                f.seek(index * upload.part_size)
                data = f.read(upload.part_size)
            return self._upload_part(upload, index + 1, data)

        async def one(index: int) -> _Part:
            async with self._parts:
                part = await loop.run_in_executor(self._pool, send, index)
            on_bytes(part.size)
            return part

        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(one(i)) for i in range(count)]
        except BaseExceptionGroup as e:
            raise e.exceptions[0] from None
        return [t.result() for t in tasks]

    def _upload_part(self, upload: _Upload, number: int, data: bytes) -> _Part:
        """Upload one part in a pool thread and verify it.

        The server's CRC32 (which it also checked on receipt) or its ETag must equal ours.
        """
        extra: dict[str, str] = {}
        if upload.crc:
            # Given our CRC32, botocore sends it instead of computing its own: one pass, not two.
            digest = zlib.crc32(data).to_bytes(4, "big")
            extra = {"ChecksumAlgorithm": "CRC32", "ChecksumCRC32": _b64(digest)}
        response = self.part_client.upload_part(
            Bucket=self.bucket,
            Key=upload.key,
            UploadId=upload.upload_id,
            PartNumber=number,
            Body=data,
            **extra,
        )
        listing: dict[str, Any] = {"PartNumber": number, "ETag": response["ETag"]}
        if upload.crc:
            listing["ChecksumCRC32"] = response.get("ChecksumCRC32")
            ok = listing["ChecksumCRC32"] == extra["ChecksumCRC32"]
        else:
            digest = hashlib.md5(data).digest()  # noqa: S324 - S3's ETag, not security
            ok = response["ETag"].strip('"') == digest.hex()
        if not ok:
            raise StorageError(f"part {number} of {upload.key} did not verify")
        return _Part(listing, digest, len(data))

    async def _abort(self, key: str, upload_id: str) -> None:
        with contextlib.suppress(*S3_FAILURES):
            await self.client.abort_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id
            )

    @staticmethod
    def _verify(entry: ManifestEntry, etag: str, expected: str) -> None:
        if etag.strip('"') != expected:
            raise StorageError(
                f"{entry.path} did not verify after upload: ETag {etag} != {expected}"
            )

    async def write_manifest(self, manifest: Manifest) -> None:  # noqa: D102
        try:
            await self.client.put_object(
                Bucket=self.bucket,
                Key=self.key(manifest.task_id, MANIFEST_NAME),
                Body=manifest.model_dump_json(indent=1).encode(),
                ContentType="application/json",
            )
        except S3_FAILURES as e:
            raise StorageError(f"writing the manifest of {manifest.task_id} failed: {e}") from e

    async def download(self, task_id: str, rel: str, dest: Path) -> None:  # noqa: D102
        try:
            response = await self.client.get_object(Bucket=self.bucket, Key=self.key(task_id, rel))
            body = response["Body"]
            try:
                # O_EXCL | O_NOFOLLOW: never write through a symlink planted at ``dest``.
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                with os.fdopen(os.open(dest, flags, 0o644), "wb") as out:
                    while chunk := await body.read(HASH_CHUNK):
                        await asyncio.to_thread(out.write, chunk)
            finally:
                body.close()
        except S3_FAILURES as e:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(dest.unlink)
            raise StorageError(f"download of {rel} failed: {e}") from e

    async def remove_partial(self, task_id: str) -> int:  # noqa: D102
        try:
            listed = await self.client.list_multipart_uploads(
                Bucket=self.bucket, Prefix=self.key(task_id, "")
            )
            uploads = listed.get("Uploads", [])
            for upload in uploads:
                await self._abort(upload["Key"], upload["UploadId"])
        except S3_FAILURES as e:
            raise StorageError(f"listing open uploads of {task_id} failed: {e}") from e
        return len(uploads)
