"""Prometheus metrics of the platform, named in the style of Flower's (``flower_*``).

Gauges are set from each snapshot; the counters and the run-time histogram count tasks that
reached a terminal state since the monitor started, read exactly from the per-state indexes in
Redis (not from events, which are news and may be missed), so they match the tasks that ran.

=======================================================  ==========================================
``tradeplat_worker_online{worker}``                      1 while the worker's heartbeat is live
``tradeplat_workers_online``                             live workers
``tradeplat_worker_executing_tasks{worker}``             tasks the worker runs now
``tradeplat_gpu_memory_used_bytes{worker,gpu}``          NVML, per GPU (also ``_total_bytes``)
``tradeplat_gpu_utilization_percent{worker,gpu}``        NVML
``tradeplat_gpu_temperature_celsius{worker,gpu}``        NVML
``tradeplat_tasks_in_state{state}``                      tasks in each state now
``tradeplat_tasks_total{task,state}``                    tasks that ended (counter)
``tradeplat_task_runtime_seconds{task}``                 run time of tasks that ended (histogram)
``tradeplat_queue_messages{queue}``                      RabbitMQ's message count
``tradeplat_queue_consumers{queue}``                     RabbitMQ's consumer count
``tradeplat_oldest_queued_task_age_seconds``             age of the oldest queued task
``tradeplat_git_sync_age_seconds{host}``                 since git-sync's last successful fetch
``tradeplat_artifact_sync_backlog{state}``               pending, syncing, failed
``tradeplat_alerts_active``                              active alerts
=======================================================  ==========================================
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from services.health_monitor.snapshot import HealthSnapshot
from shared.health import ServiceState
from shared.messages import TERMINAL_STATES
from shared.store import StatusStore

#: Run-time buckets (s): from a probe's fraction of a second to a day-long training.
RUNTIME_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 1800, 3600, 3 * 3600, 8 * 3600, 24 * 3600)
PREFIX = "tradeplat"


class Metrics:
    """A Prometheus registry of the platform's metrics (text format via ``render``)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(f"{PREFIX}_{name}", doc, labels, registry=r)

        self.worker_online = gauge("worker_online", "1 while the worker is live", ("worker",))
        self.workers_online = gauge("workers_online", "Live workers")
        self.executing = gauge("worker_executing_tasks", "Tasks the worker runs now", ("worker",))
        gpu = ("worker", "gpu")
        self.gpu_used = gauge("gpu_memory_used_bytes", "GPU memory used (NVML)", gpu)
        self.gpu_total = gauge("gpu_memory_total_bytes", "GPU memory (NVML)", gpu)
        self.gpu_util = gauge("gpu_utilization_percent", "GPU utilisation (NVML)", gpu)
        self.gpu_temp = gauge("gpu_temperature_celsius", "GPU temperature (NVML)", gpu)
        self.tasks = gauge("tasks_in_state", "Tasks in each state now", ("state",))
        self.queue_messages = gauge("queue_messages", "Messages in the queue", ("queue",))
        self.queue_consumers = gauge("queue_consumers", "Consumers of the queue", ("queue",))
        self.oldest_queued = gauge(
            "oldest_queued_task_age_seconds", "Age of the oldest queued task"
        )
        self.git_age = gauge(
            "git_sync_age_seconds", "Seconds since git-sync's last successful fetch", ("host",)
        )
        self.artifact_backlog = gauge(
            "artifact_sync_backlog", "Artifact syncs not done", ("state",)
        )
        self.alerts = gauge("alerts_active", "Active alerts")
        self.finished = Counter(
            f"{PREFIX}_tasks",
            "Tasks that ended, by type and final state",
            ("task", "state"),
            registry=r,
        )
        self.runtime = Histogram(
            f"{PREFIX}_task_runtime_seconds",
            "Run time of tasks that ended (running -> end)",
            ("task",),
            buckets=RUNTIME_BUCKETS,
            registry=r,
        )
        #: Per terminal state: the Redis-clock time up to which ended tasks were counted, and the
        #: ids counted at exactly that time (two tasks can end in the same microsecond).
        self._watermarks: dict[str, tuple[float, set[str]]] = {}

    def render(self) -> bytes:
        """The registry in Prometheus' text exposition format."""
        return generate_latest(self.registry)

    async def count_finished(self, store: StatusStore, since: float) -> None:
        """Count tasks that ended since the last call (since ``since`` on the first).

        Raises:
            StoreError: Redis failed (nothing is counted twice: the watermark moves only after).
        """
        for state in TERMINAL_STATES:
            mark, at_mark = self._watermarks.get(state.value, (since, set()))
            entered = [
                (task_id, ts)
                for task_id, ts in await store.entered_since(state, mark)
                if not (ts == mark and task_id in at_mark)
            ]
            if not entered:
                continue
            for record in await store.get_many(task_id for task_id, _ in entered):
                if record.state is not state:
                    continue  # moved on since (cannot happen for terminal states, but cheap)
                self.finished.labels(record.task_type, state.value).inc()
                if record.running_at is not None and record.finished_at is not None:
                    runtime = max(0.0, record.finished_at - record.running_at)
                    self.runtime.labels(record.task_type).observe(runtime)
            last = entered[-1][1]
            ids = {task_id for task_id, ts in entered if ts == last}
            self._watermarks[state.value] = (last, ids | (at_mark if last == mark else set()))

    def update(self, snapshot: HealthSnapshot, active_alerts: int) -> None:
        """Set every gauge from ``snapshot`` (labels of things gone are removed)."""
        for g in (
            self.worker_online,
            self.executing,
            self.gpu_used,
            self.gpu_total,
            self.gpu_util,
            self.gpu_temp,
            self.queue_messages,
            self.queue_consumers,
            self.git_age,
        ):
            g.clear()
        online = 0
        for service in snapshot.workers:
            beat, facts = service.heartbeat, service.heartbeat.worker
            assert facts is not None
            live = service.state is not ServiceState.OFFLINE
            online += live
            self.worker_online.labels(beat.name).set(int(live))
            self.executing.labels(beat.name).set(len(facts.running) if live else 0)
            for gpu in facts.gpu.gpus if live else []:
                labels = (beat.name, str(gpu.index))
                self.gpu_used.labels(*labels).set(gpu.memory_used_bytes)
                self.gpu_total.labels(*labels).set(gpu.memory_total_bytes)
                if gpu.utilization_pct is not None:
                    self.gpu_util.labels(*labels).set(gpu.utilization_pct)
                if gpu.temperature_c is not None:
                    self.gpu_temp.labels(*labels).set(gpu.temperature_c)
        self.workers_online.set(online)
        for state, n in snapshot.tasks_by_state.items():
            self.tasks.labels(state).set(n)
        for queue in snapshot.queues:
            self.queue_messages.labels(queue.name).set(queue.messages)
            self.queue_consumers.labels(queue.name).set(queue.consumers)
        self.oldest_queued.set(snapshot.oldest_queued_age_s or 0.0)
        for git in snapshot.sync.git:
            if git.last_fetch_at is not None:
                self.git_age.labels(git.host).set(max(0.0, snapshot.ts - git.last_fetch_at))
        sync = snapshot.sync
        self.artifact_backlog.labels("pending").set(sync.artifacts_pending)
        self.artifact_backlog.labels("syncing").set(sync.artifacts_syncing)
        self.artifact_backlog.labels("failed").set(sync.artifacts_failed)
        self.alerts.set(active_alerts)
