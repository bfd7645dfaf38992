"""One hyperopt study shared by several processes: Optuna's journal storage in Redis.

Every runner of a study (the ``hyperopt`` task and its ``hyperopt_trial`` tasks, on any worker)
opens the same study and runs :class:`TrialRunner`, which claims trials until the study has
``n_trials`` of them. Rules that make the count exact and lose no trial:

- **Counting.** A trial counts once it is running, complete, pruned, or failed by its own error
  (the objective raised: a diverged training, a config the target refuses). A trial *lost* with
  its runner (marked ``tp.lost``) does not count: its parameters are enqueued again
  (``study.enqueue_trial``) and the next free runner runs them. Waiting (enqueued) trials do not
  count until a runner takes them.
- **Claiming.** Counting and ``study.ask()`` happen under one Redis lock per study, so two
  runners never both take the last trial. (``optuna.study.MaxTrialsCallback`` counts finished
  trials after each trial ends, so N runners may overshoot by up to N - 1 trials; the claim
  under the lock never does.)
- **Lost trials.** Optuna 5's journal storage has no heartbeat, so a trial whose process died
  stays RUNNING. Each trial records the task, attempt, worker and run (a fresh id per process)
  that runs it. A task never runs twice at once, so when a task starts, its RUNNING trials of an
  earlier run are lost: :meth:`TrialRunner.recover` marks them FAIL (``tp.lost``) and enqueues
  their parameters again (``tp.retry_of``). The hyperopt task does the same for trial tasks that
  have ended (a task retried by the platform's reaper does it itself on its next attempt).
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import optuna
import redis
import structlog
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalRedisBackend
from optuna.trial import FrozenTrial, TrialState
from redis.lock import Lock

from services.gpu_worker.context import RETRYABLE_ERRORS
from shared.hyperopt_config import HyperoptConfig, study_key_prefix
from shared.settings import Settings

log = structlog.get_logger(__name__)

#: Trial user attributes: who ran the trial, and what became of it.
ATTR_TASK = "tp.task_id"
ATTR_ATTEMPT = "tp.attempt"
ATTR_WORKER = "tp.worker"
ATTR_RUNNER = "tp.runner"
ATTR_RUN = "tp.run"
ATTR_RETRY_OF = "tp.retry_of"
ATTR_LOST = "tp.lost"
ATTR_ERROR = "tp.error"
ATTR_METRICS = "tp.metrics"

#: The claim lock expires on its own this long after its holder died holding it (s); claiming
#: (a count and an ``ask``) takes milliseconds.
LOCK_EXPIRY_S = 30.0
#: How long a runner waits for the claim lock before it gives up with a retryable error (s).
LOCK_WAIT_S = 120.0
#: Median pruner: trials finished before pruning starts, and epochs each trial runs unpruned.
MEDIAN_STARTUP_TRIALS = 5
MEDIAN_WARMUP_STEPS = 1
#: Spreads the sampler seeds of a study's runners (and of a runner's attempts) apart.
SEED_STRIDE = 7919
#: Characters of an objective's error kept in the trial (``tp.error``).
ERROR_CHARS = 500

COUNTED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
#: Errors in a trial that fail its task (retried by the platform), not the trial: the study or
#: a service is unreachable. The next attempt recovers the trial left RUNNING.
PASS_THROUGH: tuple[type[BaseException], ...] = (*RETRYABLE_ERRORS, redis.RedisError)


class StopRequested(Exception):  # noqa: N818 - a request, not an error
    """Raised inside a trial when its task was asked to stop: the trial is lost, not failed."""


#: A trial's evaluation: ``(value of the study's metric, every metric of the target)``.
Objective = Callable[[optuna.Trial], tuple[float, dict[str, float]]]


@dataclass(frozen=True)
class RunnerIdentity:
    """Who runs trials: recorded in each trial it takes (the trials table's who-ran-it).

    Attributes:
        task_id: the hyperopt or hyperopt_trial task.
        attempt: that task's attempt.
        worker: the worker running it.
        runner: 0 for the hyperopt task, 1+ for its trial tasks.
        run: unique to this process (an attempt number repeats after a drain's hand-back).
    """

    task_id: str
    attempt: int
    worker: str
    runner: int
    run: str

    @classmethod
    def new(cls, task_id: str, attempt: int, worker: str, runner: int) -> RunnerIdentity:
        """This process's identity, with a fresh ``run`` id."""
        return cls(task_id, attempt, worker, runner, uuid.uuid4().hex)

    def attrs(self) -> dict[str, Any]:
        """The user attributes that mark a trial as this runner's."""
        return {
            ATTR_TASK: self.task_id,
            ATTR_ATTEMPT: self.attempt,
            ATTR_WORKER: self.worker,
            ATTR_RUNNER: self.runner,
            ATTR_RUN: self.run,
        }


class RedisJournal(JournalRedisBackend):
    """Optuna's Redis journal backend on a client built from the platform's settings.

    Optuna builds its client from the URL alone; this one adds the socket timeouts (no call
    hangs on a dead socket) and the TLS files of ``TP_REDIS_CA_FILE`` and friends.
    """

    def __init__(self, settings: Settings, prefix: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            super().__init__(settings.redis_url, prefix=prefix)
        kwargs: dict[str, Any] = {
            "socket_timeout": settings.socket_timeout_s,
            "socket_connect_timeout": settings.socket_timeout_s,
        }
        kwargs.update(settings.redis_tls_kwargs())
        self.client: redis.Redis = redis.Redis.from_url(settings.redis_url, **kwargs)
        self._redis = self.client  # the attribute Optuna's backend reads and writes through


@dataclass
class StudyHandle:
    """An open study with what its runners share: the storage and the claim lock."""

    study: optuna.Study
    storage: JournalStorage
    journal: RedisJournal
    prefix: str

    def lock(self) -> Lock:
        """The study's claim lock (see the module docstring)."""
        return Lock(
            self.journal.client,
            f"{self.prefix}:lock",
            timeout=LOCK_EXPIRY_S,
            blocking_timeout=LOCK_WAIT_S,
        )

    def trials(self, states: Sequence[TrialState] | None = None) -> list[FrozenTrial]:
        """The study's trials now (read from Redis), in trial-number order."""
        return self.study.get_trials(deepcopy=False, states=states)

    def close(self) -> None:
        """Close the Redis connections."""
        self.journal.client.close()


def open_study(
    settings: Settings, parent_task_id: str, config: HyperoptConfig, *, seed: int | None
) -> StudyHandle:
    """Create the hyperopt task's study in Redis, or load it when it exists.

    Args:
        settings: Redis URL, TLS files and namespace.
        parent_task_id: the hyperopt task: the study's name and key prefix
            (``<ns>:hyperopt:<id>``, see ``study_key_prefix``).
        config: direction, pruner and parallelism.
        seed: this runner's sampler seed (see :func:`runner_seed`).
    """
    prefix = study_key_prefix(settings.namespace, parent_task_id)
    journal = RedisJournal(settings, prefix)
    storage = JournalStorage(journal)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # The constant liar keeps concurrent runners from sampling next to each other's
        # running trials (Optuna's advice for distributed TPE).
        sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=config.runners > 1)
        study = optuna.create_study(
            storage=storage,
            study_name=parent_task_id,
            direction=config.direction,
            sampler=sampler,
            pruner=_pruner(config),
            load_if_exists=True,
        )
    return StudyHandle(study, storage, journal, prefix)


def _pruner(config: HyperoptConfig) -> optuna.pruners.BasePruner:
    if config.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=MEDIAN_STARTUP_TRIALS, n_warmup_steps=MEDIAN_WARMUP_STEPS
        )
    return optuna.pruners.NopPruner()


def runner_seed(config: HyperoptConfig, runner: int, attempt: int) -> int | None:
    """Sampler seed of one runner's attempt: None without a study seed.

    Runners and attempts get different seeds, so two runners never draw the same random
    start-up trials; with ``parallel: 1`` and no lost run a study is reproducible from its seed.
    """
    if config.seed is None:
        return None
    return (config.seed + SEED_STRIDE * runner + (attempt - 1)) % 2**32


def is_lost(trial: FrozenTrial) -> bool:
    """A trial failed because its runner was lost (not by its own error): it is run again."""
    return trial.state is TrialState.FAIL and ATTR_LOST in trial.user_attrs


def counted(trials: Sequence[FrozenTrial]) -> int:
    """Trials that count toward ``n_trials`` (see the module docstring)."""
    return sum(
        1
        for t in trials
        if t.state in COUNTED_STATES or (t.state is TrialState.FAIL and not is_lost(t))
    )


def finished(trials: Sequence[FrozenTrial]) -> int:
    """Counted trials that have ended (complete, pruned or failed by their own error)."""
    return sum(1 for t in trials if t.state.is_finished() and not is_lost(t))


class TrialRunner:
    """Claims and runs trials of one study until it has ``n_trials`` (module docstring).

    Args:
        handle: the open study.
        config: ``n_trials``.
        who: this runner, recorded in every trial it takes.
        objective: evaluates one trial; raises ``optuna.TrialPruned`` to prune it and
            :class:`StopRequested` when the task must stop.
        should_stop: checked before each claim.
        on_trial_end: called after each trial this runner ran, with the study's trials.
    """

    def __init__(
        self,
        handle: StudyHandle,
        config: HyperoptConfig,
        who: RunnerIdentity,
        objective: Objective,
        *,
        should_stop: Callable[[], bool] = lambda: False,
        on_trial_end: Callable[[list[FrozenTrial]], None] | None = None,
    ) -> None:
        self.handle = handle
        self.config = config
        self.who = who
        self.objective = objective
        self.should_stop = should_stop
        self.on_trial_end = on_trial_end
        #: Trials this runner ran (whatever their end).
        self.trials_run = 0

    def run(self) -> int:
        """Run trials until the study has enough or a stop is asked; returns how many it ran.

        Raises:
            StopRequested: a trial was interrupted by a stop (lost and enqueued again).
            RetryableTaskError, ConnectionError, TimeoutError, redis.RedisError: the study
                could not be reached; a trial left RUNNING is recovered on the next attempt.
        """
        ran = 0
        while not self.should_stop():
            trial = self._claim()
            if trial is None:
                break
            self._evaluate(trial)
            ran += 1
            self.trials_run += 1
            if self.on_trial_end is not None:
                self.on_trial_end(self.handle.trials())
        return ran

    def _claim(self) -> optuna.Trial | None:
        """The next trial (an enqueued one first), or None when the study has enough."""
        with self._locked():
            if counted(self.handle.trials()) >= self.config.n_trials:
                return None
            trial = self.handle.study.ask()
        for key, value in self.who.attrs().items():
            trial.set_user_attr(key, value)
        return trial

    def _evaluate(self, trial: optuna.Trial) -> None:
        study = self.handle.study
        try:
            value, metrics = self.objective(trial)
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
        except StopRequested:
            with self._locked():  # so no claim slips in between the loss and its re-enqueue
                self._lose(trial.number, "stopped: its task was asked to stop")
            raise
        except PASS_THROUGH:
            raise  # the task is retried; its next attempt recovers this trial
        except Exception as e:  # the trial's own failure: recorded, counted, not retried
            log.warning("trial_failed", trial=trial.number, error=f"{type(e).__name__}: {e}")
            trial.set_user_attr(ATTR_ERROR, f"{type(e).__name__}: {e}"[:ERROR_CHARS])
            study.tell(trial, state=TrialState.FAIL)
        else:
            trial.set_user_attr(ATTR_METRICS, metrics)
            study.tell(trial, value)

    def recover(self, is_stale: Callable[[FrozenTrial], bool], reason: str) -> list[int]:
        """Mark the RUNNING trials ``is_stale`` picks as lost and enqueue their parameters again.

        Returns:
            The numbers of the trials recovered.
        """
        recovered = []
        with self._locked():
            for trial in self.handle.trials(states=(TrialState.RUNNING,)):
                if is_stale(trial):
                    self._lose(trial.number, reason)
                    recovered.append(trial.number)
        if recovered:
            log.info("trials_recovered", trials=recovered, reason=reason)
        return recovered

    def recover_own(self) -> list[int]:
        """Recover this task's trials left RUNNING by an earlier run of it (it died)."""

        def stale(trial: FrozenTrial) -> bool:
            attrs = trial.user_attrs
            return attrs.get(ATTR_TASK) == self.who.task_id and attrs.get(ATTR_RUN) != self.who.run

        reason = f"lost: an earlier run of task {self.who.task_id} ended while running it"
        return self.recover(stale, reason)

    def _lose(self, number: int, reason: str) -> None:
        """Mark trial ``number`` FAIL as lost and enqueue its parameters for a retry.

        Call holding the claim lock: a claim between the two steps would count the study full
        while the retry still waits.
        """
        storage, study = self.handle.storage, self.handle.study
        trial_id = storage.get_trial_id_from_study_id_trial_number(
            storage.get_study_id_from_name(study.study_name), number
        )
        frozen = storage.get_trial(trial_id)
        if frozen.state.is_finished():
            return
        storage.set_trial_user_attr(trial_id, ATTR_LOST, reason)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
        study.enqueue_trial(dict(frozen.params), user_attrs={ATTR_RETRY_OF: number})

    @contextmanager
    def _locked(self) -> Iterator[None]:
        lock = self.handle.lock()
        if not lock.acquire():
            raise TimeoutError(f"study lock {lock.name!r} not acquired in {LOCK_WAIT_S:g} s")
        try:
            yield
        finally:
            try:
                lock.release()
            except redis.exceptions.LockError:
                log.warning("study_lock_expired", lock=str(lock.name))
