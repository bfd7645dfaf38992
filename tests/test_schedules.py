"""Recurring schedules: firing on time, one catch-up run after downtime, the CLI, refusals."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from services.scheduler.schedules import ScheduleRunner
from shared.client import DistributedClient
from shared.errors import ScheduleError
from shared.messages import TaskState
from shared.schedules import CronClock
from shared.settings import Settings
from shared.store import TaskRecord
from tests.conftest import Platform, tradectl
from tests.test_dependencies import FAST, cli_env

WAIT_S = 30
#: A firing happens within one planner pass (TP_SCHEDULE_POLL_S=0.2) of its occurrence, plus
#: the time to record and publish the task on a busy 2-core machine (measured: under 0.3 s).
ON_TIME_S = 1.5


async def wait_runs(
    client: DistributedClient, name: str, count: int, timeout: float = WAIT_S
) -> list[dict]:
    """The schedule's firings, oldest first, once there are at least ``count``."""
    deadline = time.monotonic() + timeout
    while True:
        runs = await client.schedule_runs(name, limit=100)
        if len(runs) >= count:
            return sorted(runs, key=lambda r: r["occurrence"])
        assert time.monotonic() < deadline, f"{name} fired {len(runs)} times, wanted {count}"
        await asyncio.sleep(0.1)


async def tasks_of(client: DistributedClient, name: str) -> list[TaskRecord]:
    return [r for r in await client.list_tasks(500) if r.submitted_by == f"schedule:{name}"]


@pytest.mark.slow
async def test_a_schedule_fires_on_time_twice_and_a_paused_one_never(
    platform: Platform, client: DistributedClient
):
    await platform.start_all(**FAST)
    await client.add_schedule("every-3s", "* * * * * */3", "probe", {"sleep_s": 0.1})
    await client.add_schedule("held", "* * * * * */3", "probe", {}, paused=True)
    runs = await wait_runs(client, "every-3s", 2)
    first, second = runs[:2]
    assert second["occurrence"] - first["occurrence"] == 3.0
    for run in (first, second):
        assert run["occurrence"] % 3 == 0 and run["missed"] == 0
        assert 0 <= run["fired_at"] - run["occurrence"] < ON_TIME_S, run
        record = await client.wait(run["task_id"], timeout_s=WAIT_S)
        assert record.state is TaskState.COMPLETED
        assert 0 <= record.submitted_at - run["occurrence"] < ON_TIME_S
    assert first["task_id"] != second["task_id"]
    listed = {s.name: s for s in await client.schedules()}
    assert listed["every-3s"].fired >= 2 and listed["every-3s"].last_task_id
    assert listed["held"].paused and listed["held"].fired == 0
    assert await client.schedule_runs("held") == [] and await tasks_of(client, "held") == []


@pytest.mark.slow
async def test_a_restart_fires_missed_runs_once_then_on_schedule(
    platform: Platform, client: DistributedClient
):
    await platform.start_all(**FAST)
    await client.add_schedule("catch-up", "* * * * * */3", "probe", {})
    before = (await wait_runs(client, "catch-up", 1))[0]
    platform.procs["scheduler"].stop()
    stopped_at = await client.store.now()
    await asyncio.sleep(max(0.0, before["occurrence"] + 7.5 - stopped_at))  # 2 occurrences pass
    platform.start("scheduler", **FAST)

    runs = await wait_runs(client, "catch-up", 3)
    first, catch_up, on_time = runs[:3]
    assert first == before
    assert catch_up["occurrence"] - first["occurrence"] >= 6.0  # the latest missed occurrence
    assert catch_up["missed"] == (catch_up["occurrence"] - first["occurrence"]) / 3 - 1 >= 1
    assert catch_up["fired_at"] > stopped_at + 6.0
    assert on_time["occurrence"] == catch_up["occurrence"] + 3.0
    assert 0 <= on_time["fired_at"] - on_time["occurrence"] < ON_TIME_S
    fired = {r["task_id"] for r in runs}
    assert {t.task_id for t in await tasks_of(client, "catch-up")} == fired  # no extra task
    assert len(fired) == len(runs)


async def test_two_schedulers_fire_one_task_per_occurrence(client: DistributedClient):
    await client.add_schedule("twice", "* * * * * *", "probe", {})
    await asyncio.sleep(1.1)  # due
    runners = [ScheduleRunner(client.store, client.broker) for _ in range(2)]
    schedule = await client.schedule("twice")
    now = await client.store.now()
    first, second = await asyncio.gather(*(r.fire(schedule, now) for r in runners))
    assert first == second  # the same occurrence is the same task
    assert len(await client.schedule_runs("twice")) == 1
    assert [t.task_id for t in await tasks_of(client, "twice")] == [first]
    assert (await client.schedule("twice")).next_due_at > now


@pytest.mark.slow
def test_cli_add_list_pause_resume_remove(settings: Settings, tmp_path: Path):
    env = cli_env(settings)
    config = tmp_path / "probe.yaml"
    config.write_text("sleep_s: 0.5\nsteps: 2\n")

    def ctl(*args: str):
        return tradectl("schedule", *args, env=env)

    added = ctl(
        "add", "nightly", "probe", "--cron", "0 2 * * 1-5", "--config", str(config),
        "--tz", "Europe/London", "--priority", "7",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert "schedule nightly added; next due" in added.stdout
    listed = json.loads(ctl("list", "--json").stdout)
    assert [s["name"] for s in listed] == ["nightly"]
    nightly = listed[0]
    assert (nightly["cron"], nightly["timezone"], nightly["priority"]) == (
        "0 2 * * 1-5",
        "Europe/London",
        7,
    )
    assert nightly["config"]["steps"] == 2 and nightly["paused"] is False
    due = datetime.fromtimestamp(nightly["next_due_at"], ZoneInfo("Europe/London"))
    assert (due.hour, due.minute) == (2, 0) and due.weekday() < 5

    paused = ctl("pause", "nightly")
    assert paused.returncode == 0 and "paused" in paused.stdout
    assert json.loads(ctl("list", "--json").stdout)[0]["paused"] is True
    assert "paused" in ctl("list").stdout
    resumed = json.loads(ctl("resume", "nightly", "--json").stdout)
    assert resumed["paused"] is False and resumed["next_due_at"] == nightly["next_due_at"]

    clash = ctl("add", "nightly", "probe", "--cron", "* * * * *")
    assert clash.returncode == 2 and "name: a schedule called 'nightly'" in clash.stderr
    assert ctl("remove", "nightly").returncode == 0
    assert json.loads(ctl("list", "--json").stdout) == []
    for gone in (ctl("remove", "nightly"), ctl("pause", "nightly"), ctl("resume", "nightly")):
        assert gone.returncode == 4 and "no schedule called 'nightly'" in gone.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bad1", "probe", "--cron", "61 * * * *"], "cron: '61 * * * *' is not a valid"),
        (["bad2", "probe", "--cron", "* * *"], "cron: '* * *' has 3 fields"),
        (["bad3", "probe", "--cron", "0 0 30 2 *"], "never fires"),
        (["bad4", "probe", "--cron", "* * * * *", "--tz", "Mars/Olympus"], "timezone: "),
        (["bad5", "probe", "--cron", "* * * * *", "--set", "steps=0"], "steps: Input should"),
        (["bad6", "nosuchtype", "--cron", "* * * * *"], "unknown task type 'nosuchtype'"),
        (["bad name", "probe", "--cron", "* * * * *"], "name: String should match"),
    ],
)
def test_bad_schedules_are_refused_naming_the_field(settings: Settings, args, message):
    refused = tradectl("schedule", "add", *args, env=cli_env(settings))
    assert refused.returncode == 2, refused.stderr
    assert message in refused.stderr


def test_cron_clock_occurrences():
    clock = CronClock("* * * * * */5")
    assert clock.next_after(10.0) == 15.0 and clock.next_after(12.5) == 15.0
    assert clock.latest_at_or_before(15.0) == 15.0 and clock.latest_at_or_before(14.9) == 10.0
    assert clock.between(10.0, 30.0) == 5
    london = CronClock("0 2 * * 1-5", "Europe/London")
    # Friday 2024-03-29 12:00 London -> Monday 02:00, British Summer Time (UTC+1) by then.
    friday = datetime(2024, 3, 29, 12, tzinfo=ZoneInfo("Europe/London")).timestamp()
    monday = datetime(2024, 4, 1, 2, tzinfo=ZoneInfo("Europe/London")).timestamp()
    assert london.next_after(friday) == monday
    with pytest.raises(ScheduleError, match="cron: "):
        CronClock("every day")
