"""The event loop every service, the CLI and the benchmarks run on: uvloop where installed.

uvloop (libuv, in C) runs the same asyncio code with less CPU per callback, socket read and timer
than the standard library's selector loop; on this 2-core machine the services' per-task work is
mostly such callbacks (AMQP frames, Redis replies, pipe reads). ``TP_EVENT_LOOP`` chooses:
``auto`` (uvloop when importable, else asyncio), ``uvloop`` (required), ``asyncio``.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

T = TypeVar("T")

EventLoopKind = Literal["auto", "uvloop", "asyncio"]


def loop_factory(kind: EventLoopKind = "auto") -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The factory for ``asyncio.Runner``; None means the standard library's default loop.

    Raises:
        ImportError: ``kind`` is ``uvloop`` and uvloop is not installed.
    """
    if kind == "asyncio":
        return None
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        if kind == "uvloop":
            raise
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """``uvloop`` or ``asyncio``: which loop runs (for logs and benchmark reports)."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def run(coro: Coroutine[Any, Any, T], kind: EventLoopKind = "auto") -> T:
    """``asyncio.run(coro)`` on the loop ``kind`` selects."""
    with asyncio.Runner(loop_factory=loop_factory(kind)) as runner:
        return runner.run(coro)
