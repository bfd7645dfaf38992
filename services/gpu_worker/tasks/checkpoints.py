"""Resumable ``train_model`` checkpoints: the training state plus every RNG, tied to one config.

A checkpoint holds what continuing needs to end exactly where an uninterrupted run would: model
and optimiser state, the per-epoch history so far and the state of every random number generator
training draws from (torch CPU and CUDA for initialisation and dropout, the batch-shuffling
generator, numpy's and Python's global ones). It records the SHA-256 of the task config; a
checkpoint written for another config, of another format, unreadable (e.g. truncated) or not
fitting the model is ignored with a ``checkpoint_ignored`` warning, never raised.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from torch import nn

from shared.task_types import TrainModelConfig

log = structlog.get_logger(__name__)

#: Layout version; a checkpoint of another format (or none: written before resuming existed) is
#: ignored.
FORMAT = 2


@dataclass
class TrainState:
    """What training changes from epoch to epoch, apart from the global RNGs.

    Attributes:
        model: the model being trained.
        optimizer: its optimiser.
        generator: the generator that shuffles the training batches.
        history: one entry per epoch done: ``epoch`` plus train/val loss and accuracy.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    history: list[dict[str, float]]

    @property
    def epoch(self) -> int:
        """Epochs done so far (0 before the first)."""
        return len(self.history)


def config_fingerprint(config: TrainModelConfig) -> str:
    """SHA-256 (hex) of the config's JSON: the same for equal configs, different otherwise."""
    return hashlib.sha256(config.model_dump_json().encode()).hexdigest()


def save_checkpoint(path: Path, state: TrainState, config: TrainModelConfig) -> None:
    """Write ``state`` and the global RNG states atomically (temp file + rename).

    Call it between epochs: the RNG states saved are the ones the next epoch starts from.

    Args:
        path: the checkpoint file (its folder is created if missing).
        state: the training state after its last epoch.
        config: the task config the state belongs to (its fingerprint is stored).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(path.name + ".tmp")
    payload = {
        "format": FORMAT,
        "config_sha256": config_fingerprint(config),
        "config": config.model_dump(),
        "epoch": state.epoch,
        "history": state.history,
        "model_state": state.model.state_dict(),
        "optimizer_state": state.optimizer.state_dict(),
        "rng": {"shuffle": state.generator.get_state(), **_global_rng_states(state.model)},
    }
    torch.save(payload, temp)
    temp.replace(path)


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read back for the current config and checked to fit its model.

    Attributes:
        path: where it was read from.
        payload: what :func:`save_checkpoint` wrote (tensors on CPU).
    """

    path: Path
    payload: dict[str, Any]

    @property
    def epoch(self) -> int:
        """Epochs the checkpoint has done (1-based number of the last one)."""
        return int(self.payload["epoch"])

    def restore(self, state: TrainState) -> None:
        """Load model, optimiser, history and shuffling state into ``state``; set the global RNGs.

        Call it inside the seeded, deterministic section, after building ``state``: the global
        RNGs end where they were when the checkpoint was saved.
        """
        _restore_objects(self.payload, state)
        _set_global_rng_states(self.payload["rng"])


def load_checkpoint(
    path: Path, config: TrainModelConfig, new_state: Callable[[], TrainState]
) -> Checkpoint | None:
    """The checkpoint at ``path`` if it was written for ``config`` and fits its model, else None.

    A missing file means a fresh start. Any other reason not to resume (another config, another
    format, an unreadable or truncated file, a state that does not fit the model) is logged as a
    ``checkpoint_ignored`` warning with the reason and gives None: the task then starts over.

    Args:
        path: the task's checkpoint file.
        config: the config of the attempt about to run.
        new_state: builds a fresh training state (on CPU) the saved one is tried on, so that
            :meth:`Checkpoint.restore` cannot fail half-way later.
    """
    if not path.exists():
        return None
    payload, reason = _read(path)
    if reason is None:
        reason = _mismatch(payload, config)
    if reason is None:
        try:
            _restore_objects(payload, new_state())
            _check_global_rng_states(payload["rng"])
        except Exception as e:  # anything wrong in the file means "start over"
            reason = f"does not fit the model ({type(e).__name__}: {e})"
    if reason is not None:
        log.warning("checkpoint_ignored", path=str(path), reason=reason[:500])
        return None
    log.info("checkpoint_found", path=str(path), epoch=payload["epoch"])
    return Checkpoint(path, payload)


def _read(path: Path) -> tuple[Any, str | None]:
    """``(payload, None)``, or ``(None, why it cannot be read)`` (truncated, not torch, ...)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True), None
    except Exception as e:  # a file left by a lost worker can fail in any way torch.load can
        return None, f"unreadable ({type(e).__name__}: {e})"


def _mismatch(payload: Any, config: TrainModelConfig) -> str | None:
    """Why ``payload`` is not a checkpoint of ``config`` to resume from; None if it is."""
    if not isinstance(payload, dict):
        return f"not a checkpoint (a {type(payload).__name__})"
    if payload.get("format") != FORMAT:
        return f"format {payload.get('format')!r}, expected {FORMAT}"
    if payload.get("config_sha256") != config_fingerprint(config):
        return "written for another config"
    epoch, history = payload.get("epoch"), payload.get("history")
    if not isinstance(epoch, int) or not 1 <= epoch <= config.epochs:
        return f"epoch {epoch!r} outside 1-{config.epochs}"
    if not isinstance(history, list) or len(history) != epoch:
        return f"history does not have {epoch} epochs"
    return None


def _restore_objects(payload: dict[str, Any], state: TrainState) -> None:
    """Load the saved model, optimiser, shuffling generator and history into ``state``."""
    state.model.load_state_dict(payload["model_state"])
    state.optimizer.load_state_dict(payload["optimizer_state"])
    state.generator.set_state(payload["rng"]["shuffle"])
    state.history[:] = [{str(k): float(v) for k, v in h.items()} for h in payload["history"]]


def _global_rng_states(model: nn.Module) -> dict[str, Any]:
    # CUDA only when training on it: asking would initialise CUDA in a CPU run on a GPU machine.
    on_cuda = any(p.is_cuda for p in model.parameters())
    cuda = torch.cuda.get_rng_state_all() if on_cuda else []
    numpy_state: Any = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "numpy": {
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "python": random.getstate(),
    }


def _numpy_state(saved: dict[str, Any]) -> dict[str, Any]:
    """The saved numpy state in the form ``np.random.set_state`` takes."""
    key = saved["key"].numpy().astype(np.uint32)
    return {
        "bit_generator": "MT19937",
        "state": {"key": key, "pos": int(saved["pos"])},
        "has_gauss": int(saved["has_gauss"]),
        "gauss": float(saved["gauss"]),
    }


def _check_global_rng_states(rng: dict[str, Any]) -> None:
    """Raise if a saved global RNG state is malformed, by setting it on throwaway generators."""
    torch.Generator().set_state(rng["torch"])
    if not isinstance(rng["cuda"], list):
        raise TypeError("CUDA RNG states are not a list")
    np.random.RandomState().set_state(_numpy_state(rng["numpy"]))
    random.Random().setstate(rng["python"])


def _set_global_rng_states(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    cuda = rng["cuda"]
    # Resuming on another kind or number of GPUs cannot repeat the run bit for bit anyway.
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    np.random.set_state(_numpy_state(rng["numpy"]))
    random.setstate(rng["python"])
