"""Process lifecycle shared by every service: settings, logging, signals, start/stop."""

from __future__ import annotations

import asyncio
import signal
from typing import Protocol

import structlog

from shared.logging import configure_logging
from shared.settings import Settings

log = structlog.get_logger(__name__)


class Service(Protocol):
    """A long-running service: ``start`` wires it up, ``stop`` shuts it down gracefully."""

    async def start(self) -> None: ...  # noqa: D102

    async def stop(self) -> None: ...  # noqa: D102


async def run_until_signalled(service: Service) -> None:
    """Start ``service``, wait for SIGTERM/SIGINT, then stop it (arq's handle_sig pattern)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await service.start()
    log.info("service_started")
    try:
        await stop.wait()
    finally:
        log.info("service_stopping")
        await service.stop()
        log.info("service_stopped")


def main(name: str, factory: type) -> None:
    """Entry point body for ``python -m services.<name>``: settings, logging, run."""
    settings = Settings()
    configure_logging(settings, service=name)
    asyncio.run(run_until_signalled(factory(settings)))
