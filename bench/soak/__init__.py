"""Soak test: thousands of short probe tasks while workers are SIGKILLed and restarted.

Starts a scheduler and ``--workers`` gpu_worker processes (cpu lane only, one slot each) in a
namespace of its own, submits ``--tasks`` short ``probe`` tasks, and every ``--kill-every``
seconds (with jitter) SIGKILLs a random worker and starts it again at once. When every task is
terminal (or the deadline passes) it stops the killer and checks the Redis records, their
histories and the services' logs:

* lost: a task that is missing or not terminal at the end;
* completed twice: a task whose history moves into ``completed`` more than once, that more than
  one worker log line says completed, or whose probe ran to completion in a run whose outcome was
  then refused (``task_outcome_not_recorded`` with outcome ``completed`` in a worker log: a late
  duplicate finish);
* how many runs each task needed, what the reaper did, kills, wall time and throughput.

It exits 1 if any task was lost or completed twice, 2 if the services did not start, 130 on
Ctrl-C. Every process it started is killed on the way out, and the namespace's Redis keys,
queues and exchanges are deleted.

Run: ``python -m bench.soak [--tasks 2000] [--workers 2] [--kill-every 3] [--json out.json]``
(``just bench-soak``; ``python bench/soak.py`` still works). Logs go to
``bench/results/soak-<namespace>/logs`` (kept).

Modules: ``processes`` (start, kill, find the service processes), ``load`` (submits, the killer,
the watch), ``analysis`` (records, histories, logs -> the verdict's numbers), ``report`` (the
report dict, table and JSON), ``cleanup`` (the namespace's keys, queues, exchanges), ``queues``
(queue counts), ``cli`` (options), ``app`` (wiring and lifecycle), ``constants``.
"""

from .app import main

__all__ = ["main"]
