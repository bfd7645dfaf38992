"""``hyperopt``: refused configs, the shared study's claims and recovery, and whole studies run
by real workers (one worker, two workers, a worker SIGKILLed mid-study)."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.storages import JournalStorage
from optuna.trial import FrozenTrial, TrialState

from services.gpu_worker.tasks.hyperopt_study import (
    ATTR_ATTEMPT,
    ATTR_LOST,
    ATTR_RETRY_OF,
    ATTR_TASK,
    ATTR_WORKER,
    RedisJournal,
    RunnerIdentity,
    TrialRunner,
    counted,
    finished,
    open_study,
)
from shared.admin import delete_namespace
from shared.client import DistributedClient
from shared.errors import TaskConfigError
from shared.hyperopt_config import TARGET_METRICS, HyperoptConfig, study_key_prefix
from shared.messages import TaskState
from shared.settings import Settings
from shared.store import TaskRecord
from shared.task_types import route_of, validate_config
from shared.topology import Topology
from tests.conftest import Platform, ServiceProcess, service_env, tradectl, wait_for_consumers
from tests.test_pipeline import wait_state

#: Search space of the studies below: a float on a log scale, ints, a categorical.
SPACE = {
    "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
    "hidden_size": {"type": "int", "low": 4, "high": 16},
}
#: A tiny train_model on GOOG daily: a trial takes tens of milliseconds on one core.
TINY = {"dataset": "GOOG", "feature_window": 8, "hidden_size": 8, "epochs": 1, "device": "cpu"}
#: Slower trials (an LSTM over 3 epochs in batches of 16, ~0.4 s here), so two runners overlap.
SLOWER = {**TINY, "model": "lstm", "epochs": 3, "batch_size": 16}
#: Workers with one gpu slot (where train_model studies run) that keep their code when the
#: checkout moves under them (others commit while the tests run). One torch thread each: two
#: CPU-bound trials with a thread per core each on 2 shared cores ran 5-30x slower here.
WORKER = {
    "TP_WORKER_GPU_SLOTS": "1",
    "TP_WORKER_CPU_SLOTS": "0",
    "TP_WORKER_CODE_UPDATE": "ignore",
    "OMP_NUM_THREADS": "1",
}
FAST_LEASES = {"TP_LEASE_S": "2", "TP_REAPER_INTERVAL_S": "0.3"}
STUDY_TIMEOUT_S = 150


def study_config(**overrides: Any) -> dict[str, Any]:
    config = {
        "target": "train_model",
        "base_config": TINY,
        "search_space": SPACE,
        "metric": "val_loss",
        "direction": "minimize",
        "n_trials": 4,
        "seed": 7,
    }
    return {**config, **overrides}


# --- configs refused at submit ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"search_space": {}}, "search_space: Dictionary should have at least 1 item"),
        ({"target": "probe"}, "target: unknown target task type 'probe'"),
        (
            {"search_space": {"hidden_sise": {"type": "int", "low": 4, "high": 8}}},
            "search_space: hidden_sise: unknown parameter of train_model",
        ),
        (
            {"search_space": {"hidden_size": {"type": "int", "low": 16, "high": 4}}},
            "search_space.hidden_size: low (16) must be below high (4)",
        ),
        (
            {"search_space": {"learning_rate": {"type": "float", "low": 0.1, "high": 0.1}}},
            "search_space.learning_rate: low (0.1) must be below high (0.1)",
        ),
        (
            {"search_space": {"hidden_size": {"type": "int", "low": 1, "high": 8}}},
            "search_space: hidden_size = 1: Input should be greater than or equal to 4",
        ),
        (
            {"search_space": {"model": {"type": "categorical", "choices": []}}},
            "search_space.model.choices: List should have at least 1 item",
        ),
        (
            {
                "search_space": {
                    "learning_rate": {"type": "float", "low": 0.0, "high": 1.0, "log": True}
                }
            },
            "search_space.learning_rate: log scale needs low > 0",
        ),
        ({"n_trials": 0}, "n_trials: Input should be greater than or equal to 1"),
        ({"parallel": 0}, "parallel: Input should be greater than or equal to 1"),
        ({"metric": "sharpe_ratio"}, "metric: unknown metric 'sharpe_ratio' of train_model"),
        ({"base_config": {"epochs": 0}}, "base_config: invalid train_model config: epochs:"),
        ({"direction": "up"}, "direction: Input should be 'minimize' or 'maximize'"),
    ],
)
def test_bad_config_is_refused_naming_the_field(overrides: dict[str, Any], expected: str) -> None:
    with pytest.raises(TaskConfigError) as refused:
        validate_config("hyperopt", study_config(**overrides))
    assert expected in str(refused.value)
    assert str(refused.value).startswith("invalid hyperopt config: ")


def test_the_example_configs_are_valid() -> None:
    import yaml

    root = Path(__file__).resolve().parent.parent
    config = yaml.safe_load((root / "configs" / "hyperopt_goog.yaml").read_text())
    parsed = validate_config("hyperopt", config)
    assert isinstance(parsed, HyperoptConfig) and parsed.runners == 2


def test_backtest_targets_are_checked_against_the_backtest_config() -> None:
    base = {"dataset": "GOOG", "strategy": "sma_crossover"}
    space = {"fast_window": {"type": "int", "low": 5, "high": 30}}
    ok = validate_config(
        "hyperopt",
        study_config(
            target="backtest",
            base_config={**base, "slow_window": 40},
            search_space={**space, "slow_window": {"type": "int", "low": 20, "high": 80}},
            metric="sharpe_ratio",
            direction="maximize",
        ),
    )
    assert isinstance(ok, HyperoptConfig)
    # A bound may clash with another field of the base (fast 30 >= slow 20): that is a failed
    # trial, not a refusal; a bound the field itself refuses is.
    validate_config(
        "hyperopt",
        study_config(
            target="backtest", base_config=base, search_space=space, metric="sharpe_ratio"
        ),
    )
    with pytest.raises(TaskConfigError, match="search_space: fast_window = 0: Input should be"):
        validate_config(
            "hyperopt",
            study_config(
                target="backtest",
                base_config=base,
                search_space={"fast_window": {"type": "int", "low": 0, "high": 5}},
                metric="sharpe_ratio",
            ),
        )
    with pytest.raises(TaskConfigError, match="pruner: backtest reports no per-epoch metric"):
        validate_config(
            "hyperopt",
            study_config(
                target="backtest",
                base_config=base,
                search_space=space,
                metric="sharpe_ratio",
                pruner="median",
            ),
        )


def test_backtest_metric_names_are_the_backtest_results() -> None:
    from services.gpu_worker.tasks.backtest_report import METRICS

    assert set(TARGET_METRICS["backtest"]) <= {name for name, _, _ in METRICS}


def test_a_study_runs_where_its_target_would() -> None:
    train = study_config()
    backtest = study_config(
        target="backtest",
        base_config={"strategy": "sma_crossover"},
        search_space={"fast_window": {"type": "int", "low": 2, "high": 9}},
        metric="sharpe_ratio",
    )
    on_gpu = {**backtest, "base_config": {"strategy": "sma_crossover", "needs_gpu": True}}
    assert route_of("hyperopt", train) == "gpu"
    assert route_of("hyperopt", backtest) == "cpu"
    assert route_of("hyperopt", on_gpu) == "gpu"
    trial_task = {"parent_task_id": "abc", "runner": 1, "study": backtest}
    assert route_of("hyperopt_trial", trial_task) == "cpu"


async def test_submit_refuses_before_queueing(settings: Settings, client: DistributedClient):
    with pytest.raises(TaskConfigError, match="search_space"):
        await client.submit("hyperopt", study_config(search_space={}), task_id="refused-1")
    assert await client.list_tasks() == []
    path = settings.data_dir.parent / "bad.json"
    path.write_text(json.dumps(study_config(n_trials=0)))
    proc = await asyncio.to_thread(
        tradectl, "task", "submit", "hyperopt", "--config", str(path), env=service_env(settings)
    )
    assert proc.returncode == 2, proc.stderr
    assert "invalid hyperopt config: n_trials: Input should be greater than or equal to 1" in (
        proc.stderr
    )


# --- the shared study, in this process (Redis only) ----------------------------------------------


def fake_objective(trial: optuna.Trial, pause_s: float = 0.0) -> tuple[float, dict[str, float]]:
    lr = trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True)
    size = trial.suggest_int("hidden_size", 4, 16)
    time.sleep(pause_s)
    value = (lr - 1e-3) ** 2 + size / 1000
    return value, {"val_loss": value}


def test_claims_under_the_lock_never_overshoot(settings: Settings) -> None:
    config = HyperoptConfig.model_validate(study_config(n_trials=15, parallel=3))
    ran: list[int] = []
    # All three claim from the same moment: a runner still opening the study on a loaded
    # machine must not find the other two done with all 15 trials.
    ready = threading.Barrier(3, timeout=30)

    def runner(n: int) -> None:
        handle = open_study(settings, "study-1", config, seed=n)
        who = RunnerIdentity.new(f"task-{n}", 1, f"w{n}", n)
        # Trials long enough (15 x 0.1 s over 3 runners) that each runner claims one even
        # when a loaded machine starts one of them late.
        objective = lambda trial: fake_objective(trial, pause_s=0.1)  # noqa: E731
        ready.wait()
        ran.append(TrialRunner(handle, config, who, objective).run())
        handle.close()

    threads = [threading.Thread(target=runner, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    trials = open_study(settings, "study-1", config, seed=0).trials()
    assert sum(ran) == 15 and len(trials) == 15
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 15
    assert {t.user_attrs[ATTR_TASK] for t in trials} == {"task-0", "task-1", "task-2"}


def test_a_lost_trial_is_failed_and_run_again_by_the_next_run(settings: Settings) -> None:
    config = HyperoptConfig.model_validate(study_config(n_trials=5))
    first = open_study(settings, "study-2", config, seed=1)
    dead = RunnerIdentity.new("task-x", 1, "w-dead", 0)
    TrialRunner(first, config, dead, fake_objective).run()  # 5 trials, then ...
    first.study.enqueue_trial({"learning_rate": 0.005, "hidden_size": 9})
    # ... two more claimed by a run that dies in them: one RUNNING trial left behind per run.
    config_more = HyperoptConfig.model_validate(study_config(n_trials=6))
    orphan = first.study.ask()
    fake_objective(orphan)
    for key, value in dead.attrs().items():
        orphan.set_user_attr(key, value)
    assert counted(first.trials()) == 6 and finished(first.trials()) == 5

    second = open_study(settings, "study-2", config_more, seed=2)
    again = RunnerIdentity.new("task-x", 2, "w-alive", 0)
    runner = TrialRunner(second, config_more, again, fake_objective)
    assert runner.recover_own() == [orphan.number]
    assert runner.run() == 1
    trials = second.trials()
    lost, retry = trials[orphan.number], trials[-1]
    assert (
        lost.state is TrialState.FAIL and "earlier run of task task-x" in lost.user_attrs[ATTR_LOST]
    )
    assert retry.state is TrialState.COMPLETE and retry.user_attrs[ATTR_RETRY_OF] == orphan.number
    assert retry.params == lost.params == {"learning_rate": 0.005, "hidden_size": 9}
    assert retry.user_attrs[ATTR_ATTEMPT] == 2 and retry.user_attrs[ATTR_WORKER] == "w-alive"
    assert counted(trials) == 6 and [t.state for t in trials].count(TrialState.COMPLETE) == 6
    # A later run of the same task has nothing to recover.
    assert TrialRunner(second, config_more, again, fake_objective).recover_own() == []


async def test_the_study_lives_under_the_namespace(settings: Settings) -> None:
    config = HyperoptConfig.model_validate(study_config(n_trials=2))
    handle = open_study(settings, "study-3", config, seed=1)
    TrialRunner(handle, config, RunnerIdentity.new("t", 1, "w", 0), fake_objective).run()
    client = handle.journal.client
    pattern = f"{settings.namespace}:hyperopt:study-3:*"
    assert len(list(client.scan_iter(match=pattern))) > 10
    # Removed with the rest of the namespace (what the fixtures do after every test).
    await delete_namespace(settings)
    assert list(client.scan_iter(match=pattern)) == []
    handle.close()


# --- whole studies on real workers ---------------------------------------------------------------


def start_worker(platform: Platform, name: str, **env: str) -> ServiceProcess:
    """A worker process named ``name`` (``Platform.procs`` is keyed by module: one key each)."""
    proc = ServiceProcess(
        "gpu_worker",
        service_env(platform.settings, TP_WORKER_NAME=name, **WORKER, **env),
        platform.tmp / f"worker-{name}.log",
    )
    platform.procs[f"gpu_worker:{name}"] = proc
    return proc


async def start_platform(
    platform: Platform, workers: list[str], **env: str
) -> dict[str, ServiceProcess]:
    platform.start("scheduler", **env)
    procs = {name: start_worker(platform, name, **env) for name in workers}
    gpu = Topology(platform.settings.namespace).queue("gpu")
    try:
        await wait_for_consumers(platform.settings, {gpu: len(workers)}, timeout=90)
    except TimeoutError:
        for p in platform.procs.values():
            print(p.module, p.log_text()[-3000:])
        raise
    return procs


class StudyView:
    """The study of a hyperopt task, read from Redis as any process can."""

    def __init__(self, settings: Settings, task_id: str) -> None:
        self.task_id = task_id
        self.journal = RedisJournal(settings, study_key_prefix(settings.namespace, task_id))
        self.storage = JournalStorage(self.journal)  # reads only the logs it has not seen

    def trials(self) -> list[FrozenTrial]:
        """Its trials now; none while the study does not exist yet."""
        try:
            study = optuna.load_study(study_name=self.task_id, storage=self.storage)
        except KeyError:
            return []
        return study.get_trials(deepcopy=False)

    def close(self) -> None:
        self.journal.client.close()


def study_trials(settings: Settings, task_id: str) -> list[FrozenTrial]:
    view = StudyView(settings, task_id)
    try:
        return view.trials()
    finally:
        view.close()


async def wait_done(client: DistributedClient, task_id: str, platform: Platform) -> TaskRecord:
    record = await client.wait(task_id, timeout_s=STUDY_TIMEOUT_S)
    if record.state is not TaskState.COMPLETED:
        for p in platform.procs.values():
            print(p.module, p.log_text()[-4000:])
        print(record.error, record.traceback)
    assert record.state is TaskState.COMPLETED, record.error
    assert record.result is not None
    return record


@pytest.mark.slow
async def test_twenty_trials_on_one_single_slot_worker(
    platform: Platform, client: DistributedClient, settings: Settings
):
    """20 trials, ``parallel: 2`` on a worker with one slot: the hyperopt task runs every trial
    itself (no deadlock on its trial task, which is cancelled unstarted)."""
    await start_platform(platform, ["w-one"])
    space = {
        **SPACE,
        "epochs": {"type": "int", "low": 1, "high": 2},
        "model": {"type": "categorical", "choices": ["mlp", "lstm"]},
    }
    config = study_config(search_space=space, n_trials=20, parallel=2)
    started = time.monotonic()
    task = await client.submit("hyperopt", config)
    record = await wait_done(client, task.task_id, platform)
    print(f"20 trials on one worker: {time.monotonic() - started:.1f} s")
    result = record.result
    assert result is not None

    rows = result["trials"]
    assert [r["number"] for r in rows] == list(range(20))
    assert {r["state"] for r in rows} == {"COMPLETE"} and result["trial_counts"] == {"COMPLETE": 20}
    assert {(r["task_id"], r["worker"]) for r in rows} == {(task.task_id, "w-one")}
    assert set(result["best_params"]) == set(space)
    # The study's keys stay to be inspected, and expire with the task's record.
    prefix = result["study"]["key_prefix"]
    keys = [k async for k in client.store.redis.scan_iter(match=f"{prefix}:*")]
    ttls = [await client.store.redis.ttl(k) for k in keys]
    assert keys and all(0 < ttl <= 30 * 24 * 3600 for ttl in ttls)
    values = [r["value"] for r in rows]
    assert result["best_value"] == min(values) == rows[result["best_trial"]]["value"]
    assert result["best_metrics"]["val_loss"] == result["best_value"]
    helper = f"{task.task_id}.runner-1"
    assert result["runners"][helper] == {"runner": 1, "state": "cancelled", "trials": 0}
    assert (await client.status(helper)).state is TaskState.CANCELLED

    folder = settings.tasks_dir / task.task_id / "artifacts"
    assert set(result["artifacts"]) == {"trials.csv", "optimization_history.png", "study.json"}
    lines = (folder / "trials.csv").read_text().splitlines()
    assert len(lines) == 21 and "param_learning_rate" in lines[0] and ",w-one," in lines[1]
    assert (folder / "optimization_history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((folder / "study.json").read_text())
    assert summary["best_params"] == result["best_params"] and summary["n_trials"] == 20

    mlflow = MlflowClient(settings.tracking_uri)
    parent = mlflow.get_run(result["mlflow_run_id"])
    assert parent.data.params["metric"] == "val_loss" and parent.info.status == "FINISHED"
    assert parent.data.metrics["best_value"] == pytest.approx(result["best_value"])
    children = mlflow.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
        max_results=100,
    )
    assert len(children) == 20
    assert {c.info.run_name for c in children} == {f"trial-{n}" for n in range(20)}
    best = next(c for c in children if c.info.run_name == f"trial-{result['best_trial']}")
    assert best.data.metrics["val_loss"] == pytest.approx(result["best_value"])
    assert best.data.params["hidden_size"] == str(result["best_params"]["hidden_size"])
    assert {c.info.status for c in children} == {"FINISHED"}


@pytest.mark.slow
async def test_two_workers_run_trials_of_one_study(
    platform: Platform, client: DistributedClient, settings: Settings
):
    await start_platform(platform, ["w-a", "w-b"])
    config = study_config(base_config=SLOWER, n_trials=20, parallel=2, pruner="median")
    started = time.monotonic()
    task = await client.submit("hyperopt", config)
    record = await wait_done(client, task.task_id, platform)
    print(f"20 trials on two workers: {time.monotonic() - started:.1f} s")
    result = record.result
    assert result is not None

    helper = f"{task.task_id}.runner-1"
    rows = result["trials"]
    assert {r["worker"] for r in rows} == {"w-a", "w-b"}
    assert {r["task_id"] for r in rows} == {task.task_id, helper}
    # Exactly n_trials: complete or pruned, none lost, none left waiting or running.
    assert len(rows) == 20
    assert {r["state"] for r in rows} <= {"COMPLETE", "PRUNED"}
    trials = study_trials(settings, task.task_id)
    assert len(trials) == 20 and counted(trials) == finished(trials) == 20
    runners = result["runners"]
    assert runners[helper]["state"] == "completed"
    assert runners[task.task_id]["trials"] + runners[helper]["trials"] == 20
    assert runners[helper]["trials"] > 0 and runners[task.task_id]["trials"] > 0
    helper_record = await client.status(helper)
    assert helper_record.result is not None
    assert helper_record.result["trials_run"] == runners[helper]["trials"]


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["hyperopt", "hyperopt_trial"])
async def test_a_worker_killed_mid_study_loses_no_trial(
    platform: Platform, client: DistributedClient, settings: Settings, victim: str
):
    """SIGKILL the worker of the hyperopt task (it is requeued and its next attempt recovers
    the trial), or of its trial task (the hyperopt task recovers the trial once the trial task
    was requeued, and cancels it): either way the trial is failed as lost and run again."""
    procs = await start_platform(platform, ["w-a", "w-b"], **FAST_LEASES)
    slow = {**SLOWER, "epochs": 10}  # ~1.5 s a trial: the kill lands inside one
    config = study_config(base_config=slow, n_trials=10, parallel=2)
    task = await client.submit("hyperopt", config)
    target_id = task.task_id if victim == "hyperopt" else f"{task.task_id}.runner-1"
    running = await wait_state(client, target_id, TaskState.RUNNING, timeout=60)
    assert running.worker in procs

    # Kill that task's worker while it runs a trial, once the study is under way.
    view = StudyView(settings, task.task_id)
    deadline = time.monotonic() + 90
    while True:
        trials = view.trials()
        # A trial that began just now: the kill lands well inside it even on a loaded machine
        # (one seen running for a while may end before the worker's children are gone).
        fresh = datetime.datetime.now() - datetime.timedelta(seconds=0.4)
        in_flight = [
            t.number
            for t in trials
            if t.state is TrialState.RUNNING
            and t.user_attrs.get(ATTR_TASK) == target_id
            and t.datetime_start is not None
            and t.datetime_start >= fresh
        ]
        if finished(trials) >= 2 and in_flight:
            break
        assert time.monotonic() < deadline, [t.state for t in trials]
        await asyncio.sleep(0.02)
    os.kill(procs[running.worker].proc.pid, signal.SIGKILL)
    view.close()

    record = await wait_done(client, task.task_id, platform)
    reasons = [h.get("reason") or "" for h in await client.history(target_id)]
    assert any("lost" in r for r in reasons), reasons
    result = record.result
    assert result is not None
    trials = study_trials(settings, task.task_id)
    states = [t.state for t in trials]
    assert states.count(TrialState.COMPLETE) == 10 and counted(trials) == 10
    # The trial the dead worker ran is failed as lost, and run again with the same parameters
    # on the other worker.
    lost = [t for t in trials if t.state is TrialState.FAIL]
    assert len(lost) == 1 and lost[0].number >= in_flight[0], (in_flight, lost)
    attrs = lost[0].user_attrs
    assert (attrs[ATTR_TASK], attrs[ATTR_ATTEMPT], attrs[ATTR_WORKER]) == (
        target_id,
        1,
        running.worker,
    )
    assert attrs[ATTR_LOST].startswith("lost: ")
    retry = next(t for t in trials if t.user_attrs.get(ATTR_RETRY_OF) == lost[0].number)
    assert retry.state is TrialState.COMPLETE and retry.params == lost[0].params
    survivor = next(name for name in procs if name != running.worker)
    assert retry.user_attrs[ATTR_WORKER] == survivor
    assert result["trial_counts"] == {"COMPLETE": 10, "LOST": 1}
    table = {r["number"]: r for r in result["trials"]}
    assert table[lost[0].number]["lost"] and table[retry.number]["retry_of"] == lost[0].number
    if victim == "hyperopt":  # requeued by the reaper; its second attempt ran the retry
        assert record.attempts == 2 and retry.user_attrs[ATTR_TASK] == task.task_id
    else:  # requeued, then cancelled by the hyperopt task, which ran the retry itself
        assert (await client.status(target_id)).state is TaskState.CANCELLED
        assert record.attempts == 1 and retry.user_attrs[ATTR_TASK] == task.task_id
