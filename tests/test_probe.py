"""The ``probe`` task's two ways of sleeping: stepped (progress and checkpoints) or plain."""

from __future__ import annotations

import time
from pathlib import Path

from services.gpu_worker.context import TaskContext
from services.gpu_worker.tasks import probe
from shared.task_types import ProbeConfig


def _context(tmp_path: Path, progress: list[float], checkpoints: list[int]) -> TaskContext:
    (tmp_path / "checkpoints").mkdir()
    return TaskContext(
        task_id="t1",
        attempt=1,
        artifact_dir=tmp_path,
        checkpoint_path=tmp_path / "checkpoints" / "last.pt",
        tracking_uri="",
        _progress_sink=lambda fraction, _message, _metrics: progress.append(fraction),
        _checkpoint_sink=lambda: checkpoints.append(1),
    )


def test_a_stepped_probe_reports_and_checkpoints_each_step(tmp_path: Path) -> None:
    progress: list[float] = []
    checkpoints: list[int] = []
    ctx = _context(tmp_path, progress, checkpoints)
    result = probe.run(ProbeConfig(sleep_s=0.02, steps=2), ctx)
    assert progress == [0.5, 1.0]
    assert len(checkpoints) == 2
    assert ctx.checkpoint_path.read_text() == "2"
    assert result["metrics"]["steps"] == 2.0


def test_a_plain_probe_only_sleeps(tmp_path: Path) -> None:
    progress: list[float] = []
    checkpoints: list[int] = []
    ctx = _context(tmp_path, progress, checkpoints)
    t0 = time.monotonic()
    result = probe.run(ProbeConfig(sleep_s=0.05, steps=5, report_steps=False), ctx)
    assert time.monotonic() - t0 >= 0.05
    assert progress == [] and checkpoints == []
    assert not ctx.checkpoint_path.exists()
    assert result["metrics"]["steps"] == 5.0
    assert result["metrics"]["slept_s"] >= 0.05
