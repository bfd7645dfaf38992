"""Container and unit health check: is this machine's service of a kind alive?

``python -m shared.healthcheck <kind>`` (``scheduler``, ``gpu-worker``, ``git-sync``,
``artifact-sync``, ``health-monitor``) reads the service's heartbeat key in Redis
(``<ns>:service:<kind>:<name>``, written every ``TP_HEARTBEAT_INTERVAL_S`` and expiring after
``TP_HEARTBEAT_TTL_S``) with the same settings the service runs with. The name is
``TP_WORKER_NAME`` for a worker and git-sync, the host name for the others, as the services use
(:class:`shared.health.Beacon`); ``--name`` overrides it.

Exit status: 0 alive (prints ``<kind> <name> alive``), 1 no live heartbeat or Redis unreachable
(prints why on stderr), 2 bad settings or arguments. Used by the compose file's ``healthcheck``,
the images' ``HEALTHCHECK`` and the systemd tests; it never touches RabbitMQ.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys

from pydantic import ValidationError

from shared.errors import StoreError
from shared.health import WORKER_KIND, Heartbeat
from shared.settings import SETTINGS_ERRORS, Settings, describe_settings_error
from shared.store import StatusStore

KINDS = ("scheduler", WORKER_KIND, "git-sync", "artifact-sync", "health-monitor")


async def check(settings: Settings, kind: str, name: str) -> Heartbeat | None:
    """The live heartbeat of ``kind``/``name``, or None when its key has expired.

    Raises:
        StoreError: Redis cannot be reached or the heartbeat is unreadable.
    """
    store = StatusStore(settings)
    await store.start()
    try:
        body = await store.redis.get(store.keys.service(kind, name))
    finally:
        await store.stop()
    if body is None:
        return None
    try:
        return Heartbeat.model_validate_json(body)
    except ValidationError as e:
        raise StoreError(f"heartbeat of {kind} {name} is unreadable: {e}") from e


def main(argv: list[str] | None = None) -> int:
    """Command-line entry; returns the exit status (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m shared.healthcheck", description=__doc__)
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--name", help="service name (default: as the service picks it)")
    args = parser.parse_args(argv)
    try:
        settings = Settings(socket_timeout_s=3.0)
    except SETTINGS_ERRORS as e:
        print(f"healthcheck: bad settings: {describe_settings_error(e)}", file=sys.stderr)
        return 2
    # git-sync names itself after the worker it serves (one checkout per desktop), like a worker.
    by_worker_name = args.kind in (WORKER_KIND, "git-sync")
    name = args.name or (settings.worker_name if by_worker_name else socket.gethostname())
    try:
        beat = asyncio.run(check(settings, args.kind, name))
    except StoreError as e:
        print(f"healthcheck: {e}", file=sys.stderr)
        return 1
    if beat is None:
        print(f"healthcheck: no live heartbeat of {args.kind} {name}", file=sys.stderr)
        return 1
    print(f"{args.kind} {name} alive (pid {beat.pid}, up {beat.uptime_s:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
