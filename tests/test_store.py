"""The Redis status store against the real Redis: atomic compare-and-set, idempotent create."""

from __future__ import annotations

import asyncio
import time

import pytest

from shared.errors import TaskNotFoundError
from shared.events import state_event
from shared.messages import RECORD_IN_EVENT_MAX_CHARS, TaskState, TaskSubmission
from shared.store import HAS_CHILDREN_FIELD, StatusStore, TaskRecord


def submission(task_id: str, **kw) -> TaskSubmission:
    return TaskSubmission(task_id=task_id, task_type="probe", submitted_at=time.time(), **kw)


async def started_store(settings) -> StatusStore:
    store = StatusStore(settings)
    await store.start()
    return store


async def test_create_is_idempotent_and_keeps_the_first_spec(settings):
    store = await started_store(settings)
    try:
        assert await store.create(submission("a1", config={"sleep_s": 1}, priority=3))
        assert not await store.create(submission("a1", config={"sleep_s": 9}, priority=9))
        record = await store.get("a1")
        assert record.config == {"sleep_s": 1} and record.priority == 3
        assert record.state is TaskState.SUBMITTED and record.submitted_at is not None
        assert [r.task_id for r in await store.list_recent()] == ["a1"]
    finally:
        await store.stop()


async def test_claim_race_exactly_one_winner_100_times(settings):
    """Two parties claim the same queued task at the same moment: exactly one wins, every time."""
    stores = [await started_store(settings) for _ in range(2)]
    try:
        for i in range(100):
            task_id = f"race-{i}"
            await stores[0].create(submission(task_id))
            await stores[0].transition(task_id, [TaskState.SUBMITTED], TaskState.QUEUED)
            claims = await asyncio.gather(
                *(
                    s.transition(
                        task_id,
                        [TaskState.QUEUED],
                        TaskState.RUNNING,
                        by=f"w{n}",
                        fields={"worker": f"w{n}", "+attempts": 1},
                    )
                    for n, s in enumerate(stores)
                )
            )
            assert sorted(c.applied for c in claims) == [False, True]
            loser = next(c for c in claims if not c.applied)
            assert loser.previous is TaskState.RUNNING
            record = await stores[0].get(task_id)
            assert record.attempts == 1
            assert [h["to"] for h in await stores[0].history(task_id)].count("running") == 1
    finally:
        for s in stores:
            await s.stop()


async def test_transition_refuses_unexpected_state_and_terminal_gets_ttl(settings):
    store = await started_store(settings)
    try:
        assert (
            await store.transition("nope", [TaskState.QUEUED], TaskState.RUNNING)
        ).previous is None
        await store.create(submission("t1"))
        refused = await store.transition("t1", [TaskState.QUEUED], TaskState.RUNNING)
        assert not refused.applied and refused.previous is TaskState.SUBMITTED
        done = await store.transition(
            "t1", [TaskState.SUBMITTED], TaskState.FAILED, fields={"error": "bad config"}
        )
        assert done.applied
        record = await store.get("t1")
        assert record.state is TaskState.FAILED and record.error == "bad config"
        # A terminal move hands back the record it left, read in the same atomic step.
        assert done.record is not None and TaskRecord.from_hash(done.record) == record
        assert refused.record is None
        assert record.failed_at >= record.submitted_at
        assert 0 < await store.redis.ttl(store.keys.task("t1")) <= 30 * 24 * 3600
        # update_if only touches a task in the named states
        assert not await store.update_if("t1", [TaskState.RUNNING], {"progress": 0.5})
        assert (await store.get("t1")).progress is None
    finally:
        await store.stop()


async def test_resolve_id_by_unique_prefix(settings):
    store = await started_store(settings)
    try:
        for task_id in ("abc-111", "abc-222", "xyz-333"):
            await store.create(submission(task_id))
        assert await store.resolve_id("xyz-333") == "xyz-333"
        assert await store.resolve_id("xy") == "xyz-333"
        with pytest.raises(TaskNotFoundError, match="ambiguous: "):
            await store.resolve_id("abc")
        with pytest.raises(TaskNotFoundError, match="no task 'q'"):
            await store.resolve_id("q")
        # A hyperopt task's prefix also matches its trial tasks: it means the hyperopt task.
        for task_id in ("hyp-9", "hyp-9.runner-1", "hyp-9.runner-2"):
            await store.create(submission(task_id))
        assert await store.resolve_id("hyp") == "hyp-9"
    finally:
        await store.stop()


async def test_stale_owner_cannot_record_over_the_next_run(settings):
    """A worker that lost its lease (reaped, claimed again elsewhere) cannot record its outcome."""
    store = await started_store(settings)
    try:
        await store.create(submission("stale-1"))
        await store.transition("stale-1", [TaskState.SUBMITTED], TaskState.QUEUED)
        claim = {"+attempts": 1}
        await store.transition(
            "stale-1", [TaskState.QUEUED], TaskState.RUNNING, fields={**claim, "worker": "w1"}
        )
        await store.transition("stale-1", [TaskState.RUNNING], TaskState.QUEUED, by="reaper")
        await store.transition(
            "stale-1", [TaskState.QUEUED], TaskState.RUNNING, fields={**claim, "worker": "w2"}
        )
        stale = await store.transition(
            "stale-1",
            [TaskState.RUNNING],
            TaskState.FAILED,
            owner=("w1", 1),
            fields={"error": "old run"},
        )
        assert not stale.applied and stale.previous is TaskState.RUNNING
        assert not await store.update_if(
            "stale-1", [TaskState.RUNNING], {"progress": 0.9}, worker="w1"
        )
        current = await store.transition(
            "stale-1", [TaskState.RUNNING], TaskState.COMPLETED, owner=("w2", 2)
        )
        assert current.applied
        record = await store.get("stale-1")
        assert record.state is TaskState.COMPLETED and record.error is None
    finally:
        await store.stop()


async def test_claim_waits_for_a_pending_retry(settings):
    """A stray duplicate message cannot start a task before its retry back-off is over."""
    store = await started_store(settings)
    try:
        await store.create(submission("later-1"))
        await store.transition(
            "later-1", [TaskState.SUBMITTED], TaskState.QUEUED, fields={"retry_in_s": 0.5}
        )
        early = await store.transition("later-1", [TaskState.QUEUED], TaskState.RUNNING)
        assert not early.applied
        assert await store.due_dispatches() == []
        await asyncio.sleep(0.6)
        assert await store.due_dispatches() == ["later-1"]
        assert (await store.transition("later-1", [TaskState.QUEUED], TaskState.RUNNING)).applied
    finally:
        await store.stop()


def test_a_terminal_event_carries_the_record_unless_it_is_large():
    small = {"task_id": "t1", "state": "completed", "result": '{"value": 1}'}
    assert state_event("t1", TaskState.COMPLETED, record=small).record == small
    big = {**small, "result": "x" * RECORD_IN_EVENT_MAX_CHARS}
    assert state_event("t1", TaskState.COMPLETED, record=big).record is None
    assert state_event("t1", TaskState.RUNNING).record is None


async def test_create_and_transition_and_a_prelude_share_one_round_trip(settings):
    store = await started_store(settings)
    try:
        created, moved = await store.create_and_transition(
            submission("t5"), TaskState.QUEUED, by="scheduler"
        )
        assert created and moved.applied and moved.previous is TaskState.SUBMITTED
        again, refused = await store.create_and_transition(
            submission("t5"), TaskState.QUEUED, by="scheduler"
        )
        assert not again and not refused.applied and refused.previous is TaskState.QUEUED
        record = await store.get("t5")
        assert record.state is TaskState.QUEUED and record.queued_at >= record.submitted_at
        created, first = await store.create_record(submission("t5"))
        assert not created and first == record

        stream = store.keys.task_logs("t5")

        def prelude(pipe):
            pipe.xadd(stream, {"text": "last line"})
            return 1

        done = await store.transition(
            "t5", [TaskState.QUEUED], TaskState.CANCELLED, by="client", prelude=prelude
        )
        assert done.applied and done.record is not None
        assert [f["text"] for _, f in await store.redis.xrange(stream)] == ["last line"]
    finally:
        await store.stop()


async def test_hold_marks_each_existing_parent_so_its_end_event_says_it_has_children(settings):
    store = await started_store(settings)
    try:
        await store.create(submission("parent-1"))
        assert HAS_CHILDREN_FIELD not in await store.redis.hgetall(store.keys.task("parent-1"))
        await store.hold("child-1", ["parent-1", "parent-gone"], check_at=time.time() + 60)
        assert (await store.redis.hgetall(store.keys.task("parent-1")))[HAS_CHILDREN_FIELD] == "1"
        assert not await store.redis.exists(store.keys.task("parent-gone"))  # no stray record
        done = await store.transition("parent-1", [TaskState.SUBMITTED], TaskState.FAILED)
        assert done.record is not None and done.record[HAS_CHILDREN_FIELD] == "1"
        assert await store.children("parent-1") == ["child-1"]
    finally:
        await store.stop()
