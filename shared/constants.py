"""Values with their reasons, in one place (arq's ``constants.py`` is the model)."""

from __future__ import annotations

#: RabbitMQ classic priority queues: 0-9 as users write it. Each extra level costs the broker an
#: internal sub-queue, so we take the ten levels users think in, not 255.
MAX_PRIORITY = 9
DEFAULT_PRIORITY = 5

#: Messages are small JSON documents (a spec, an event). 1 MiB refuses anything that is clearly not
#: one of ours before it is parsed (a config with an inlined dataset belongs in storage instead).
DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024

#: The scheduler only validates and routes, so a deep prefetch keeps intake fast; 64 is the
#: ceiling beyond which aio-pika showed no gain on 2 cores.
SCHEDULER_PREFETCH = 64

#: How long a publisher waits for a broker confirm before it reports the publish as failed (s).
PUBLISH_CONFIRM_TIMEOUT_S = 15.0

#: Finished task records stay in Redis this long for ``task result`` and listings (s). 30 days.
FINISHED_TASK_TTL_S = 30 * 24 * 3600

#: Progress events are throttled to this rate per task so a tight training loop cannot flood the
#: broker or Redis (s between two progress writes).
PROGRESS_MIN_INTERVAL_S = 0.2

#: How long the worker waits for a child to exit after its result arrived (s).
CHILD_EXIT_GRACE_S = 10.0
#: After a drain times out and its tasks are told to stop: how much longer than their SIGTERM
#: grace and ``CHILD_EXIT_GRACE_S`` the worker waits for them to end and be handed back (s).
HAND_BACK_BOUND_S = 30.0

#: Length of the traceback summary kept in a failed task's record (characters, tail kept).
TRACEBACK_SUMMARY_CHARS = 4000

#: Routing keys inside ``tp.tasks``.
ROUTE_SUBMIT = "submit"
ROUTE_GPU = "gpu"
ROUTE_CPU = "cpu"
ROUTE_ARTIFACTS = "artifacts"
