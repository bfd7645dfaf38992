"""The Celery side of the dispatch benchmark: its app and the same no-op task as our ``probe``.

The worker is started as ``celery -A bench.dispatch.celery_app worker ...`` with the settings in
``BENCH_CELERY_*`` environment variables (``CeleryRun.env``); the benchmark's own process builds
the same app with ``make_app``. Everything it creates on the shared broker and Redis carries the
run's prefix: its task queue and exchange, its control and event exchanges, its result keys (in
Redis db ``CELERY_REDIS_DB``), so that ``bench.dispatch.celery_side`` can delete exactly those.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from .constants import CELERY_TASK_NAME

#: Highest priority of the task queue (RabbitMQ ``x-max-priority``), as our queues have.
MAX_PRIORITY = 10
#: Priority the benchmark's tasks are sent with (ours send ``DEFAULT_PRIORITY`` too).
TASK_PRIORITY = 5


@dataclass(frozen=True)
class CeleryRun:
    """Where one run's Celery app lives: broker, result backend and the run's name prefix."""

    broker_url: str
    backend_url: str
    prefix: str

    @property
    def queue(self) -> str:
        """The task queue (and its direct exchange)."""
        return f"{self.prefix}.tasks"

    @property
    def control_exchange(self) -> str:
        """Celery's control exchange name; it declares ``<name>.pidbox`` and ``reply.<name>...``."""
        return f"{self.prefix}.ctl"

    @property
    def event_exchange(self) -> str:
        """Celery's event exchange (no events are sent: the worker runs without ``-E``)."""
        return f"{self.prefix}.ev"

    @property
    def key_prefix(self) -> str:
        """Prefix of every result key in Redis (``global_keyprefix``)."""
        return f"{self.prefix}:"

    def env(self) -> dict[str, str]:
        """The worker process's ``BENCH_CELERY_*`` variables."""
        return {
            "BENCH_CELERY_BROKER": self.broker_url,
            "BENCH_CELERY_BACKEND": self.backend_url,
            "BENCH_CELERY_PREFIX": self.prefix,
        }

    @classmethod
    def from_env(cls) -> CeleryRun:
        """The run the environment names (defaults: local broker and Redis db 13)."""
        return cls(
            os.environ.get("BENCH_CELERY_BROKER", "amqp://guest:guest@127.0.0.1:5672//"),
            os.environ.get("BENCH_CELERY_BACKEND", "redis://127.0.0.1:6379/13"),
            os.environ.get("BENCH_CELERY_PREFIX", "benchcelery"),
        )


def noop(sleep_s: float = 0.0, steps: int = 1) -> dict[str, Any]:
    """Our ``probe``'s counterpart: sleep ``sleep_s`` in ``steps`` steps, return when it ran.

    ``started_at`` is taken first thing and ``returned_at`` just before returning (Unix s).
    """
    started_at = time.time()
    step_s = sleep_s / steps
    for _ in range(steps):
        time.sleep(step_s)
    return {"pid": os.getpid(), "started_at": started_at, "returned_at": time.time()}


def make_app(run: CeleryRun) -> Any:
    """The Celery app of ``run``, configured as the issue's "gpu" setting asks.

    Prefetch multiplier 1 and late acks (a task's message is acked when it ends, as GPU work
    needs), a priority queue, ``task_track_started`` (the STARTED state carries the pool
    process's pid, which the cancel measurement watches), JSON only. The concurrency is the
    worker's ``--concurrency`` option.
    """
    app = Celery("bench_dispatch", broker=run.broker_url, backend=run.backend_url)
    exchange = Exchange(run.queue, type="direct", durable=True)
    queue = Queue(
        run.queue,
        exchange,
        routing_key=run.queue,
        queue_arguments={"x-max-priority": MAX_PRIORITY},
    )
    app.conf.update(
        task_queues=[queue],
        task_default_queue=run.queue,
        task_default_exchange=run.queue,
        task_default_routing_key=run.queue,
        task_queue_max_priority=MAX_PRIORITY,
        task_default_priority=TASK_PRIORITY,
        worker_prefetch_multiplier=1,
        task_acks_late=True,
        task_track_started=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_backend_transport_options={"global_keyprefix": run.key_prefix},
        result_expires=3600,
        control_exchange=run.control_exchange,
        event_exchange=run.event_exchange,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    app.task(name=CELERY_TASK_NAME)(noop)
    return app


#: The app ``celery -A bench.dispatch.celery_app worker`` finds (configured from the environment).
app = make_app(CeleryRun.from_env())
