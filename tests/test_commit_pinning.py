"""Commit-pinned execution with real git repositories, services as real processes.

The laptop clone pins each task to its ``HEAD``; the desktop clone is the worker's and git-sync's
checkout (``TP_CODE_DIR``). A task runs only on code containing its commit; the worker restarts on
new code only between tasks.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from shared.client import CHECKOUT_CACHE_S, DistributedClient
from shared.errors import CommitCheckError
from shared.messages import TaskState
from shared.settings import Settings
from tests.conftest import LIGHT_WORKER, Platform, service_env, tradectl
from tests.gitrepos import Repos, git

WAIT_S = 120


pytestmark = pytest.mark.usefixtures("isolated_git")


@pytest.fixture
async def laptop(settings: Settings, repos: Repos) -> DistributedClient:
    """A client pinning tasks to the laptop clone's ``HEAD``."""
    client = DistributedClient(settings.model_copy(update={"code_dir": repos.laptop}))
    await client.connect()
    yield client
    await client.close()


async def start_desktop(platform: Platform, repos: Repos, **env: str) -> None:
    """Scheduler, worker and git-sync on the desktop clone (plain processes)."""
    desktop = {"TP_CODE_DIR": str(repos.desktop), **env}
    platform.start("git_sync", **desktop)
    await platform.start_all(**desktop)


def log_events(platform: Platform, module: str) -> list[dict]:
    """The JSON log lines of a service, in order."""
    lines = []
    for line in platform.procs[module].log_text().splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


async def heartbeat(client: DistributedClient, name: str) -> dict:
    raw = await client.store.redis.get(client.store.keys.worker(name))
    return json.loads(raw) if raw else {}


async def wait_heartbeat(client: DistributedClient, name: str, commit: str) -> dict:
    deadline = time.monotonic() + 60
    while (beat := await heartbeat(client, name)).get("code_commit") != commit:
        assert time.monotonic() < deadline, beat
        await asyncio.sleep(0.2)
    return beat


async def test_task_at_a_commit_the_desktop_lacks_runs_after_the_sync_on_that_commit(
    platform: Platform, repos: Repos, laptop: DistributedClient
) -> None:
    # An hour-long interval: only the worker's own sync request can bring the commit in time.
    await start_desktop(platform, repos, TP_GIT_SYNC_INTERVAL_S="3600")
    old = repos.head(repos.desktop)
    new = repos.commit(repos.laptop, "strategy.py", "FAST = 21\n", push=True)
    config = {"dataset": "GOOG", "epochs": 1, "hidden_size": 8, "feature_window": 8}
    record = await laptop.submit_and_wait("train_model", config, timeout_s=WAIT_S)

    assert record.state is TaskState.COMPLETED, record.error
    assert record.git_commit == new and record.attempts == 1
    assert record.result["git_commit"] == new and record.result["submitted_commit"] == new
    assert repos.head(repos.desktop) == new
    from mlflow.tracking import MlflowClient

    run = MlflowClient(laptop.settings.tracking_uri).get_run(record.result["mlflow_run_id"])
    assert run.data.tags["mlflow.source.git.commit"] == new
    events = [e["event"] for e in log_events(platform, "gpu_worker")]
    assert "task_held_back" in events and "worker_restarting_for_new_code" in events
    assert events.index("task_held_back") < events.index("task_completed")
    beat = await heartbeat(laptop, platform.settings.worker_name)
    assert beat["code_commit"] == new != old
    assert platform.procs["gpu_worker"].proc.poll() is None  # re-executed in place, still up


async def test_task_at_a_commit_that_never_arrives_fails_with_push_it(
    platform: Platform, repos: Repos, laptop: DistributedClient
) -> None:
    await start_desktop(
        platform, repos, TP_COMMIT_WAIT_S="3", TP_GIT_SYNC_INTERVAL_S="1", **LIGHT_WORKER
    )
    desktop_at = repos.head(repos.desktop)
    unpushed = repos.commit(repos.laptop, "strategy.py", "FAST = 30\n")  # never pushed
    warnings: list[str] = []
    commit = await laptop.pinned_commit(warn=warnings.extend)
    assert commit == unpushed
    assert warnings == [f"commit {unpushed[:12]} is not pushed; the desktop cannot fetch it"]

    record = await laptop.submit_and_wait("probe", {"steps": 1}, timeout_s=WAIT_S)
    assert record.state is TaskState.FAILED
    assert record.error == (
        f"desktop code at {desktop_at[:12]} does not contain commit {unpushed[:12]}; push it"
    )
    assert record.attempts == 0 and record.running_at is None  # it never ran
    assert record.failed_at - record.submitted_at >= 3


async def test_refuse_mode_queues_nothing_from_a_dirty_or_unpushed_checkout(
    settings: Settings, repos: Repos
) -> None:
    strict = settings.model_copy(update={"code_dir": repos.laptop, "commit_check": "refuse"})
    async with DistributedClient(strict) as client:
        (repos.laptop / "strategy.py").write_text("FAST = 1  # not committed\n")
        with pytest.raises(CommitCheckError, match=r"uncommitted changes in strategy\.py"):
            await client.submit("probe", {})
        repos.commit(repos.laptop, "strategy.py", "FAST = 2\n")
        with pytest.raises(CommitCheckError, match="is not pushed"):
            await client.submit("probe", {})
        assert await client.list_tasks() == []
        repos.commit(repos.laptop, "strategy.py", "FAST = 3\n", push=True)
        record = await client.submit("probe", {})
        assert record.git_commit == repos.head(repos.laptop)
    off = settings.model_copy(update={"code_dir": repos.laptop, "commit_check": "off"})
    async with DistributedClient(off) as client:
        assert (await client.submit("probe", {})).git_commit is None


async def test_cli_warns_or_refuses_naming_the_problem(settings: Settings, repos: Repos) -> None:
    (repos.laptop / "strategy.py").write_text("FAST = 5  # not committed\n")
    env = service_env(settings, TP_CODE_DIR=str(repos.laptop), TP_COMMIT_CHECK="refuse")
    refused = await asyncio.to_thread(tradectl, "task", "submit", "probe", "--json", env=env)
    assert refused.returncode == 2 and refused.stdout == ""
    assert "uncommitted changes in strategy.py" in refused.stderr
    assert "TP_COMMIT_CHECK=refuse" in refused.stderr
    env["TP_COMMIT_CHECK"] = "warn"
    warned = await asyncio.to_thread(tradectl, "task", "submit", "probe", "--json", env=env)
    assert warned.returncode == 0, warned.stderr
    assert "warning: uncommitted changes in strategy.py" in warned.stderr
    assert json.loads(warned.stdout)["git_commit"] == repos.head(repos.laptop)


async def test_worker_restarts_on_new_code_only_between_tasks(
    platform: Platform, repos: Repos, laptop: DistributedClient
) -> None:
    await start_desktop(
        platform, repos, TP_GIT_SYNC_INTERVAL_S="1", TP_WORKER_GPU_SLOTS="0", **LIGHT_WORKER
    )
    old = repos.head(repos.desktop)
    long = await laptop.submit("probe", {"sleep_s": 6, "steps": 6})
    deadline = time.monotonic() + 60
    while (await laptop.status(long.task_id)).state is not TaskState.RUNNING:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    new = repos.commit(repos.laptop, "strategy.py", "FAST = 40\n", push=True)
    while repos.head(repos.desktop) != new:  # git-sync fast-forwards within its interval
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)

    done = await laptop.wait(long.task_id, timeout_s=WAIT_S)
    assert done.state is TaskState.COMPLETED and done.attempts == 1  # not interrupted
    assert done.result["git_commit"] == old  # it ran, start to end, on the code it started on
    beat = await wait_heartbeat(laptop, platform.settings.worker_name, new)
    assert beat["worker"]["restart_pending"] is False

    events = log_events(platform, "gpu_worker")
    names = [e["event"] for e in events]
    pending = names.index("code_updated_restart_pending")
    finished = names.index("task_completed")
    restarting = names.index("worker_restarting_for_new_code")
    assert pending < finished < restarting
    assert events[pending]["running"] == [long.task_id]

    after = await laptop.submit_and_wait("probe", {"steps": 1}, timeout_s=WAIT_S)
    assert after.state is TaskState.COMPLETED and after.result["git_commit"] == new
    # The re-executed worker reaped the old forkserver and resource tracker: no zombies.
    assert zombie_children(platform.procs["gpu_worker"].proc.pid) == []


def zombie_children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(") ", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] == "Z" and int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


async def test_a_stop_signal_while_a_restart_waits_ends_the_worker(
    platform: Platform, repos: Repos, laptop: DistributedClient
) -> None:
    await start_desktop(
        platform, repos, TP_GIT_SYNC_INTERVAL_S="1", TP_WORKER_GPU_SLOTS="0", **LIGHT_WORKER
    )
    long = await laptop.submit("probe", {"sleep_s": 4, "steps": 4})
    deadline = time.monotonic() + 60
    while (await laptop.status(long.task_id)).state is not TaskState.RUNNING:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    repos.commit(repos.laptop, "strategy.py", "FAST = 50\n", push=True)
    worker = platform.procs["gpu_worker"]
    while "code_updated_restart_pending" not in worker.log_text():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    worker.proc.terminate()
    assert await asyncio.to_thread(worker.proc.wait, 60) == 0
    events = [e["event"] for e in log_events(platform, "gpu_worker")]
    assert events.count("worker_ready") == 1  # it drained and ended, it did not come back
    assert (await laptop.status(long.task_id)).state is TaskState.COMPLETED


async def test_commit_on_a_branch_the_desktop_does_not_follow_is_refused(
    settings: Settings, repos: Repos
) -> None:
    git(repos.laptop, "checkout", "-q", "-b", "feature")
    repos.commit(repos.laptop, "strategy.py", "FAST = 60\n")
    git(repos.laptop, "push", "-q", "-u", "origin", "feature")
    strict = settings.model_copy(
        update={"code_dir": repos.laptop, "commit_check": "refuse", "git_branch": "main"}
    )
    async with DistributedClient(strict) as client:
        with pytest.raises(CommitCheckError, match="on origin/feature but the desktop follows"):
            await client.submit("probe", {})


async def test_a_folder_that_is_not_a_checkout_is_refused_or_named(
    settings: Settings, tmp_path: Path
) -> None:
    env = service_env(settings, TP_CODE_DIR=str(tmp_path / "missing"))
    bad = await asyncio.to_thread(tradectl, "task", "submit", "probe", env=env)
    assert bad.returncode == 2 and "TP_CODE_DIR: no such folder" in bad.stderr
    plain = tmp_path / "plain"
    plain.mkdir()
    env = service_env(settings, TP_CODE_DIR=str(plain), TP_COMMIT_CHECK="refuse")
    refused = await asyncio.to_thread(tradectl, "task", "submit", "probe", env=env)
    assert refused.returncode == 2 and "is not a git checkout" in refused.stderr


def test_late_state_events_are_not_shown_out_of_order() -> None:
    from shared.cli.tasks import in_order
    from shared.events import state_event

    shown: list[str] = []
    show = in_order(lambda e: shown.append(e.state.value))
    running = state_event("t1", TaskState.RUNNING)
    queued = state_event("t1", TaskState.QUEUED).model_copy(update={"ts": running.ts - 0.01})
    show(running)
    show(queued)  # the scheduler's event, older, arriving late
    show(state_event("t1", TaskState.COMPLETED))
    assert shown == ["running", "completed"]


async def test_the_checkout_check_is_reused_only_while_the_checkout_is_unchanged(
    settings: Settings, repos: Repos
) -> None:
    """A submit loop checks the checkout once; a commit, ``git add`` or push is seen at once,
    an unstaged edit within ``CHECKOUT_CACHE_S``."""
    client = DistributedClient(settings.model_copy(update={"code_dir": repos.laptop}))
    first = await client.checkout()
    assert first.problems() == [] and first.commit == repos.head(repos.laptop)
    assert await client.checkout() is first  # nothing changed: no git run

    new_head = repos.commit(repos.laptop, "strategy.py", "FAST = 7\n")
    committed = await client.checkout()
    assert committed.commit == new_head and committed.problems() == [
        f"commit {new_head[:12]} is not pushed; the desktop cannot fetch it"
    ]
    git(repos.laptop, "push", "-q", "origin", "HEAD:main")
    pushed = await client.checkout()
    assert pushed.commit == new_head and pushed.problems() == []

    (repos.laptop / "strategy.py").write_text("FAST = 8  # not committed\n")
    git(repos.laptop, "add", "strategy.py")
    staged = await client.checkout()
    assert staged.dirty == ("strategy.py",), staged

    git(repos.laptop, "commit", "-q", "-m", "eight")
    git(repos.laptop, "push", "-q", "origin", "HEAD:main")
    clean = await client.checkout()
    assert clean.dirty == ()
    (repos.laptop / "strategy.py").write_text("FAST = 9  # edited, not staged\n")
    await asyncio.sleep(CHECKOUT_CACHE_S)
    # Old enough: answered at once from what was known (warn), read again behind it.
    assert await client.checkout() is clean
    deadline = time.monotonic() + 10
    while (await client.checkout()).dirty != ("strategy.py",):
        assert time.monotonic() < deadline, "the unstaged edit was never seen"
        await asyncio.sleep(0.05)

    # Under refuse a submit waits for the fresh read instead.
    strict = DistributedClient(
        client.settings.model_copy(update={"commit_check": "refuse"}), name="strict"
    )
    first = await strict.checkout()
    (repos.laptop / "strategy.py").write_text("FAST = 10  # edited again\n")
    git(repos.laptop, "checkout", "--", "strategy.py")
    await asyncio.sleep(CHECKOUT_CACHE_S)
    assert first.dirty == ("strategy.py",) and (await strict.checkout()).dirty == ()
