"""The worker's event loop reads a task child's messages itself (``WarmChild.listen``).

Messages of every size must arrive whole and in order, split across reads or not, and the
child's end (EOF) must reach the task as None. No child is forked here: the test writes on the
child's end of the socket pair as the child does, with ``Connection.send``.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from services.gpu_worker.runner import ChildJob, WarmChild


def _child(tmp_path: Path) -> WarmChild:
    job = ChildJob(
        task_id="t1",
        task_type="probe",
        config={},
        attempt=1,
        artifact_dir=tmp_path / "a",
        checkpoint_path=tmp_path / "c" / "last.pt",
        tracking_uri="",
    )
    return WarmChild(job)


async def test_messages_of_every_size_arrive_whole_and_in_order_then_eof(tmp_path: Path) -> None:
    child = _child(tmp_path)
    got: list[tuple[Any, ...] | None] = []
    done = asyncio.Event()

    def sink(item: tuple[Any, ...] | None) -> None:
        got.append(item)
        if item is None:
            done.set()

    child.listen()
    child.attach(sink)
    # Small (one write), over 16 KB (header and body written apart), over the 64 KB read and the
    # socket's buffer (many reads; the writer blocks until the loop has read some).
    sent = [("progress", 0.5, "x", {}), ("logs", "y" * 20_000), ("result", {"z": "w" * 500_000})]

    def write() -> None:
        for message in sent:
            child._child_end.send(message)
        child._child_end.close()

    writer = threading.Thread(target=write)
    writer.start()
    async with asyncio.timeout(10):
        await done.wait()
    writer.join()
    assert got == [*sent, None]
    assert not child.alive
    child.conn.close()


async def test_a_detached_child_drops_its_messages_and_an_attach_after_eof_hears_it(
    tmp_path: Path,
) -> None:
    child = _child(tmp_path)
    child.listen()
    child._child_end.send(("progress", 0.1, "", {}))  # nobody attached: dropped
    await asyncio.sleep(0.1)
    child._child_end.close()
    async with asyncio.timeout(10):
        while child.alive:
            await asyncio.sleep(0.01)
    got: list[tuple[Any, ...] | None] = []
    child.attach(got.append)
    assert got == [None]
    child.conn.close()
