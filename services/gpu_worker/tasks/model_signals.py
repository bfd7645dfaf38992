"""What a ``train_model`` model predicts over OHLCV bars: the signals ``model_signal`` trades.

The model comes from the ``train_model`` task's artifacts: its own folder on this desktop
(``<tasks_dir>/<task id>/artifacts/model.pt``), else shared storage (artifact-sync's copy,
downloaded and SHA-256 checked by :func:`shared.downloads.download_artifacts`). ``model.pt``
holds everything needed to score new bars exactly as the model was trained: the weights, the
``train_model`` config (architecture, feature window), the feature names and the training
standardisation statistics. It is read with ``torch.load(weights_only=True)``: tensors and plain
values only, never pickled code, since a file from shared storage is not trusted to run.

No look-ahead: the prediction for bar ``t`` is made from the window of per-bar features ending at
``t`` (:func:`.ohlcv.bar_features`, each from bars ``t`` and ``t - 1``), the same windows
``train_model`` trained on, so it uses bars ``<= t`` only. The strategy acts on it at ``t``'s
close and the order fills at bar ``t + 1`` (backtesting.py's default).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd
import structlog
import torch
from torch import nn

from services.gpu_worker.tasks.ohlcv import (
    FEATURE_NAMES,
    Standardiser,
    bar_features,
    build_features,
    split_chronological,
)
from services.gpu_worker.tasks.train_model import MODEL_FILE, build_model
from shared.task_types import TrainModelConfig

log = structlog.get_logger(__name__)

#: Windows per forward pass: bounds memory, not tuned for speed.
_PREDICT_BATCH = 4096

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class TrainedModel:
    """A ``train_model`` model ready to score bars.

    Attributes:
        task_id: the ``train_model`` task that trained it.
        config: that task's config (``feature_window``, ``model``, ``dataset`` ...).
        model: the classifier in eval mode, on CPU.
        standardiser: the training features' mean and std, shape (n_features,) each.
        source: ``local`` (this desktop's task folder) or ``shared_storage``.
        path: the ``model.pt`` it was read from.
    """

    task_id: str
    config: TrainModelConfig
    model: nn.Module
    standardiser: Standardiser
    source: str
    path: Path


def model_file(task_id: str, tasks_dir: Path, download_dir: Path) -> tuple[Path, str]:
    """Where ``model.pt`` of task ``task_id`` is: its local folder, else a verified download.

    Args:
        task_id: the ``train_model`` task id.
        tasks_dir: the folder holding one sub-folder per task on this desktop.
        download_dir: where to download the task's synced files if they are not local.

    Returns:
        ``(path, source)`` with source ``local`` or ``shared_storage``.

    Raises:
        FileNotFoundError: not on this desktop and no shared storage configured
            (``TP_ARTIFACT_BACKEND=none``), or the stored set has no ``model.pt`` (not a
            ``train_model`` task).
        shared.storage.StorageError: not in shared storage either (not finished or not synced),
            or a download failed its check.
    """
    local = tasks_dir / task_id / "artifacts" / MODEL_FILE
    if local.is_file():
        return local, "local"
    from shared.downloads import download_artifacts
    from shared.settings import Settings

    settings = Settings()  # the worker's environment, inherited by this child
    if settings.artifact_backend == "none":
        raise FileNotFoundError(
            f"model of task {task_id} not found at {local} and no shared storage to fetch it "
            "from (TP_ARTIFACT_BACKEND=none); is it a finished train_model task of this desktop?"
        )
    log.info("model_download", model_task=task_id, backend=settings.artifact_backend)
    asyncio.run(download_artifacts(settings, task_id, download_dir))
    path = download_dir / "artifacts" / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"the synced artifacts of task {task_id} have no {MODEL_FILE}")
    return path, "shared_storage"


def load_model(path: Path, task_id: str, source: str) -> TrainedModel:
    """Rebuild the classifier ``train_model`` saved at ``path`` (see its ``write_artifacts``).

    Raises:
        ValueError: the file was written for other features than :data:`.ohlcv.FEATURE_NAMES`
            (the feature code changed since), or is not a ``train_model`` model.
    """
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        names = tuple(saved["feature_names"])
        config = TrainModelConfig.model_validate(saved["config"])
        mean, std = saved["feature_mean"].numpy(), saved["feature_std"].numpy()
        state = saved["state_dict"]
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path} of task {task_id} is not a train_model model: {e!r}") from e
    if names != FEATURE_NAMES:
        raise ValueError(
            f"the model of task {task_id} was trained on features {list(names)}, this code "
            f"computes {list(FEATURE_NAMES)}; train it again"
        )
    model = build_model(config, len(names))
    model.load_state_dict(state)
    model.eval()
    return TrainedModel(task_id, config, model, Standardiser(mean, std), source, path)


def prediction_windows(bars: pd.DataFrame, window: int) -> npt.NDArray[np.float32]:
    """Feature windows ending at every bar ``t = window .. n - 1``.

    The window ending at ``t`` equals ``train_model``'s sample ending at ``t``
    (:func:`.ohlcv.build_features`); unlike those, the last bar gets one too, as no target is
    needed to predict.

    Args:
        bars: cleaned bars (:func:`.ohlcv.clean_ohlcv`), n rows.
        window: bars per window (the model's ``feature_window``).

    Returns:
        Shape (n - window, window, n_features), float32; row ``k`` ends at bar ``window + k``.

    Raises:
        ValueError: fewer than ``window + 1`` bars.
    """
    if len(bars) < window + 1:
        raise ValueError(f"{len(bars)} bars are too few for the model's {window}-bar window")
    per_bar = bar_features(bars)  # row i describes bar i + 1
    windows = np.lib.stride_tricks.sliding_window_view(per_bar, window, axis=0)
    return np.ascontiguousarray(windows.transpose(0, 2, 1))


@torch.no_grad()
def up_probabilities(
    trained: TrainedModel, bars: pd.DataFrame, device: torch.device | None = None
) -> pd.Series:
    """The model's P(``Close[t + 1] > Close[t]``) at every bar ``t``, from bars ``<= t`` only.

    Args:
        trained: the model and its training standardisation.
        bars: cleaned bars, n rows.
        device: where to run the model (default CPU).

    Returns:
        Float series on ``bars.index`` (0-1); NaN for the first ``feature_window`` bars, which
        have no full window.
    """
    device = device or torch.device("cpu")
    window = trained.config.feature_window
    inputs = torch.from_numpy(trained.standardiser.apply(prediction_windows(bars, window)))
    model = trained.model.to(device)
    parts = [
        torch.sigmoid(model(inputs[i : i + _PREDICT_BATCH].to(device))).cpu()
        for i in range(0, len(inputs), _PREDICT_BATCH)
    ]
    probabilities = np.full(len(bars), np.nan)
    probabilities[window:] = torch.cat(parts).double().numpy()
    return pd.Series(probabilities, index=bars.index, name="p_up")


def target_positions(
    p_up: pd.Series, threshold: float, *, invert: bool, allow_short: bool
) -> pd.Series:
    """The position each prediction asks for: 1 long, -1 short, 0 flat, NaN before the first.

    Long when ``p_up > threshold``, short (flat unless ``allow_short``) when
    ``p_up < 1 - threshold``, flat in between. ``invert`` reads ``1 - p_up`` instead, swapping
    long and short (to check that a result comes from the signals).

    Args:
        p_up: P(next bar up) per bar (0-1, NaN where unknown).
        threshold: 0.5-1; above 0.5 leaves a band of low-confidence bars flat.
        invert: trade against the model.
        allow_short: take the short side, else stay flat there.
    """
    p = 1.0 - p_up if invert else p_up
    down = -1.0 if allow_short else 0.0
    values = np.where(p > threshold, 1.0, np.where(p < 1.0 - threshold, down, 0.0))
    values[p.isna().to_numpy()] = np.nan
    return pd.Series(values, index=p_up.index, name="target")


def trained_until(trained: TrainedModel, bars: pd.DataFrame) -> pd.Timestamp | None:
    """The last bar the model's training part used (its last target), if ``bars`` are its data.

    ``train_model`` fits on the first part of its samples in time order
    (:func:`.ohlcv.split_chronological`); a backtest over bars up to this time trades the model
    on data it was fitted to, where its results are optimistic.

    Args:
        trained: the model, whose config names its dataset and split.
        bars: the backtest's bars, loaded from the same ``dataset`` name.

    Returns:
        The time of the last training target bar, or None when the split cannot be rebuilt.
    """
    config = trained.config
    try:
        features = build_features(bars, config.feature_window)
        n_train = len(split_chronological(features, config.validation_fraction).y_train)
    except ValueError:
        return None
    # Sample j ends at bar window + j and targets the next bar (build_features).
    return pd.Timestamp(bars.index[config.feature_window + n_train])
