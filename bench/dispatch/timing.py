"""What one system's run of a workload hands back, and the figures made of it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Timing:
    """One task's four wall-clock stamps (Unix s).

    ``submitted``: the client's clock just before its submit call; ``started`` and ``returned``:
    the task's own code, first thing and just before it returns (from its result);
    ``received``: the client's clock once it holds the result.
    """

    submitted: float
    started: float
    returned: float
    received: float

    @property
    def submit_to_start_s(self) -> float:
        return self.started - self.submitted

    @property
    def finish_to_client_s(self) -> float:
        return self.received - self.returned


@dataclass
class Batch:
    """A batch: tasks submitted as fast as the client goes, then waited for all together.

    ``wall_s`` runs from just before the first submit until the client holds every result.
    """

    wall_s: float
    timings: list[Timing]
    failed: int = 0


@dataclass
class Cancels:
    """Cancel latencies (s) of running tasks, and the cancels that did not end in time."""

    latencies_s: list[float] = field(default_factory=list)
    state_s: list[float] = field(default_factory=list)
    gone_s: list[float] = field(default_factory=list)
    timed_out: int = 0
    notes: list[str] = field(default_factory=list)


class System(Protocol):
    """One system under test, started in one configuration."""

    name: str

    async def start(self) -> None:
        """Start its processes and connect; ready to take tasks when it returns."""

    async def stop(self) -> None:
        """Stop its processes and delete what it created on the broker and in Redis."""

    async def batch(self, n: int, sleep_s: float) -> Batch:
        """Submit ``n`` tasks sleeping ``sleep_s`` as fast as possible; wait for every result."""

    async def spaced(self, n: int, gap_s: float) -> list[Timing]:
        """Submit ``n`` no-op tasks ``gap_s`` apart, each waited for by itself."""

    async def cancels(self, n: int) -> Cancels:
        """Start, then cancel, ``n`` long tasks one after another."""


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary_ms(values_s: Sequence[float]) -> dict[str, Any]:
    """p50, p90, p99, max and mean in ms, and the count, of durations in seconds."""
    ms = [v * 1000 for v in values_s]
    return {
        "n": len(ms),
        "p50": percentile(ms, 50),
        "p90": percentile(ms, 90),
        "p99": percentile(ms, 99),
        "max": max(ms) if ms else math.nan,
        "mean": sum(ms) / len(ms) if ms else math.nan,
    }
