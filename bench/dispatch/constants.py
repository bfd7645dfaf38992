"""The dispatch benchmark's fixed values, each with the reason for it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: The repository root: services and the Celery worker start there; results go under ``bench``.
ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class SlotConfig:
    """One of the issue's two configurations, the same for both systems."""

    #: ``gpu`` or ``cpu``.
    name: str
    #: Tasks run at once: our worker's slots of that lane, Celery's ``--concurrency``.
    slots: int
    #: Our probe's ``needs_gpu`` (routes it to the ``gpu`` queue).
    needs_gpu: bool
    #: Our worker's environment for this configuration.
    worker_env: dict[str, str]


#: gpu: one execution slot, prefetch 1 (our worker consumes with prefetch = free slots), the
#: priority queue ``gpu``; Celery: prefork concurrency 1. cpu: two slots of the ``cpu`` queue;
#: Celery: prefork concurrency 2. Celery keeps prefetch multiplier 1 and late acks in both.
CONFIGS = {
    "gpu": SlotConfig("gpu", 1, True, {"TP_WORKER_GPU_SLOTS": "1", "TP_WORKER_CPU_SLOTS": "0"}),
    "cpu": SlotConfig("cpu", 2, False, {"TP_WORKER_GPU_SLOTS": "0", "TP_WORKER_CPU_SLOTS": "2"}),
}

SYSTEMS = ("ours", "celery")

#: The issue's counts: 2,000 tasks for throughput, 300 for latency, 20 ms apart.
DEFAULT_TASKS = 2000
DEFAULT_LATENCY_TASKS = 300
DEFAULT_GAP_MS = 20.0
#: 100 ms sleep tasks for the overhead: 50 of them take 5 s per system with one slot.
DEFAULT_SLEEP_TASKS = 50
SLEEP_TASK_S = 0.1
#: Running tasks cancelled one after another (each needs a start and a stop, ~0.5 s).
DEFAULT_CANCEL_TASKS = 20
#: Tasks run (and not counted) before the measurements: the first run of each code path on a
#: fresh worker pays imports and connection set-up that no later task pays.
DEFAULT_WARMUP = 20
#: Our client's submits in flight during a batch (asyncio); Celery's ``send_task`` is called in a
#: loop from one thread, its normal use (it publishes without confirms, so it does not wait).
DEFAULT_SUBMIT_CONCURRENCY = 100

#: The task a cancel is measured on sleeps this long in steps of ``CANCEL_STEP_S``: it is always
#: still running when the cancel arrives, and our probe sees the stop at its next step.
CANCEL_TASK_SLEEP_S = 30.0
CANCEL_STEP_S = 0.02
#: How often the benchmark looks whether a cancelled task's process is gone (s).
PID_POLL_S = 0.001
#: How often it looks whether a task started (to learn its pid before cancelling it) (s).
START_POLL_S = 0.002

#: Seconds the services (a cold torch import in the forkserver) or Celery get to start.
START_TIMEOUT_S = 180.0
#: Seconds a batch may take before the benchmark gives up on it.
RESULT_TIMEOUT_S = 900.0
#: Seconds a cancel may take before the benchmark gives up on it (it is then recorded as such).
CANCEL_TIMEOUT_S = 30.0

#: Celery's result backend: a Redis db of its own (ours uses db 0 in the default setup), and a
#: key prefix per run on top, so its clean-up can never touch anything else.
CELERY_REDIS_DB = 13
#: The Celery task's registered name.
CELERY_TASK_NAME = "bench.dispatch.noop"
