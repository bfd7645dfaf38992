"""Process lifecycle shared by every service: settings, logging, signals, start/stop.

Exit codes: 0 after a signal-driven stop; 2 for bad settings (the message names the ``TP_*``
variable); 75 (``EX_TEMPFAIL``) when a worker ends itself to be restarted on new code by systemd or
compose (``TP_WORKER_CODE_UPDATE=exit``). With ``reexec`` the process replaces itself instead.

Under systemd (``Type=notify``, see ``infra/systemd/``) the service tells its supervisor how it is
doing over ``$NOTIFY_SOCKET``: ``STATUS=`` while it waits for RabbitMQ/Redis, ``READY=1`` once
started, ``STOPPING=1`` when it begins to stop, ``RELOADING=1`` before a worker re-executes itself
on new code (the new process sends ``READY=1`` again). Without ``$NOTIFY_SOCKET`` nothing is sent.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Protocol

import structlog

from shared import eventloop
from shared.errors import BrokerError, StoreError, TradePlatError
from shared.logging import configure_logging
from shared.settings import SETTINGS_ERRORS, Settings, describe_settings_error

log = structlog.get_logger(__name__)

#: Back-off between attempts to reach RabbitMQ/Redis at start-up (s): doubling, capped, so a
#: service started before its broker (compose, boot order) comes up as soon as the broker does.
START_RETRY_FIRST_S = 1.0
START_RETRY_MAX_S = 30.0
#: Exit status asking the supervisor for a restart on new code (sysexits.h ``EX_TEMPFAIL``).
EXIT_RESTART = 75


def sd_notify(*fields: str) -> bool:
    """Send ``fields`` (``"READY=1"``, ``"STATUS=..."``) to systemd's ``$NOTIFY_SOCKET``, if set.

    The sd_notify(3) datagram protocol, without libsystemd: the fields joined by newlines, in one
    datagram to the ``AF_UNIX`` socket ``$NOTIFY_SOCKET`` names (a path, or ``@name`` for the
    abstract namespace). Never raises and never blocks: a service must not stop or stall because
    its supervisor's socket is gone or full.

    Args:
        *fields: ``KEY=VALUE`` strings without newlines.

    Returns:
        True when the datagram was sent; False without ``$NOTIFY_SOCKET`` (not run by systemd, or
        an unsupported address such as ``vsock:``) or when sending failed (logged).
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.sendto("\n".join(fields).encode(), address)
    except OSError as e:
        log.warning("sd_notify_failed", error=str(e), fields=list(fields))
        return False
    return True


class Service(Protocol):
    """A long-running service: ``start`` wires it up, ``stop`` shuts it down gracefully."""

    async def start(self) -> None: ...  # noqa: D102

    async def stop(self) -> None: ...  # noqa: D102


async def start_with_retry(service: Service, stop: asyncio.Event) -> bool:
    """Call ``service.start()`` until it connects or ``stop`` is set; False if stopped first.

    Each failure is logged with the (redacted) address and the next delay.
    """
    delay = START_RETRY_FIRST_S
    while not stop.is_set():
        try:
            await service.start()
        except (BrokerError, StoreError) as e:
            log.error("start_failed", error=str(e), retry_in_s=delay)
            # Not the error itself: `systemctl status` shows STATUS to every user.
            sd_notify(f"STATUS=waiting for RabbitMQ/Redis (retry in {delay:.0f} s, see the log)")
            await service.stop()
        else:
            return True
        try:
            await asyncio.wait_for(stop.wait(), delay)
        except TimeoutError:
            delay = min(delay * 2, START_RETRY_MAX_S)
    return False


async def run_until_signalled(service: Service) -> None:
    """Start ``service``, wait for SIGTERM/SIGINT, then stop it (arq's handle_sig pattern)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if not await start_with_retry(service, stop):
        return
    log.info("service_started", event_loop=eventloop.loop_name(asyncio.get_running_loop()))
    sd_notify("READY=1", "STATUS=running")
    # A service may end itself (a worker restarting on new code) by setting ``finished``.
    finished: asyncio.Event | None = getattr(service, "finished", None)
    waits = [asyncio.create_task(stop.wait())]
    if finished is not None:
        waits.append(asyncio.create_task(finished.wait()))
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waits:
            waiter.cancel()
        log.info("service_stopping")
        notify_stopping(service)
        await service.stop()
        log.info("service_stopped")


def notify_stopping(service: Service) -> None:
    """Tell systemd the service is stopping, or reloading when it will re-execute itself.

    A worker that re-executes itself on new code keeps its pid: ``RELOADING=1`` keeps the unit
    active until the new process sends ``READY=1``, where ``STOPPING=1`` would make systemd wait
    for an exit that never comes and kill it at ``TimeoutStopSec``.
    """
    finished: asyncio.Event | None = getattr(service, "finished", None)
    if (
        finished is not None
        and finished.is_set()
        and getattr(service, "exit_action", None) == "reexec"
    ):
        sd_notify("RELOADING=1", "STATUS=restarting on new code")
    else:
        sd_notify("STOPPING=1", "STATUS=stopping")


def main(name: str, factory: Callable[[Settings], Service]) -> None:
    """Entry point body for ``python -m services.<name>``: settings, logging, run."""
    try:
        settings = Settings()
    except SETTINGS_ERRORS as e:
        print(f"{name}: bad settings: {describe_settings_error(e)}", file=sys.stderr)
        sys.exit(2)
    configure_logging(settings, service=name)
    try:
        service = factory(settings)
    except TradePlatError as e:  # a setting this service cannot work with (no storage...)
        print(f"{name}: cannot start: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        eventloop.run(run_until_signalled(service), settings.event_loop)
    except TradePlatError as e:  # refused at start: a duplicate name...
        print(f"{name}: cannot start: {e}", file=sys.stderr)
        sys.exit(2)
    action = getattr(service, "exit_action", None)
    if action == "reexec":
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])  # noqa: S606 - same argv
    if action == "exit":
        sys.exit(EXIT_RESTART)
