"""Task dependencies and start times through real scheduler and worker processes.

A child waits ``submitted`` until its parents completed, takes values from their results, and
fails naming the parent when one fails or is cancelled; ``--at`` holds a task until its time.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from shared.client import DistributedClient
from shared.errors import DependencyError, IdempotencyConflictError, ScheduleError, TaskConfigError
from shared.messages import ConfigRef, TaskState
from shared.references import resolve_config, validate_with_refs
from shared.schedules import parse_start_time
from shared.settings import Settings
from shared.store import TaskRecord
from tests.conftest import Platform, service_env, tradectl
from tests.test_pipeline import wait_state

WAIT_S = 30
#: Probe-only workers start in about a second (no torch import) and keep their code when others
#: commit to this checkout; held tasks are looked at every 0.2 s, waiting children every 1 s.
FAST = {
    "TP_WORKER_PRELOAD": '["services.gpu_worker.tasks.probe"]',
    "TP_WORKER_CODE_UPDATE": "ignore",
    "TP_SCHEDULE_POLL_S": "0.2",
    "TP_REAPER_INTERVAL_S": "1",
}


@pytest.fixture
async def unpinned(settings: Settings) -> AsyncIterator[DistributedClient]:
    """A client that pins no commit: a commit made by someone else mid-test changes nothing."""
    c = DistributedClient(settings.model_copy(update={"commit_check": "off"}), name="deps-test")
    await c.connect()
    yield c
    await c.close()


def cli_env(settings: Settings) -> dict[str, str]:
    return service_env(settings, TP_COMMIT_CHECK="off")


async def wait_all(client: DistributedClient, *task_ids: str) -> list[TaskRecord]:
    return [await client.wait(t, timeout_s=WAIT_S) for t in task_ids]


@pytest.mark.slow
async def test_child_waits_for_parents_then_runs_with_a_parent_result(
    platform: Platform, unpinned: DistributedClient
):
    await platform.start_all(**FAST)
    quick = await unpinned.submit("probe", {"sleep_s": 0.1})  # one slot: runs first
    slow = await unpinned.submit("probe", {"sleep_s": 1.5, "steps": 3})
    child = await unpinned.submit(
        "probe",
        {"sleep_s": 0.1},
        depends_on=[quick.task_id],
        config_refs=[
            ConfigRef(target="steps", task_id=slow.task_id, source="result.metrics.steps")
        ],
    )
    assert child.depends_on == [quick.task_id, slow.task_id]  # a referenced task is a parent
    await wait_state(unpinned, quick.task_id, TaskState.COMPLETED)
    held = await unpinned.status(child.task_id)
    assert held.state is TaskState.SUBMITTED and slow.task_id in held.waiting

    done, slow_done, quick_done = await wait_all(
        unpinned, child.task_id, slow.task_id, quick.task_id
    )
    assert done.state is TaskState.COMPLETED, done.error
    assert done.queued_at >= max(slow_done.completed_at, quick_done.completed_at)
    assert done.config["steps"] == 3 and done.result["metrics"]["steps"] == 3
    assert done.config_template == {"sleep_s": 0.1}
    history = await unpinned.history(child.task_id)
    assert [h["to"] for h in history] == ["submitted", "queued", "running", "completed"]
    assert history[1]["by"] == "scheduler" and history[1]["reason"] == "parents completed"


@pytest.mark.slow
async def test_failed_parent_fails_children_and_grandchildren_naming_it(
    platform: Platform, unpinned: DistributedClient
):
    await platform.start_all(**FAST)
    parent = await unpinned.submit("probe", {"sleep_s": 0.5, "fail_with": "boom"})
    ok = await unpinned.submit("probe", {})
    child = await unpinned.submit("probe", {}, depends_on=[ok.task_id, parent.task_id])
    grandchild = await unpinned.submit("probe", {}, depends_on=[child.task_id])
    # Resolving a parent's result that lacks the key, or that does not validate, fails the
    # child naming the field.
    missing = await unpinned.submit(
        "probe",
        {},
        config_refs=[ConfigRef(target="steps", task_id=ok.task_id, source="result.metrics.nope")],
    )
    invalid = await unpinned.submit(
        "probe",
        {},
        config_refs=[ConfigRef(target="steps", task_id=ok.task_id, source="result.metrics")],
    )

    p, c, g, m, i = await wait_all(
        unpinned,
        parent.task_id,
        child.task_id,
        grandchild.task_id,
        missing.task_id,
        invalid.task_id,
    )
    assert p.state is TaskState.FAILED
    assert p.error == "RuntimeError: boom"
    assert c.state is TaskState.FAILED and c.error == f"parent {p.task_id} failed: {p.error}"
    assert g.state is TaskState.FAILED
    assert g.error == f"parent {c.task_id} failed: parent {p.task_id} failed: {p.error}"
    for never_ran in (c, g, m, i):
        assert never_ran.attempts == 0 and never_ran.running_at is None
    assert m.state is TaskState.FAILED and m.error.startswith("config.steps: cannot resolve")
    assert "result.metrics.nope" in m.error
    assert i.state is TaskState.FAILED and i.error.startswith("invalid probe config: steps:")


@pytest.mark.slow
async def test_cancelled_parent_fails_its_children(platform: Platform, unpinned: DistributedClient):
    await platform.start_all(**FAST)
    parent = await unpinned.submit("probe", {"sleep_s": 30, "steps": 60})
    child = await unpinned.submit("probe", {}, depends_on=[parent.task_id])
    other = await unpinned.submit("probe", {}, depends_on=[parent.task_id])
    await wait_state(unpinned, parent.task_id, TaskState.RUNNING)
    # A held child cancelled itself never runs and is not failed afterwards.
    assert (await unpinned.cancel(other.task_id)).outcome == "cancelled"
    assert (await unpinned.cancel(parent.task_id, wait_s=WAIT_S)).outcome == "cancelled"

    c, o = await wait_all(unpinned, child.task_id, other.task_id)
    assert c.state is TaskState.FAILED and c.error == f"parent {parent.task_id} was cancelled"
    assert o.state is TaskState.CANCELLED and o.error is None


@pytest.mark.slow
async def test_parent_ending_while_children_are_submitted_strands_none(
    platform: Platform, unpinned: DistributedClient
):
    await platform.start_all(**FAST)
    parent = await unpinned.submit("probe", {"sleep_s": 0.4})
    children = []
    for _ in range(30):  # spans the parent's end
        record = await unpinned.submit("probe", {}, depends_on=[parent.task_id])
        children.append(record.task_id)
        await asyncio.sleep(0.03)
    records = await wait_all(unpinned, *children)
    assert [r.state for r in records] == [TaskState.COMPLETED] * 30
    parent_done = await unpinned.status(parent.task_id)
    assert all(r.queued_at >= parent_done.completed_at for r in records)


@pytest.mark.slow
async def test_parent_ending_while_the_scheduler_is_down_releases_its_child_on_start(
    platform: Platform, unpinned: DistributedClient
):
    await platform.start_all(**FAST)
    parent = await unpinned.submit("probe", {"sleep_s": 1.5, "steps": 3})
    child = await unpinned.submit("probe", {}, depends_on=[parent.task_id])
    await wait_state(unpinned, parent.task_id, TaskState.RUNNING)
    platform.procs["scheduler"].stop()
    await wait_state(unpinned, parent.task_id, TaskState.COMPLETED)  # nobody heard the news
    assert (await unpinned.status(child.task_id)).state is TaskState.SUBMITTED
    platform.start("scheduler", **FAST)
    done = await unpinned.wait(child.task_id, timeout_s=WAIT_S)
    assert done.state is TaskState.COMPLETED


@pytest.mark.slow
async def test_at_holds_a_task_until_its_time(platform: Platform, unpinned: DistributedClient):
    await platform.start_all(**FAST)
    cli = tradectl(
        "task", "submit", "probe", "--at", "+3s", "--json", env=cli_env(platform.settings)
    )
    assert cli.returncode == 0, cli.stderr
    submitted = json.loads(cli.stdout)
    task_id, not_before = submitted["task_id"], submitted["not_before"]
    assert abs(not_before - (submitted["submitted_at"] + 3)) < 1.0
    iso = datetime.fromtimestamp(time.time() + 2, UTC).isoformat()
    at_iso = await unpinned.submit(
        "probe", {}, not_before=parse_start_time(iso, await unpinned.store.now())
    )

    await asyncio.sleep(1.0)
    held = await unpinned.status(task_id)
    assert held.state is TaskState.SUBMITTED and "start time" in held.waiting
    status = tradectl("task", "status", task_id, env=cli_env(platform.settings))
    assert "waiting for its start time" in status.stdout
    done, iso_done = await wait_all(unpinned, task_id, at_iso.task_id)
    assert done.state is TaskState.COMPLETED and iso_done.state is TaskState.COMPLETED
    assert not_before <= done.queued_at < not_before + 1.0  # released on time
    assert iso_done.not_before <= iso_done.queued_at < iso_done.not_before + 1.0
    assert done.running_at > not_before


async def test_bad_dependencies_and_times_are_refused_naming_the_field(
    settings: Settings, unpinned: DistributedClient
):
    env = cli_env(settings)
    unknown = tradectl("task", "submit", "probe", "--depends-on", "no-such-task", env=env)
    assert unknown.returncode == 2 and "depends_on" in unknown.stderr, unknown.stderr
    bad_at = tradectl("task", "submit", "probe", "--at", "tomorrowish", env=env)
    assert bad_at.returncode == 2 and "at: 'tomorrowish'" in bad_at.stderr, bad_at.stderr
    # Beyond what a date can show (it once ended the scheduler's planner) or before year 1.
    for when in ("+999999999999d", "9999-12-31T23:59:59-12:00", "0001-01-01T00:00", ""):
        refused = tradectl("task", "submit", "probe", "--at", when, env=env)
        assert refused.returncode == 2 and "at: " in refused.stderr, (when, refused.stderr)

    with pytest.raises(DependencyError, match="depends_on: unknown task 'nope'"):
        await unpinned.submit("probe", {}, depends_on=["nope"])
    with pytest.raises(DependencyError, match="itself"):
        await unpinned.submit("probe", {}, task_id="self-1", depends_on=["self-1"])
    parent = await unpinned.submit("probe", {})  # no scheduler: it just stays submitted
    with pytest.raises(TaskConfigError, match="epochz"):
        await unpinned.submit(
            "train_model",
            {},
            config_refs=[ConfigRef(target="epochz", task_id=parent.task_id, source="task_id")],
        )
    with pytest.raises(TaskConfigError, match="sleep_s"):
        await unpinned.submit(
            "probe",
            {"sleep_s": -1},
            config_refs=[ConfigRef(target="steps", task_id=parent.task_id, source="result")],
        )
    assert await unpinned.list_tasks() == [await unpinned.status(parent.task_id)]


def test_start_times_parse_iso_and_relative():
    now = 1_700_000_000.0
    assert parse_start_time("+30s", now) == now + 30
    assert parse_start_time("+1h30m", now) == now + 5400
    assert parse_start_time("+2d", now) == now + 2 * 86400
    assert parse_start_time("+90", now) == now + 90
    assert parse_start_time("2025-01-31T02:00:00Z", now) == 1738288800.0
    assert parse_start_time("2025-01-31T03:00:00+01:00", now) == 1738288800.0
    local = datetime(2025, 1, 31, 2, 0).astimezone().timestamp()
    assert parse_start_time("2025-01-31T02:00", now) == local
    for bad in ("soon", "+", "+5x", "31/01/2025"):
        with pytest.raises(ScheduleError, match="at: "):
            parse_start_time(bad, now)


def test_references_resolve_merge_then_set_and_name_the_field():
    refs = [
        ConfigRef(target="", task_id="hp", source="result.best_params", merge=True),
        ConfigRef(target="model_task", task_id="train", source="task_id"),
        ConfigRef(target="risk.stop", task_id="hp", source="result.trials.1.value"),
    ]
    results = {
        "hp": {"best_params": {"lr": 0.01, "seed": 7}, "trials": [{"value": 1}, {"value": 2}]},
        "train": {"metrics": {}},
    }
    config = {"seed": 1, "model_task": "${steps.train.task_id}", "dataset": "GOOG"}
    assert resolve_config(config, refs, results) == {
        "seed": 7,
        "lr": 0.01,
        "dataset": "GOOG",
        "model_task": "train",
        "risk": {"stop": 2},
    }
    with pytest.raises(DependencyError, match=r"config\.risk\.stop: cannot resolve"):
        resolve_config(config, refs, {**results, "hp": {"best_params": {}}})
    with pytest.raises(DependencyError, match="not a mapping to merge"):
        resolve_config(config, refs, {**results, "hp": {**results["hp"], "best_params": 3}})
    # At submit the referenced fields stay open; the rest is checked.
    steps_ref = [ConfigRef(target="steps", task_id="p", source="result.n")]
    validate_with_refs("probe", {"steps": "${steps.p.result.n}"}, steps_ref)
    with pytest.raises(TaskConfigError, match="sleep_s"):
        validate_with_refs("probe", {"steps": "x", "sleep_s": "x"}, steps_ref)


async def test_a_resubmit_without_its_start_time_does_not_release_a_held_task(
    platform: Platform, unpinned: DistributedClient
):
    """Found by a breaker: the same id, type and config without ``not_before`` went to the
    intake, which queued it ~60 s early. The start time is part of the task's identity."""
    await platform.start_all(**FAST)
    task_id = "held-start-time"
    at = await unpinned.store.now() + 60
    await unpinned.submit("probe", {"sleep_s": 0.1}, task_id=task_id, not_before=at)
    with pytest.raises(IdempotencyConflictError, match="already exists"):
        await unpinned.submit("probe", {"sleep_s": 0.1}, task_id=task_id)
    again = await unpinned.submit("probe", {"sleep_s": 0.1}, task_id=task_id, not_before=at)
    assert again.state is TaskState.SUBMITTED  # the same submit again is fine
    await asyncio.sleep(1.5)  # several planner passes
    record = await unpinned.status(task_id)
    assert record.state is TaskState.SUBMITTED, await unpinned.history(task_id)
