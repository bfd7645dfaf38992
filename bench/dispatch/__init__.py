"""Dispatch benchmark: our scheduler and worker beside a Celery 5 worker, same broker, one run.

Run: ``python -m bench.dispatch [--tasks 2000] [--latency-tasks 300] [--sleep-tasks 50]
[--cancel-tasks 20] [--config gpu,cpu] [--system ours,celery] [--json PATH]``
(``just bench-dispatch``). A quick look: ``--tasks 200 --latency-tasks 50 --sleep-tasks 10
--cancel-tasks 3``.

For each configuration, and within it for each system in turn, it starts the system, runs the
workloads below, stops it and deletes everything it created; then it prints one table of both
systems (figures, how many times ours is better, the issue's target, met or not) with the
machine's load and the versions, and writes JSON (``bench/results/dispatch-<UTC>.json``; the
services' logs stay in ``bench/results/dispatch-<UTC>/``).

Systems:

* ours: ``python -m services.scheduler`` and ``python -m services.gpu_worker`` as processes with
  the product's defaults, in a fresh namespace (``bd<hex>-<config>``, deleted after); the client
  is an in-process ``shared.client.DistributedClient``; the task is ``probe`` (``sleep_s`` 0, one
  step), which returns the wall-clock stamps ``started_at`` (first thing in its ``run``) and
  ``returned_at`` (just before it returns).
* celery: ``celery -A bench.dispatch.celery_app worker --pool prefork`` on the same RabbitMQ,
  results in the same Redis server (db 13, keys prefixed per run), with prefetch multiplier 1,
  late acks, ``task_track_started`` and a priority queue (``x-max-priority`` 10); its task
  (``celery_app.noop``) sleeps and returns the same two stamps. Queue, exchanges and keys carry a
  per-run prefix and are deleted after.

Configurations: ``gpu``: one slot (our worker: 1 GPU slot, no CPU slot, prefetch 1, the probe
routed to the ``gpu`` priority queue by ``needs_gpu``; Celery: ``--concurrency 1``). ``cpu``: two
slots (our worker: 2 CPU slots; Celery: ``--concurrency 2``).

Before the measurements ``--warmup`` tasks run uncounted. Every clock is ``time.time()`` on this
one machine, so stamps taken in different processes compare directly.

Metrics, exactly:

* throughput (tasks/s): ``--tasks`` no-op tasks submitted as fast as the client goes (ours:
  ``submit`` with ``--submit-concurrency`` in flight; Celery: ``send_task`` in a loop), then
  waited for together until the client holds every result (ours: one queue bound to the
  namespace's terminal state events, the record read from Redis on each, as ``wait`` does;
  Celery: ``ResultSet.join_native``, Redis pub/sub). tasks / (first submit -> last result held).
* submit->start p50/p99 (ms): ``--latency-tasks`` no-op tasks, one submitted every ``--gap-ms``
  whatever the others do, each waited for by itself (ours: ``subscribed`` then ``submit`` then
  ``wait_on``, as ``submit_and_wait`` does; Celery: ``send_task`` then ``get`` in a waiter
  thread). The task's ``started_at`` minus the client's clock just before the submit call (ours
  subscribe to the task's events before that, as ``submit_and_wait`` does; Celery subscribes to
  the result inside ``send_task``).
* finish->client p50/p99 (ms): same tasks; the client's clock once it holds the result minus the
  task's ``returned_at``.
* overhead on 100 ms tasks (ms/task): ``--sleep-tasks`` tasks sleeping 100 ms, submitted and
  waited for as in the throughput run: wall x slots / tasks - 100 ms.
* cancel p50/p99 (ms): ``--cancel-tasks`` times, one after another: a task sleeping 30 s in 20 ms
  steps is submitted and, once it runs and its process's pid is known (ours: the record's
  ``child_pid``; Celery: the STARTED state's ``pid``), cancelled (ours: ``client.cancel``, which
  returns once the record says ``cancelled``; Celery: ``control.revoke(id, terminate=True)``, then
  ``get`` until the state is REVOKED). Latency = from just before the command until both the
  state is cancelled/REVOKED and the process is gone (no ``/proc/<pid>`` or a zombie, polled
  every 1 ms). Our probe stops cooperatively at its next step (SIGTERM sets its stop flag);
  Celery's pool process dies of the SIGTERM.

The figures share 2 cores with the services under test and whatever else runs: the load average
is printed before and after; compare runs on a quiet machine.

Modules: ``ours`` and ``celery_side`` (one system each, same ``timing.System`` protocol),
``celery_app`` (the Celery app and task the worker imports), ``measure`` (the workloads and their
figures), ``report`` (table, targets, JSON), ``processes``, ``cli``, ``constants``, ``app``.
"""
