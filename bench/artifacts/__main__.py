"""``python -m bench.artifacts``: upload throughput of our artifact sync against plain boto3.

Same moto S3 server (its own process on loopback), same machine, same run, alternating rounds:
  large: one 256 MiB file  -- ours: a full artifact sync (hash, multipart, verify, manifest)
                              boto3: ``upload_file`` with its default transfer settings
  small: 1,000 x 10 KiB    -- ours: a full artifact sync (concurrent PUTs, verify, manifest)
                              boto3: a sequential loop of ``put_object``
Prints MB/s (or files/s), the ratios ours/boto3 (median of the rounds), the load average, and
writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import boto3
from pydantic import SecretStr

from bench.moto_server import free_port, start_moto
from services.artifact_sync.syncer import Progress, sync_task
from shared.artifacts import ArtifactRequest
from shared.settings import Settings
from shared.storage import open_storage

MiB = 1024 * 1024


def make_files(root: Path, large_mib: int, small_count: int, small_kib: int) -> tuple[Path, Path]:
    """Task folders ``large/artifacts/big.bin`` and ``small/artifacts/f-NNNN.bin`` (random)."""
    large, small = root / "large", root / "small"
    (large / "artifacts").mkdir(parents=True)
    (small / "artifacts").mkdir(parents=True)
    with (large / "artifacts" / "big.bin").open("wb") as f:
        for _ in range(large_mib):
            f.write(os.urandom(MiB))
    for i in range(small_count):
        (small / "artifacts" / f"f-{i:04d}.bin").write_bytes(os.urandom(small_kib * 1024))
    return large, small


async def ours(settings: Settings, folder: Path) -> float:
    """Seconds for one full artifact sync of ``folder`` under a fresh task id."""
    request = ArtifactRequest(task_id=f"bench-{uuid.uuid4().hex[:8]}", ts=time.time())
    started = time.perf_counter()
    async with open_storage(settings) as storage:
        await sync_task(storage, request, folder, Progress())
    return time.perf_counter() - started


def boto3_large(client: Any, bucket: str, path: Path) -> float:
    started = time.perf_counter()
    client.upload_file(str(path), bucket, f"boto3/{uuid.uuid4().hex}/big.bin")
    return time.perf_counter() - started


def boto3_small(client: Any, bucket: str, files: list[Path]) -> float:
    prefix = uuid.uuid4().hex
    started = time.perf_counter()
    for path in files:
        client.put_object(Bucket=bucket, Key=f"boto3/{prefix}/{path.name}", Body=path.read_bytes())
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large-mib", type=int, default=256)
    parser.add_argument("--small-count", type=int, default=1000)
    parser.add_argument("--small-kib", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/artifacts.json"))
    args = parser.parse_args()

    port = free_port()
    server = start_moto(port)
    endpoint = f"http://127.0.0.1:{port}"
    bucket = "bench-artifacts"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="bench",
        aws_secret_access_key="bench",  # noqa: S106 - moto accepts any key
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=bucket)
    settings = Settings(
        _env_file=None,
        artifact_backend="s3",
        s3_endpoint_url=endpoint,
        s3_bucket=bucket,
        s3_access_key_id="bench",
        s3_secret_access_key=SecretStr("bench"),
    )
    times: dict[str, list[float]] = {
        k: [] for k in ("ours_large", "boto3_large", "ours_small", "boto3_small")
    }
    try:
        with tempfile.TemporaryDirectory() as tmp:
            large, small = make_files(Path(tmp), args.large_mib, args.small_count, args.small_kib)
            small_files = sorted((small / "artifacts").iterdir())
            for _ in range(args.rounds):
                times["boto3_large"].append(
                    boto3_large(client, bucket, large / "artifacts" / "big.bin")
                )
                times["ours_large"].append(asyncio.run(ours(settings, large)))
                times["boto3_small"].append(boto3_small(client, bucket, small_files))
                times["ours_small"].append(asyncio.run(ours(settings, small)))
    finally:
        server.terminate()
        server.wait(10)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "large_mib": args.large_mib,
        "small_count": args.small_count,
        "small_kib": args.small_kib,
        "rounds": args.rounds,
        "seconds": times,
        "large_mb_s": {
            k: args.large_mib * MiB / 1e6 / med[f"{k}_large"] for k in ("ours", "boto3")
        },
        "small_files_s": {k: args.small_count / med[f"{k}_small"] for k in ("ours", "boto3")},
        "ratio_large": med["boto3_large"] / med["ours_large"],
        "ratio_small": med["boto3_small"] / med["ours_small"],
        "loadavg": list(os.getloadavg()),
        "cpus": os.cpu_count(),
    }
    cpus, rounds = os.cpu_count(), args.rounds
    print(f"artifact upload, moto S3 server on loopback, {cpus} CPUs, median of {rounds}")
    print(f"{'case':<34}{'ours':>12}{'boto3':>12}{'ours/boto3':>12}")
    lm, sf = result["large_mb_s"], result["small_files_s"]
    label = f"1 x {args.large_mib} MiB (MB/s)"
    print(f"{label:<34}{lm['ours']:>12.1f}{lm['boto3']:>12.1f}{result['ratio_large']:>11.2f}x")
    label = f"{args.small_count} x {args.small_kib} KiB (files/s)"
    print(f"{label:<34}{sf['ours']:>12.0f}{sf['boto3']:>12.0f}{result['ratio_small']:>11.2f}x")
    print("boto3 large = upload_file, default TransferConfig; boto3 small = sequential put_object")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average {load}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
