"""The ``probe`` task (stepped or plain sleep), and what a task child hands the worker."""

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


def test_a_result_reaches_the_worker_as_plain_json_data() -> None:
    import numpy as np
    import pytest
    import torch

    from services.gpu_worker.runner import plain_result

    got = plain_result(
        {"sharpe": np.float32(1.5), "curve": np.arange(3), "loss": torch.tensor(0.25), 7: None}
    )
    assert got == {"sharpe": 1.5, "curve": [0, 1, 2], "loss": 0.25, "7": None}
    assert type(got["sharpe"]) is float and type(got["loss"]) is float
    assert plain_result(None) == {}
    with pytest.raises(TypeError, match="must return a dict"):
        plain_result([1, 2])
    with pytest.raises(TypeError, match="holds a object"):
        plain_result({"x": object()})


def test_progress_metrics_go_as_floats_and_non_numbers_are_left_out(tmp_path: Path) -> None:
    import torch

    sent: list[tuple[float, str, dict[str, float]]] = []
    ctx = TaskContext(
        task_id="t1",
        attempt=1,
        artifact_dir=tmp_path,
        checkpoint_path=tmp_path / "last.pt",
        tracking_uri="",
        _progress_sink=lambda f, m, metrics: sent.append((f, m, metrics)),
    )
    ctx.report_progress(0.5, "half", {"loss": torch.tensor(0.5), "name": "x", "n": 3})
    assert sent == [(0.5, "half", {"loss": 0.5, "n": 3.0})]
    assert all(type(v) is float for v in sent[0][2].values())
