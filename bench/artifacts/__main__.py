"""``python -m bench.artifacts``: upload throughput of our artifact sync against plain boto3.

Same moto S3 server (its own process on loopback), same machine, same run, alternating rounds:
  large: one 256 MiB file  -- ours: a full artifact sync (hash, multipart, verify, manifest)
                              boto3: ``upload_file`` with its default transfer settings
  small: 1,000 x 10 KiB    -- ours: a full artifact sync (concurrent PUTs, verify, manifest)
                              boto3: a sequential loop of ``put_object``
Each is run at every ``--rtt-ms`` round trip: 0 is moto directly on loopback (where moto's own CPU,
one Python process, bounds both sides); more puts ``bench.latency_proxy`` between the clients and
moto, as a network between the desktop and its bucket would. Prints MB/s (or files/s), the ratios
ours/boto3 (median of the rounds), the load average, and writes JSON to ``--out``.
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

from bench.latency_proxy import start_latency_proxy
from bench.moto_server import free_port, start_moto
from shared.artifacts import ArtifactRequest
from shared.settings import Settings
from shared.storage import Storage, open_storage
from shared.storage.sync import Progress, sync_task

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


async def ours(storage: Storage, folder: Path) -> float:
    """Seconds for one full artifact sync of ``folder`` under a fresh task id.

    ``storage`` is opened once beforehand, as the service opens it once at start (creating
    botocore clients takes 0.1-0.2 s here), just as boto3's client is created once.
    """
    request = ArtifactRequest(task_id=f"bench-{uuid.uuid4().hex[:8]}", ts=time.time())
    started = time.perf_counter()
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


async def run_rounds(
    endpoint: str, bucket: str, large: Path, small: Path, rounds: int
) -> dict[str, list[float]]:
    """Seconds per round of each case against ``endpoint``, alternating ours and boto3's.

    boto3's calls block the event loop while they run; nothing else runs on it meanwhile.
    """
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="bench",
        aws_secret_access_key="bench",  # noqa: S106 - moto accepts any key
        region_name="us-east-1",
    )
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
    small_files = sorted((small / "artifacts").iterdir())
    async with open_storage(settings) as storage:
        for _ in range(rounds):
            times["boto3_large"].append(
                boto3_large(client, bucket, large / "artifacts" / "big.bin")
            )
            times["ours_large"].append(await ours(storage, large))
            times["boto3_small"].append(boto3_small(client, bucket, small_files))
            times["ours_small"].append(await ours(storage, small))
    client.close()
    return times


def summarise(
    times: dict[str, list[float]], args: argparse.Namespace, rtt_ms: float
) -> dict[str, Any]:
    """Medians, throughputs and ratios (boto3 time / our time) of one latency's rounds."""
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "rtt_ms": rtt_ms,
        "seconds": times,
        "large_mb_s": {
            k: args.large_mib * MiB / 1e6 / med[f"{k}_large"] for k in ("ours", "boto3")
        },
        "small_files_s": {k: args.small_count / med[f"{k}_small"] for k in ("ours", "boto3")},
        "ratio_large": med["boto3_large"] / med["ours_large"],
        "ratio_small": med["boto3_small"] / med["ours_small"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large-mib", type=int, default=256)
    parser.add_argument("--small-count", type=int, default=1000)
    parser.add_argument("--small-kib", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--rtt-ms",
        default="0,10",
        help="comma-separated round trips to run at: 0 is moto directly on loopback; "
        "more puts bench.latency_proxy in between (10 ms: a nearby cloud region)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/artifacts.json"))
    args = parser.parse_args()
    rtts = [float(x) for x in args.rtt_ms.split(",")]

    port = free_port()
    server = start_moto(port)
    bucket = "bench-artifacts"
    results = []
    try:
        boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{port}",
            aws_access_key_id="bench",
            aws_secret_access_key="bench",  # noqa: S106 - moto accepts any key
            region_name="us-east-1",
        ).create_bucket(Bucket=bucket)
        with tempfile.TemporaryDirectory() as tmp:
            large, small = make_files(Path(tmp), args.large_mib, args.small_count, args.small_kib)
            for rtt in rtts:
                proxy = None
                endpoint_port = port
                if rtt > 0:
                    endpoint_port = free_port()
                    proxy = start_latency_proxy(endpoint_port, port, rtt / 2)
                try:
                    endpoint = f"http://127.0.0.1:{endpoint_port}"
                    times = asyncio.run(run_rounds(endpoint, bucket, large, small, args.rounds))
                finally:
                    if proxy is not None:
                        proxy.terminate()
                        proxy.wait(10)
                results.append(summarise(times, args, rtt))
    finally:
        server.terminate()
        server.wait(10)
    report = {
        "large_mib": args.large_mib,
        "small_count": args.small_count,
        "small_kib": args.small_kib,
        "rounds": args.rounds,
        "results": results,
        "loadavg": list(os.getloadavg()),
        "cpus": os.cpu_count(),
    }
    cpus, rounds = os.cpu_count(), args.rounds
    print(f"artifact upload, moto S3 server, {cpus} CPUs, median of {rounds} alternating rounds")
    print(f"{'case':<30}{'RTT ms':>8}{'ours':>10}{'boto3':>10}{'ours/boto3':>12}")
    for r in results:
        lm, sf = r["large_mb_s"], r["small_files_s"]
        label = f"1 x {args.large_mib} MiB (MB/s)"
        print(
            f"{label:<30}{r['rtt_ms']:>8g}{lm['ours']:>10.1f}{lm['boto3']:>10.1f}"
            f"{r['ratio_large']:>11.2f}x"
        )
        label = f"{args.small_count} x {args.small_kib} KiB (files/s)"
        print(
            f"{label:<30}{r['rtt_ms']:>8g}{sf['ours']:>10.0f}{sf['boto3']:>10.0f}"
            f"{r['ratio_small']:>11.2f}x"
        )
    print("boto3 large = upload_file, default TransferConfig; boto3 small = sequential put_object")
    print("RTT 0 = moto directly on loopback; RTT > 0 = through bench.latency_proxy")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average {load}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
