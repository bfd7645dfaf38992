"""Training benchmark: one ``train_model`` config run directly and through the whole system.

Run: ``python -m bench.training [--config configs/train_goog.yaml] [--epochs N] [--repeats 3]
[--warmup 1] [--json PATH]`` (``just bench-training``).

* direct: a fresh plain Python process (``python -m bench.training.direct``) imports the task's
  module, builds a ``TaskContext`` (a temporary task folder; MLflow in a SQLite file shared by
  the direct runs) and calls ``train_model.run(config, ctx)`` as the worker's child does
  (``services.gpu_worker.runner.child_main``), without the platform. Timed: that call alone
  (``time.perf_counter`` around it), so the imports are not counted, just as the worker's
  forkserver has them preloaded.
* system: ``services.scheduler`` and ``services.gpu_worker`` (product defaults) as processes in
  a fresh namespace (deleted after); an in-process ``DistributedClient`` runs ``submit_and_wait``.
  Timed: from just before that call until it returns the completed record (submit until the
  client has the result); also reported: the record's run time (``completed_at - running_at``,
  Redis's clock: claim until the outcome is recorded).

Runs alternate direct, system, direct, system... (``--repeats`` of each) after ``--warmup``
uncounted runs of each (the first run creates the MLflow database and warms the caches). It
prints the medians and the ratio system / direct (the issue's target: at most 1.03), and writes
JSON (``bench/results/training-<UTC>.json``).
"""
