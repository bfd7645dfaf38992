"""What every ``tradectl`` command shares: consoles, errors to exit codes, a connected client.

Text that comes from outside the CLI (task errors, config and settings messages, worker names,
metric names, event messages) is escaped before rich prints it: ``[/data/x.csv]`` or ``[a-z]`` in
an error must be printed as is, never read as rich markup.

Exit codes: 0 success; 1 the task failed or was cancelled; 2 bad input (unknown type, bad
config, bad option), nothing queued; 3 the broker or Redis cannot be reached; 4 no such task;
124 ``--wait`` timed out.
"""

from __future__ import annotations

import logging
import sys
import unicodedata
import warnings
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime
from typing import Annotated, Any, NoReturn, TypeVar

import structlog
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress

from shared import eventloop
from shared.client import DistributedClient
from shared.errors import BrokerError, StoreError, TaskNotFoundError
from shared.settings import SETTINGS_ERRORS, FallbackMode, Settings, describe_settings_error

# aio-pika leaves a robust connection's close() un-awaited when its first connect fails (the
# broker is down); Python then warns at exit. Nothing is left open: not the user's concern.
warnings.filterwarnings(
    "ignore",
    message=r"coroutine 'RobustConnection\.close' was never awaited",
    category=RuntimeWarning,
)

# soft_wrap: lines that do not fit are not broken, so logs and pipes get one line per event; a
# pipe gets wide tables (rich would assume 80 columns) so task ids stay whole.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, soft_wrap=True)
T = TypeVar("T")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def fail(message: str, code: int) -> NoReturn:
    """Print ``message`` (plain text, not markup) on stderr and exit with ``code``."""
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def load_settings() -> Settings:
    """Settings from the environment, or exit 2 naming the bad variable."""
    try:
        return Settings()
    except SETTINGS_ERRORS as e:
        fail(f"bad settings: {describe_settings_error(e)}", 2)


def with_client(
    body: Callable[[DistributedClient], Awaitable[T]],
    *,
    fallback: FallbackMode = "never",
    start_timeout_s: float | None = None,
    redis_only: bool = False,
) -> T:
    """Run ``body(client)`` in a fresh event loop with a connected client; map errors to exits.

    ``fallback`` other than ``never`` lets the client run a waited-for task locally (``submit``
    only): ``ask`` asks on the terminal, and means never without one. ``redis_only``: the
    command reads or writes Redis only, so an unreachable RabbitMQ is no error (the client's
    broker is then not connected).
    """
    if redis_only:
        inner = body

        async def body(client: DistributedClient) -> T:
            client.require_store()
            return await inner(client)

        fallback = "local"  # tolerate an unreachable broker at connect

    async def main() -> T:
        # Warnings go to stderr: structlog's default is stdout, which --json keeps for JSON.
        structlog.configure(
            wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
            logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        )
        # aio-pika logs a failed connect itself; the CLI reports it once, as an error.
        for name in ("aio_pika", "aiormq"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        client = DistributedClient(
            load_settings(),
            name="tradectl",
            fallback_local=fallback != "never",
            confirm_fallback=confirm_on_terminal if fallback == "ask" else None,
            start_timeout_s=start_timeout_s,
        )
        async with client:
            result: T = await body(client)
            return result

    try:
        return run(main())
    except TaskNotFoundError as e:
        fail(str(e), 4)
    except (StoreError, BrokerError) as e:
        fail(str(e), 3)


#: Live displays (progress bars) on the terminal: paused while a question is asked there.
live_displays: list[Progress] = []


def confirm_on_terminal(reason: str) -> bool:
    """``--fallback ask``: ask whether to run the task here; no terminal means no."""
    if not sys.stdin.isatty():
        err.print(f"not run locally ({escape(reason)}): --fallback ask and no terminal to ask on")
        return False
    for display in live_displays:
        display.stop()
    try:
        return typer.confirm(f"{printable(reason)}. Run the task on this machine?", err=True)
    finally:
        for display in live_displays:
            display.start()


def run(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` for the CLI, on uvloop where installed (``shared.eventloop``)."""
    return eventloop.run(coro)


def format_ts(ts: float) -> str:
    """Unix seconds as local ISO time with milliseconds."""
    return datetime.fromtimestamp(ts).isoformat(sep=" ", timespec="milliseconds")


def printable(text: str) -> str:
    """``text`` safe for a terminal: control characters (ESC, BEL, CR...) shown escaped.

    Tab and newline are kept (a traceback stays readable).

    Task output and dead-letter headers come from outside; an ESC sequence printed raw could
    clear the laptop's screen, retitle the window or hide the lines after it.
    """
    return "".join(
        ch if ch in "\t\n" or unicodedata.category(ch) != "Cc" else ascii(ch)[1:-1] for ch in text
    )
