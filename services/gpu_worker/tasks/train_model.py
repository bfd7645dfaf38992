"""``train_model``: a PyTorch classifier of the next bar's direction from OHLCV features.

Runs in the worker's child process. Features come from :mod:`.ohlcv` (no look-ahead, train-only
standardisation, chronological split); the model is an MLP over the flattened window or an LSTM
over the window's bars; the loss is binary cross-entropy on logits. Every epoch writes a checkpoint
(:mod:`.checkpoints`), reports progress and logs metrics to MLflow. A retried task resumes from
its checkpoint when it was written for the same config: it skips the epochs already done and ends
with the same model and metrics as an uninterrupted run. Reported metrics are those of the
**final** model (the last epoch run), not the best epoch on validation: choosing an epoch by
validation loss would make the validation figures optimistic.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from services.gpu_worker.context import TaskContext
from services.gpu_worker.tasks.checkpoints import (
    Checkpoint,
    TrainState,
    load_checkpoint,
    save_checkpoint,
)
from services.gpu_worker.tasks.ohlcv import (
    FEATURE_NAMES,
    SplitData,
    build_features,
    load_ohlcv,
    split_chronological,
)
from services.gpu_worker.tasks.tracking import MlflowRecorder, mlflow_run
from shared.task_types import TrainModelConfig

if TYPE_CHECKING:
    import pandas as pd

#: MLflow experiment every ``train_model`` run is recorded under.
EXPERIMENT_NAME = "train_model"
MODEL_FILE = "model.pt"
METRICS_FILE = "metrics.json"
LOSS_CURVE_FILE = "loss_curve.png"

#: Samples per forward pass when evaluating: bounds memory, not tuned for speed.
_EVAL_BATCH = 4096
#: Keeps the baseline's log-probabilities finite when the train set is all one class.
_PROB_EPS = 1e-7

#: ``(epoch, metrics, state) -> keep going``, called after each epoch (1-based).
EpochCallback = Callable[[int, dict[str, float], TrainState], bool]


def resolve_device(requested: str) -> torch.device:
    """Map ``auto``/``cuda``/``cpu`` to a torch device.

    Raises:
        RuntimeError: ``cuda`` was requested but CUDA is not available.
    """
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if requested == "cuda":
        raise RuntimeError(
            "device 'cuda' requested but CUDA is not available on this machine "
            "(torch.cuda.is_available() is False); use device 'auto' or 'cpu'"
        )
    return torch.device("cpu")


class MLPClassifier(nn.Module):
    """Feed-forward net over the flattened window: input (batch, window, n_features) -> (batch,)."""

    def __init__(
        self, window: int, n_features: int, hidden_size: int, num_layers: int, dropout: float
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = window * n_features
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_size), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden_size
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of "next bar up", shape (batch,)."""
        logits: torch.Tensor = self.net(x)
        return logits.squeeze(-1)


class LSTMClassifier(nn.Module):
    """LSTM over the window's bars; the last layer's final hidden state feeds a linear head."""

    def __init__(self, n_features: int, hidden_size: int, num_layers: int, dropout: float) -> None:
        super().__init__()
        # nn.LSTM's dropout acts between stacked layers only (and warns when given one layer).
        between = dropout if num_layers > 1 else 0.0
        self.lstm = nn.LSTM(n_features, hidden_size, num_layers, batch_first=True, dropout=between)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of "next bar up" from input (batch, window, n_features), shape (batch,)."""
        _, (h_n, _) = self.lstm(x)
        logits: torch.Tensor = self.head(self.dropout(h_n[-1]))
        return logits.squeeze(-1)


def build_model(config: TrainModelConfig, n_features: int) -> nn.Module:
    """The configured classifier (``mlp`` or ``lstm``) for windows of ``n_features`` per bar."""
    if config.model == "lstm":
        return LSTMClassifier(n_features, config.hidden_size, config.num_layers, config.dropout)
    return MLPClassifier(
        config.feature_window, n_features, config.hidden_size, config.num_layers, config.dropout
    )


@contextlib.contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Seed torch, numpy and ``random``, select deterministic kernels; restore the flags after.

    cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG`` before its first use to be deterministic; an op with no
    deterministic kernel warns rather than failing the task (``warn_only``).
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    torch.manual_seed(seed)
    np.random.seed(seed)  # the legacy global seed, for any numpy code a model calls
    random.seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


@dataclass(frozen=True)
class TrainOutcome:
    """What :func:`train_classifier` produced.

    Attributes:
        model: the final model (after the last epoch run), in eval mode.
        history: one entry per epoch run, resumed ones included: ``epoch`` plus train/val loss
            and accuracy, all measured after that epoch in eval mode (no dropout) over the whole
            split.
        stopped_early: the callback asked to stop before the configured epochs were done.
        resumed_from_epoch: epochs taken from a checkpoint rather than trained (0: fresh start).
    """

    model: nn.Module
    history: list[dict[str, float]]
    stopped_early: bool
    resumed_from_epoch: int = 0

    @property
    def epochs_trained(self) -> int:
        """Epochs trained by this call (not taken from the checkpoint)."""
        return len(self.history) - self.resumed_from_epoch

    @property
    def final(self) -> dict[str, float]:
        """Train/val loss and accuracy of the final model (the last history entry)."""
        return {k: v for k, v in self.history[-1].items() if k != "epoch"}


def new_train_state(config: TrainModelConfig, n_features: int, device: torch.device) -> TrainState:
    """A new model (initialised from the global torch RNG), its AdamW and shuffling generator."""
    model = build_model(config, n_features).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    return TrainState(model, optimizer, torch.Generator().manual_seed(config.seed), history=[])


def train_classifier(
    data: SplitData,
    config: TrainModelConfig,
    device: torch.device,
    on_epoch: EpochCallback | None = None,
    resume: Checkpoint | None = None,
) -> TrainOutcome:
    """Fit the configured model with AdamW and BCE-with-logits, deterministically from the seed.

    Training batches are shuffled within the training set only (seeded generator); validation
    samples are never seen by the optimiser. ``on_epoch`` returning False stops after that epoch.
    With ``resume``, training continues after the checkpoint's last epoch (none run if it has
    them all) and ends exactly as an uninterrupted run would. After each epoch the train and
    validation losses must be finite: a model whose loss became NaN or infinite stays broken, so
    training stops there with an error (before ``on_epoch``, so no NaN is reported, checkpointed
    or logged).

    Args:
        data: the standardised chronological split.
        config: model and optimiser settings (``epochs``, ``batch_size``, ``seed`` ...).
        device: where to train.
        on_epoch: called after each epoch; returns whether to continue.
        resume: a checkpoint of this config (from :func:`.checkpoints.load_checkpoint`).

    Returns:
        The final model and the per-epoch history (resumed epochs included).

    Raises:
        FloatingPointError: a loss is not finite after an epoch (training diverged), e.g.
            ``training diverged: train_loss is nan after epoch 3/20 ...``.
    """
    with deterministic(config.seed):
        state = new_train_state(config, data.n_features, device)
        if resume is not None:
            resume.restore(state)  # after building: the RNGs continue from the checkpoint
        start = state.epoch
        tensors = [torch.from_numpy(a).to(device) for a in (data.x_train, data.y_train)]
        for epoch in range(start + 1, config.epochs + 1):
            _train_one_epoch(state, *tensors, batch_size=config.batch_size)
            metrics = evaluate_split(state.model, data, device)
            _check_converging(metrics, epoch, config)
            state.history.append({"epoch": float(epoch), **metrics})
            if on_epoch is not None and not on_epoch(epoch, metrics, state):
                return TrainOutcome(state.model, state.history, epoch < config.epochs, start)
    state.model.eval()  # a checkpoint with every epoch done trains nothing
    return TrainOutcome(state.model, state.history, stopped_early=False, resumed_from_epoch=start)


def _check_converging(metrics: dict[str, float], epoch: int, config: TrainModelConfig) -> None:
    """Raise FloatingPointError if the train or validation loss after ``epoch`` is not finite."""
    for name in ("train_loss", "val_loss"):
        value = metrics[name]
        if not math.isfinite(value):
            raise FloatingPointError(
                f"training diverged: {name} is {value} after epoch {epoch}/{config.epochs} "
                f"(learning_rate={config.learning_rate:g}, model={config.model}, "
                f"hidden_size={config.hidden_size}); try a lower learning_rate or check the data"
            )


def _train_one_epoch(
    state: TrainState, x: torch.Tensor, y: torch.Tensor, *, batch_size: int
) -> None:
    model, optimizer = state.model, state.optimizer
    model.train()
    loss_fn = nn.BCEWithLogitsLoss()
    order = torch.randperm(len(y), generator=state.generator).to(x.device)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x[batch]), y[batch])
        loss.backward()
        optimizer.step()


@torch.no_grad()
def _logits(model: nn.Module, x: npt.NDArray[np.float32], device: torch.device) -> torch.Tensor:
    model.eval()
    inputs = torch.from_numpy(x)
    starts = range(0, len(inputs), _EVAL_BATCH)
    parts = [model(inputs[i : i + _EVAL_BATCH].to(device)).cpu() for i in starts]
    return torch.cat(parts)


def evaluate_split(model: nn.Module, data: SplitData, device: torch.device) -> dict[str, float]:
    """Mean BCE loss (nats) and directional accuracy (0-1) on both parts, in eval mode.

    Returns:
        ``train_loss``, ``train_accuracy``, ``val_loss``, ``val_accuracy``.
    """
    metrics: dict[str, float] = {}
    for part, x, y in (("train", data.x_train, data.y_train), ("val", data.x_val, data.y_val)):
        logits, target = _logits(model, x, device), torch.from_numpy(y)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, target)
        metrics[f"{part}_loss"] = float(loss)
        metrics[f"{part}_accuracy"] = float(((logits > 0).float() == target).float().mean())
    return metrics


def baseline_metrics(
    y_train: npt.NDArray[np.float32], y_val: npt.NDArray[np.float32]
) -> dict[str, float]:
    """A model that knows only the training set's up-fraction ``p``.

    Loss is the BCE (nats) of always predicting probability ``p``; accuracy is that of always
    predicting the training set's majority direction.

    Args:
        y_train: training targets (0.0/1.0), shape (n_train,).
        y_val: validation targets (0.0/1.0), shape (n_val,).

    Returns:
        ``baseline_{train,val}_{loss,accuracy}``.
    """
    p = float(np.clip(y_train.mean(), _PROB_EPS, 1.0 - _PROB_EPS))
    majority = 1.0 if p >= 0.5 else 0.0
    metrics: dict[str, float] = {}
    for part, y in (("train", y_train), ("val", y_val)):
        bce = -np.mean(y * np.log(p) + (1.0 - y) * np.log(1.0 - p))
        metrics[f"baseline_{part}_loss"] = float(bce)
        metrics[f"baseline_{part}_accuracy"] = float(np.mean(y == majority))
    return metrics


def write_artifacts(
    artifact_dir: Path,
    outcome: TrainOutcome,
    data: SplitData,
    config: TrainModelConfig,
    metrics: dict[str, float],
) -> list[str]:
    """Write ``model.pt``, ``metrics.json`` and ``loss_curve.png`` into ``artifact_dir``.

    ``model.pt`` holds the state dict (on CPU), the config, the feature names and the training
    standardisation statistics (mean/std, shape (n_features,)) needed to score new bars.

    Returns:
        The file names written, relative to ``artifact_dir``.
    """
    state = {k: v.detach().cpu() for k, v in outcome.model.state_dict().items()}
    torch.save(
        {
            "state_dict": state,
            "config": config.model_dump(),
            "feature_names": list(FEATURE_NAMES),
            "feature_mean": torch.from_numpy(data.standardiser.mean.copy()),
            "feature_std": torch.from_numpy(data.standardiser.std.copy()),
        },
        artifact_dir / MODEL_FILE,
    )
    report = {
        "metrics": metrics,
        "metrics_of": "final_model",
        "stopped_early": outcome.stopped_early,
        "resumed_from_epoch": outcome.resumed_from_epoch,
        "history": outcome.history,
    }
    (artifact_dir / METRICS_FILE).write_text(json.dumps(report, indent=2) + "\n")
    plot_loss_curve(outcome.history, metrics["baseline_val_loss"], artifact_dir / LOSS_CURVE_FILE)
    return [MODEL_FILE, METRICS_FILE, LOSS_CURVE_FILE]


def plot_loss_curve(history: list[dict[str, float]], baseline_loss: float, path: Path) -> None:
    """Plot train/val BCE per epoch with the baseline's validation loss as a dashed line (PNG)."""
    # Figure without pyplot renders through Agg and leaves no global figure state behind.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(7, 4), dpi=100)
    axes = figure.add_subplot()
    epochs = [h["epoch"] for h in history]
    axes.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train")
    axes.plot(epochs, [h["val_loss"] for h in history], marker="o", label="validation")
    axes.axhline(baseline_loss, color="grey", linestyle="--", label="baseline (validation)")
    axes.set_xlabel("epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel("BCE loss (nats)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, format="png")


def load_split(config: TrainModelConfig) -> tuple[pd.DataFrame, SplitData]:
    """The configured bars and their standardised chronological split into samples.

    Raises:
        FileNotFoundError, ValueError: as :func:`.ohlcv.load_ohlcv` (no file, unusable bars).
    """
    bars = load_ohlcv(config.dataset)
    features = build_features(bars, config.feature_window)
    return bars, split_chronological(features, config.validation_fraction)


def fit_and_score(
    data: SplitData,
    config: TrainModelConfig,
    device: torch.device,
    on_epoch: EpochCallback | None = None,
    resume: Checkpoint | None = None,
) -> tuple[TrainOutcome, dict[str, float]]:
    """Train (:func:`train_classifier`) and measure the final model beside the baseline.

    The core of ``train_model`` without its task duties (checkpoints, MLflow, artifacts), so a
    hyper-parameter search can call it once per trial.

    Returns:
        The outcome and its metrics: the final model's ``train_loss``, ``train_accuracy``,
        ``val_loss`` and ``val_accuracy`` (:func:`evaluate_split`), the baseline's
        (:func:`baseline_metrics`), and ``n_train``/``n_val`` (samples).

    Raises:
        FloatingPointError: training diverged (see :func:`train_classifier`).
    """
    outcome = train_classifier(data, config, device, on_epoch, resume)
    metrics = {
        **outcome.final,
        **baseline_metrics(data.y_train, data.y_val),
        "n_train": float(len(data.y_train)),
        "n_val": float(len(data.y_val)),
    }
    return outcome, metrics


def run(config: TrainModelConfig, ctx: TaskContext) -> dict[str, Any]:
    """Train the configured model on the configured bars; the ``train_model`` entry point.

    A retry (same task, same config) resumes from the checkpoint at ``ctx.checkpoint_path``: the
    epochs it holds are not trained again, and a new MLflow run (tagged ``tp.attempt`` and
    ``tp.resumed_from_epoch``) logs the new epochs only, at their own epoch numbers. A checkpoint
    of another config, or one that cannot be used, is ignored (warning ``checkpoint_ignored``).

    Returns:
        JSON-serialisable result: ``metrics`` (final model and baseline, see
        :func:`evaluate_split` and :func:`baseline_metrics`, plus ``n_train``/``n_val``),
        ``artifacts`` (file names in ``ctx.artifact_dir``), ``mlflow_run_id``, ``device``,
        ``dataset`` (name, bars, first/last bar ISO time), ``epochs_run`` (all epochs in the
        history, resumed ones included), ``resumed_from_epoch`` (0 for a fresh start),
        ``epochs_trained_this_attempt``, ``stopped_early``.

    Raises:
        RuntimeError: ``cuda`` requested without CUDA.
        FileNotFoundError: the dataset file does not exist.
        ValueError: the bars are unusable (missing columns, too few bars, bad or infinite
            values).
        FloatingPointError: training diverged (a loss became NaN or infinite); the MLflow run
            ends FAILED and no metrics are reported.
    """
    device = resolve_device(config.device)
    bars, data = load_split(config)
    cpu = torch.device("cpu")
    resume = load_checkpoint(
        ctx.checkpoint_path, config, lambda: new_train_state(config, data.n_features, cpu)
    )
    tags = {"tp.device": device.type, "tp.resumed_from_epoch": str(resume.epoch if resume else 0)}
    with mlflow_run(ctx, EXPERIMENT_NAME, tags) as recorder:
        recorder.log_params(config.model_dump())
        hook = _epoch_hook(config, ctx, recorder)
        outcome, metrics = fit_and_score(data, config, device, hook, resume)
        artifacts = write_artifacts(ctx.artifact_dir, outcome, data, config, metrics)
        recorder.log_metrics({k: v for k, v in metrics.items() if k not in outcome.final}, step=0)
        recorder.log_artifacts([ctx.artifact_dir / name for name in artifacts])
        if outcome.stopped_early:
            recorder.status = "KILLED"
    return {
        "metrics": metrics,
        "artifacts": artifacts,
        "mlflow_run_id": recorder.run_id,
        "device": device.type,
        "dataset": {
            "name": config.dataset,
            "bars": len(bars),
            "start": bars.index[0].isoformat(),
            "end": bars.index[-1].isoformat(),
        },
        "epochs_run": len(outcome.history),
        "resumed_from_epoch": outcome.resumed_from_epoch,
        "epochs_trained_this_attempt": outcome.epochs_trained,
        "stopped_early": outcome.stopped_early,
    }


def _epoch_hook(
    config: TrainModelConfig, ctx: TaskContext, recorder: MlflowRecorder
) -> EpochCallback:
    def on_epoch(epoch: int, metrics: dict[str, float], state: TrainState) -> bool:
        # Checkpoint first: progress then never claims an epoch a retry would train again.
        save_checkpoint(ctx.checkpoint_path, state, config)
        ctx.checkpoint_saved()
        ctx.report_progress(epoch / config.epochs, f"epoch {epoch}/{config.epochs}", metrics)
        recorder.log_metrics(metrics, step=epoch)
        return not ctx.should_stop()

    return on_epoch
