"""Task child processes are reused after a success and retired after anything else.

A worker keeps the child of a task that succeeded for its next task (up to
``TP_WORKER_CHILD_MAX_TASKS``), so a short task does not pay for a new process; a failed,
cancelled or timed-out task retires its child, and ``TP_WORKER_GPU_ISOLATE`` gives every gpu
task a fresh one. Each probe reports the pid of the process it ran in.
"""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path
from typing import Any

from shared.client import DistributedClient
from shared.messages import TaskState
from tests.conftest import Platform
from tests.test_pipeline import wait_state
from tests.test_task_logs import LIGHT_WORKER

WAIT_S = 60


async def run_probe(client: DistributedClient, **config: Any) -> tuple[TaskState, int | None]:
    """Submit a probe, wait for its end; its state and the pid it ran in (None if unknown)."""
    record = await client.wait((await client.submit("probe", config)).task_id, timeout_s=WAIT_S)
    pid = (record.result or {}).get("pid")
    return record.state, pid


async def test_children_are_reused_after_success_and_retired_after_failure_cancel_and_limit(
    platform: Platform, client: DistributedClient
) -> None:
    await platform.start_all(
        TP_WORKER_CHILD_MAX_TASKS="3", TP_WORKER_GPU_ISOLATE="true", TP_WORKER_GPU_SLOTS="1"
    )
    runs = [await run_probe(client) for _ in range(4)]
    assert [state for state, _ in runs] == [TaskState.COMPLETED] * 4
    pids = [pid for _, pid in runs]
    assert pids[0] == pids[1] == pids[2] != pids[3], pids  # three tasks, then a fresh child

    failed = await client.wait(
        (await client.submit("probe", {"fail_with": "boom"})).task_id, timeout_s=WAIT_S
    )
    assert failed.state is TaskState.FAILED and failed.child_pid == pids[3], failed
    after_failure = await run_probe(client)
    assert after_failure[0] is TaskState.COMPLETED and after_failure[1] != pids[3]

    long = await client.submit("probe", {"sleep_s": 30, "steps": 300})
    running = await wait_state(client, long.task_id, TaskState.RUNNING)
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while running.child_pid is None:  # recorded just after the claim that made it running
        assert asyncio.get_running_loop().time() < deadline, running
        await asyncio.sleep(0.05)
        running = await client.status(long.task_id)
    assert running.child_pid == after_failure[1]  # reused, then cancelled mid-task
    await client.cancel(long.task_id)
    await wait_state(client, long.task_id, TaskState.CANCELLED)
    after_cancel = await run_probe(client)
    assert after_cancel[0] is TaskState.COMPLETED and after_cancel[1] != after_failure[1]

    gpu = [await run_probe(client, needs_gpu=True) for _ in range(2)]
    assert gpu[0][1] != gpu[1][1], gpu  # TP_WORKER_GPU_ISOLATE: a fresh child per gpu task
    assert after_cancel[1] not in {gpu[0][1], gpu[1][1]}


def output_capture_of(pid: int) -> tuple[list[str], list[str]]:
    """A child's threads (ids) and what its fds 1 and 2 are (``pipe:[inode]`` while captured)."""
    threads = sorted(os.listdir(f"/proc/{pid}/task"))
    return threads, [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in (1, 2)]


async def test_a_reused_child_keeps_its_output_capture_and_each_task_logs_its_own_lines(
    platform: Platform, client: DistributedClient
) -> None:
    """One capture (pipes, readers, sender) serves all tasks of a child: made once, not per task.

    Between tasks the idle child still has the capture's threads and pipes, the same ones; each
    task's log holds exactly its own lines, all of them before its end.
    """
    await platform.start_all(TP_WORKER_CHILD_MAX_TASKS="3", **LIGHT_WORKER)
    runs = []
    for lines in (3, 2):
        task = await client.submit("probe", {"print_lines": lines})
        record = await client.wait(task.task_id, timeout_s=WAIT_S)
        assert record.state is TaskState.COMPLETED, record
        pid = record.result["pid"]
        runs.append((task.task_id, lines, pid, output_capture_of(pid)))
    (_, _, first_pid, first), (_, _, second_pid, second) = runs
    assert first_pid == second_pid
    threads, outputs = first
    assert len(threads) >= 4, threads  # main, the two pipe readers and the sender, kept idle
    assert all(output.startswith("pipe:") for output in outputs), outputs
    assert second == first  # the very same threads and pipes after the second task

    for task_id, n, _, _ in runs:
        got = [
            (line.stream, re.sub(r" ts=.*", "", line.text))
            async for line in client.follow_logs(task_id)
        ]
        assert got[0] == ("log", "attempt 1 started on worker test-worker"), got
        assert got[-1] == ("log", "attempt 1 ended: completed"), got
        assert sorted(got[1:-1]) == sorted(
            [
                ("log", f"[info] probe_printed [services.gpu_worker.tasks.probe] lines={n}"),
                ("stderr", f"probe printed {n} lines"),
                *(("stdout", f"probe line {i}/{n}") for i in range(1, n + 1)),
            ]
        ), got


async def test_a_lane_never_runs_more_tasks_than_its_slots(
    platform: Platform, client: DistributedClient
) -> None:
    """Deliveries handled at once each hold a slot from their check on.

    Before, two deliveries could both pass the free-slot check while the first awaited its
    claim: a 2-slot lane ran 67 tasks at once in bench.dispatch.
    """
    await platform.start_all(TP_WORKER_GPU_SLOTS="0", TP_WORKER_CPU_SLOTS="2")
    ids = [(await client.submit("probe", {"sleep_s": 0.3})).task_id for _ in range(12)]
    records = [await client.wait(task_id, timeout_s=WAIT_S) for task_id in ids]
    assert all(r.state is TaskState.COMPLETED for r in records), records
    edges = sorted(
        edge
        for r in records
        for edge in ((r.result["started_at"], 1), (r.result["returned_at"], -1))
    )
    running, most = 0, 0
    for _, change in edges:
        running += change
        most = max(most, running)
    assert most == 2, most  # both slots used, never more


def descendants(pid: int) -> dict[int, str]:
    """Every process below ``pid`` (by the parent links in /proc): pid -> state (``Z``: zombie)."""
    links: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:  # gone meanwhile
                continue
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            links[int(entry)] = (int(ppid), state)
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, state) in links.items():
            if ppid == parent and child not in found:
                found[child] = state
                frontier.append(child)
    return found


async def test_a_retired_child_is_replaced_before_the_next_task_and_reaped(
    platform: Platform, client: DistributedClient
) -> None:
    """A pool's child that ran its last task (or failed) has a spare forked behind it.

    The next task then runs in a child that existed before it was submitted, and the retired
    child is reaped (no zombie left behind).
    """
    await platform.start_all(TP_WORKER_CHILD_MAX_TASKS="2", TP_WORKER_GPU_SLOTS="0", **LIGHT_WORKER)
    worker = platform.procs["gpu_worker"].proc.pid
    _, child = await run_probe(client)
    for ending in ({}, {"fail_with": "boom"}):  # its second task (the limit), then a failure
        before = set(descendants(worker))  # the forkserver, its tracker, the child
        assert child in before, before
        state, pid = await run_probe(client, **ending)
        assert state is (TaskState.FAILED if ending else TaskState.COMPLETED)
        deadline = asyncio.get_running_loop().time() + WAIT_S
        while True:  # the retired child reaped, a spare forked from the forkserver
            below = descendants(worker)
            spares = set(below) - before
            if child not in below and spares:
                break
            assert asyncio.get_running_loop().time() < deadline, below
            await asyncio.sleep(0.05)
        assert "Z" not in below.values(), below
        state, pid = await run_probe(client)
        assert state is TaskState.COMPLETED and pid in spares, (pid, spares)
        child = pid


async def test_a_child_prepared_for_a_refused_claim_runs_nothing_and_stays_in_the_pool(
    platform: Platform, client: DistributedClient
) -> None:
    """A duplicate delivery of a finished task: the idle child it was handed is given back."""
    await platform.start_all(TP_WORKER_GPU_SLOTS="0", **LIGHT_WORKER)
    submission = await client.prepare("probe", {})
    await client.submit_prepared(submission)
    done = await client.wait(submission.task_id, timeout_s=WAIT_S)
    assert done.state is TaskState.COMPLETED
    pid = done.result["pid"]
    await client.broker.publish_submission(submission, "cpu")  # its claim will be refused
    log = platform.procs["gpu_worker"]
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while "claim_refused" not in log.log_text():
        assert asyncio.get_running_loop().time() < deadline, log.log_text()[-2000:]
        await asyncio.sleep(0.05)
    assert (await client.status(submission.task_id)).state is TaskState.COMPLETED
    state, next_pid = await run_probe(client)
    assert state is TaskState.COMPLETED and next_pid == pid  # the same child, idle again


async def test_a_child_that_dies_ends_its_task_even_when_a_process_it_forked_lives_on(
    platform: Platform, client: DistributedClient
) -> None:
    """The forked process holds the child's socket (no EOF), yet the child's exit is seen.

    The task fails at once, not when the leftover ends, and the leftover is killed with the
    child's process group.
    """
    await platform.start_all(TP_WORKER_GPU_SLOTS="0", **LIGHT_WORKER)
    task = await client.submit("probe", {"fork_sleeper_s": 60, "sleep_s": 0.5, "crash": True})
    record = await client.wait(task.task_id, timeout_s=20)
    assert record.state is TaskState.FAILED, record
    assert "killed by SIGKILL" in (record.error or ""), record.error
    deadline = asyncio.get_running_loop().time() + 10
    while group := in_group(record.child_pid):  # the sleeper: the child's group, reparented
        assert asyncio.get_running_loop().time() < deadline, group
        await asyncio.sleep(0.1)


def in_group(pgid: int | None) -> list[int]:
    """Live processes in process group ``pgid`` (by /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[2] == str(pgid) and fields[0] != "Z":
                found.append(int(entry))
    return found
