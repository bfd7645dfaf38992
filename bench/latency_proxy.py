"""A TCP proxy that delays every byte by a fixed one-way latency, for benchmarks.

``python -m bench.latency_proxy --port P --target HOST:PORT --one-way-ms D`` forwards
``127.0.0.1:P`` to the target and holds each chunk ``D`` ms before passing it on, in both
directions, so a request/response pair costs at least ``2 * D`` ms of round trip, as it would
across a LAN, a VPN or the internet to AWS S3. Bandwidth is not limited and order is kept. It runs
in its own process so its CPU does not share the benchmark clients' interpreter.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import time

from bench.moto_server import wait_listening

CHUNK = 256 * 1024


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    """Copy ``reader`` to ``writer``, each chunk ``delay_s`` after it arrived, until EOF."""
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def send() -> None:
        while True:
            due, data = await queue.get()
            if not data:
                return
            if (wait := due - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()

    sender = asyncio.create_task(send())
    try:
        while data := await reader.read(CHUNK):
            queue.put_nowait((time.monotonic() + delay_s, data))
        queue.put_nowait((time.monotonic() + delay_s, b""))
        await sender
    finally:
        sender.cancel()


async def _serve(port: int, host: str, target_port: int, delay_s: float) -> None:
    #: Strong references: asyncio keeps only weak ones to the connection handlers.
    handlers: set[asyncio.Task[None]] = set()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(host, target_port)
        except OSError:
            writer.transport.abort()
            return
        pipes = [
            asyncio.create_task(_pipe(reader, up_writer, delay_s)),
            asyncio.create_task(_pipe(up_reader, writer, delay_s)),
        ]
        # HTTP never half-closes: once either side is done the connection is.
        await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        for pipe in pipes:
            pipe.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)
        writer.transport.abort()
        up_writer.transport.abort()

    def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(relay(reader, writer))
        handlers.add(task)
        task.add_done_callback(handlers.discard)

    server = await asyncio.start_server(accept, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def start_latency_proxy(
    port: int, target_port: int, one_way_ms: float, target_host: str = "127.0.0.1"
) -> subprocess.Popen[bytes]:
    """Start the proxy in its own process; return once it accepts connections.

    Raises:
        RuntimeError: it exited or did not listen in time.
    """
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.latency_proxy",
            "--port",
            str(port),
            "--target",
            f"{target_host}:{target_port}",
            "--one-way-ms",
            str(one_way_ms),
        ]
    )
    wait_listening(proc, port, "latency proxy")
    return proc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--target", required=True, help="HOST:PORT")
    parser.add_argument("--one-way-ms", type=float, required=True)
    args = parser.parse_args()
    host, _, port = args.target.rpartition(":")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.port, host, int(port), args.one_way_ms / 1000))
    return 0


if __name__ == "__main__":
    sys.exit(main())
