"""``hyperopt`` and ``hyperopt_trial``: an Optuna study run by several tasks on the worker pool.

The ``hyperopt`` task creates the study in Redis (:mod:`.hyperopt_study`), submits
``parallel - 1`` ``hyperopt_trial`` tasks through the platform's client, and runs trials itself
too, so a worker with one slot never waits on trial tasks that cannot start: once the study has
all its trials, the trial tasks still queued are cancelled. It then waits for the trial tasks
that run, takes over any trial a dead one left (marked lost, its parameters enqueued again), and
writes the result, the artifacts and the MLflow runs (:mod:`.hyperopt_report`). A trial task runs
trials until the study has enough, or its hyperopt task has ended.

Both reach the platform from their child process through the worker's settings
(``TaskContext.settings``, :mod:`.platform_link`): Redis for the study and the task records,
RabbitMQ to submit.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import redis
import structlog
from optuna.trial import FrozenTrial, TrialState

from services.gpu_worker.context import RetryableTaskError, TaskContext
from services.gpu_worker.tasks import hyperopt_report as report
from services.gpu_worker.tasks.hyperopt_objectives import make_objective
from services.gpu_worker.tasks.hyperopt_study import (
    ATTR_ERROR,
    ATTR_METRICS,
    ATTR_RUN,
    ATTR_TASK,
    RunnerIdentity,
    StopRequested,
    StudyHandle,
    TrialRunner,
    finished,
    open_study,
    runner_seed,
)
from services.gpu_worker.tasks.platform_link import PlatformLink
from shared.constants import FINISHED_TASK_TTL_S
from shared.errors import BrokerError, StoreError
from shared.hyperopt_config import HyperoptConfig, HyperoptTrialConfig
from shared.messages import TaskState, task_id_for_key
from shared.settings import Settings

log = structlog.get_logger(__name__)

#: While its trial tasks run, the hyperopt task looks at their records this often (s).
POLL_S = 1.0
#: States in which a trial task stops taking trials: its hyperopt task is gone or going.
PARENT_GONE = (TaskState.CANCELLING, TaskState.CANCELLED, TaskState.FAILED, TaskState.COMPLETED)
#: A trial task looks at its hyperopt task's record at most this often while it trains (s).
PARENT_CHECK_S = 2.0
#: Longest task id (``shared.messages.TASK_ID_PATTERN``).
MAX_TASK_ID_CHARS = 128


def trial_task_ids(parent_task_id: str, runners: int) -> list[str]:
    """Ids of a study's trial tasks (runners 1 .. runners - 1): ``<id>.runner-<n>``.

    The same on every attempt of the hyperopt task, so a retried one re-submits nothing new.
    An id too long for that form (over 128 characters) is derived from it (uuid5).
    """
    ids = []
    for runner in range(1, runners):
        readable = f"{parent_task_id}.runner-{runner}"
        ids.append(readable if len(readable) <= MAX_TASK_ID_CHARS else task_id_for_key(readable))
    return ids


def _settings(ctx: TaskContext) -> Settings:
    if ctx.settings is None:
        raise RuntimeError(
            "hyperopt runs in a worker: it needs the platform's settings (TaskContext.settings)"
        )
    return ctx.settings


def run(config: HyperoptConfig, ctx: TaskContext) -> dict[str, Any]:
    """Run the study; the ``hyperopt`` entry point.

    Returns:
        JSON-serialisable result: ``best_params``, ``best_value``, ``best_trial``,
        ``best_metrics`` (the target's metrics of the best trial), ``trials`` (the trials
        table, see :func:`.hyperopt_report.trial_rows`; the first ``RESULT_TRIAL_ROWS``),
        ``trial_counts`` (by state, ``LOST`` for trials run again), ``runners`` (each task
        that ran trials: runner number, state, trials run), ``study`` (name and Redis key
        prefix), ``artifacts``, ``mlflow_run_id`` and ``metrics`` (``best_value`` and the
        counts, for events and the dashboard). A run stopped early returns
        ``{"stopped": True}``.

    Raises:
        RuntimeError: no trial completed (every one failed or was pruned).
        RetryableTaskError: Redis or RabbitMQ failed (the task is retried and goes on with the
            study where it was).
        TimeoutError: the study's claim lock could not be taken (retried too).
    """
    with outages_retried():
        return _run_study(config, ctx)


def _run_study(config: HyperoptConfig, ctx: TaskContext) -> dict[str, Any]:
    settings = _settings(ctx)
    who = RunnerIdentity.new(ctx.task_id, ctx.attempt, settings.worker_name, runner=0)
    handle = open_study(settings, ctx.task_id, config, seed=runner_seed(config, 0, ctx.attempt))
    helpers = trial_task_ids(ctx.task_id, config.runners)
    try:
        with contextlib.closing(PlatformLink(settings, by=f"hyperopt:{ctx.task_id}")) as link:
            runner = TrialRunner(
                handle,
                config,
                who,
                make_objective(config, ctx, ctx.should_stop),
                should_stop=ctx.should_stop,
                on_trial_end=lambda trials: _report_progress(ctx, config, trials),
            )
            runner.recover_own()
            if helpers:
                configs = {
                    task_id: HyperoptTrialConfig(
                        parent_task_id=ctx.task_id, runner=n, study=config
                    ).model_dump(mode="json")
                    for n, task_id in enumerate(helpers, start=1)
                }
                link.submit("hyperopt_trial", configs, like=link.record(ctx.task_id))
            if not _drive(runner, link, helpers, ctx):
                return {"stopped": True, "trials_run": runner.trials_run}
            runners = _runners(link, helpers, handle.trials(), who)
        return _finish(ctx, config, handle, runners)
    finally:
        # However the run ends (done, cancelled, failed), the study's keys expire with the
        # task's record: a retry within 30 days finds it; nothing stays in Redis for ever.
        with contextlib.suppress(Exception):
            _keep_for(handle, FINISHED_TASK_TTL_S)
        handle.close()


def _drive(runner: TrialRunner, link: PlatformLink, helpers: list[str], ctx: TaskContext) -> bool:
    """Run trials until the study has them all and every trial task has ended.

    Returns:
        False when the task was asked to stop first.
    """
    own_run = runner.who.run
    while True:
        try:
            runner.run()
        except StopRequested:
            return False
        if ctx.should_stop():
            return False
        # Every trial is claimed: a trial task that has not started has nothing left to do,
        # and waiting for it could wait for ever (it may need the slot this task holds).
        link.cancel_unstarted(helpers, "the study had all its trials before it started")
        states = link.states(helpers)
        ended = {h for h in helpers if h not in states or states[h].is_terminal}
        if len(ended) == len(helpers):
            # No other runner is left: a RUNNING trial not of this run is lost.
            if not runner.recover(
                lambda t: t.user_attrs.get(ATTR_RUN) != own_run,
                "lost: its runner ended without finishing it",
            ):
                return True
            continue
        if runner.recover(_run_by(ended), "lost: its trial task ended without finishing it"):
            continue
        _report_progress(ctx, runner.config, runner.handle.trials())
        time.sleep(POLL_S)


def _run_by(task_ids: set[str]) -> Callable[[FrozenTrial], bool]:
    """A check: was the trial taken by one of ``task_ids``?"""
    return lambda trial: trial.user_attrs.get(ATTR_TASK) in task_ids


def _report_progress(ctx: TaskContext, config: HyperoptConfig, trials: list[FrozenTrial]) -> None:
    done = finished(trials)
    values = [t.value for t in trials if t.state is TrialState.COMPLETE and t.value is not None]
    metrics: dict[str, float] = {}
    message = f"{done}/{config.n_trials} trials"
    if values:
        best = min(values) if config.direction == "minimize" else max(values)
        metrics["best_value"] = best
        message += f", best {config.metric} {best:.6g}"
    ctx.report_progress(done / config.n_trials, message, metrics)


def _runners(
    link: PlatformLink, helpers: list[str], trials: list[FrozenTrial], who: RunnerIdentity
) -> dict[str, dict[str, Any]]:
    """Each task of the study: its runner number, state and trials run (all attempts)."""
    states = link.states(helpers)
    ran: dict[str, int] = {}
    for trial in trials:
        task_id = trial.user_attrs.get(ATTR_TASK)
        if task_id is not None:
            ran[task_id] = ran.get(task_id, 0) + 1
    runners = {who.task_id: {"runner": 0, "state": TaskState.RUNNING.value}}
    for n, task_id in enumerate(helpers, start=1):
        state = states.get(task_id)
        runners[task_id] = {"runner": n, "state": state.value if state else None}
    for task_id, entry in runners.items():
        entry["trials"] = ran.get(task_id, 0)
    return runners


def _finish(
    ctx: TaskContext,
    config: HyperoptConfig,
    handle: StudyHandle,
    runners: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Write the artifacts and MLflow runs, build the result (the study expires in 30 days)."""
    trials = handle.trials()
    complete = [t for t in trials if t.state is TrialState.COMPLETE]
    if not complete:
        errors = [t.user_attrs[ATTR_ERROR] for t in trials if ATTR_ERROR in t.user_attrs]
        raise RuntimeError(
            f"no trial of the study completed ({len(trials)} trials); "
            f"first error: {errors[0] if errors else 'none recorded (all pruned?)'}"
        )
    artifacts, brief = report.write_artifacts(
        ctx.artifact_dir, handle.study, trials, config, handle.prefix
    )
    run_id = report.record_mlflow(
        ctx, config, trials, brief, [ctx.artifact_dir / name for name in artifacts]
    )
    rows = report.trial_rows(trials)
    counts = brief["trial_counts"]
    best = handle.study.best_trial
    return {
        "metrics": {
            "best_value": float(brief["best_value"]),
            **{f"trials_{k.lower()}": float(v) for k, v in counts.items()},
        },
        "best_params": brief["best_params"],
        "best_value": brief["best_value"],
        "best_trial": brief["best_trial"],
        "best_metrics": best.user_attrs.get(ATTR_METRICS, {}),
        "target": config.target,
        "metric": config.metric,
        "direction": config.direction,
        "n_trials": config.n_trials,
        "trial_counts": counts,
        "trials": rows[: report.RESULT_TRIAL_ROWS],
        "trials_truncated": len(rows) > report.RESULT_TRIAL_ROWS,
        "runners": runners,
        "study": {"name": handle.study.study_name, "key_prefix": handle.prefix},
        "artifacts": artifacts,
        "mlflow_run_id": run_id,
    }


def _keep_for(handle: StudyHandle, ttl_s: int) -> None:
    """Expire the study's Redis keys with the task's record (kept until then to inspect it)."""
    client = handle.journal.client
    with client.pipeline(transaction=False) as pipe:
        for key in client.scan_iter(match=f"{handle.prefix}:*", count=1000):
            pipe.expire(key, ttl_s)
        pipe.execute()


def run_trials(config: HyperoptTrialConfig, ctx: TaskContext) -> dict[str, Any]:
    """Run trials of a hyperopt task's study; the ``hyperopt_trial`` entry point.

    Takes trials until the study has ``n_trials`` or the hyperopt task has ended or is being
    cancelled (checked before each trial and, at most every ``PARENT_CHECK_S``, between epochs).
    A trial of an earlier run of this task that was left RUNNING (its worker died) is marked lost
    and enqueued again first.

    Returns:
        ``parent_task_id``, ``runner``, ``trials_run`` (by this run) and ``metrics``
        (``trials_run``).

    Raises:
        RetryableTaskError: Redis or RabbitMQ failed.
    """
    with outages_retried():
        return _run_trials(config, ctx)


def _run_trials(config: HyperoptTrialConfig, ctx: TaskContext) -> dict[str, Any]:
    settings = _settings(ctx)
    study = config.study
    who = RunnerIdentity.new(ctx.task_id, ctx.attempt, settings.worker_name, config.runner)
    seed = runner_seed(study, config.runner, ctx.attempt)
    handle = open_study(settings, config.parent_task_id, study, seed=seed)
    try:
        link = PlatformLink(settings, by=f"hyperopt:{config.parent_task_id}")
        with contextlib.closing(link):
            watch = ParentWatch(link, config.parent_task_id)

            def should_stop() -> bool:
                return ctx.should_stop() or watch.gone()

            objective = make_objective(study, ctx, should_stop)
            runner = TrialRunner(handle, study, who, objective, should_stop=should_stop)
            runner.recover_own()
            try:
                runner.run()
            except StopRequested:
                log.info("trials_stopped", trials_run=runner.trials_run)
    finally:
        handle.close()
    return {
        "parent_task_id": config.parent_task_id,
        "runner": config.runner,
        "trials_run": runner.trials_run,
        "metrics": {"trials_run": float(runner.trials_run)},
    }


class ParentWatch:
    """Whether a trial task's hyperopt task has ended or is being cancelled.

    Reads its record at most every ``PARENT_CHECK_S``; once gone, it stays gone.
    """

    def __init__(self, link: PlatformLink, parent_task_id: str) -> None:
        self.link = link
        self.parent_task_id = parent_task_id
        self._gone = False
        self._checked = -PARENT_CHECK_S

    def gone(self) -> bool:
        """True once the hyperopt task is cancelling, cancelled, failed or completed."""
        now = time.monotonic()
        if self._gone or now - self._checked < PARENT_CHECK_S:
            return self._gone
        self._checked = now
        state = self.link.record(self.parent_task_id).state
        if state in PARENT_GONE:
            log.info("hyperopt_task_gone", parent=self.parent_task_id, state=state.value)
            self._gone = True
        return self._gone


@contextlib.contextmanager
def outages_retried() -> Iterator[None]:
    """Turn a Redis or RabbitMQ failure into ``RetryableTaskError``: the task is retried.

    The study is in Redis, so the next attempt goes on where this one stopped (a trial left
    RUNNING is recovered).
    """
    try:
        yield
    except (redis.RedisError, StoreError, BrokerError) as e:
        raise RetryableTaskError(f"{type(e).__name__}: {e}") from e
