"""Task types the platform knows: their config models and the queue each is routed to.

Config models live here, not with the task code, so the CLI and the scheduler validate a config
without importing torch. The task code (``services/gpu_worker/tasks/<type>.py``) imports its model
from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared.constants import ROUTE_CPU, ROUTE_GPU
from shared.errors import TaskConfigError, UnknownTaskTypeError

#: OHLCV samples the ``backtesting`` package ships (``backtesting.test``).
BUNDLED_DATASETS = ("GOOG", "EURUSD", "BTCUSD")


def check_dataset(value: str) -> str:
    """A dataset name as configs take it: a bundled sample (upper-cased) or a CSV/Parquet path.

    Raises:
        ValueError: neither (pydantic names the field).
    """
    if value.upper() in BUNDLED_DATASETS:
        return value.upper()
    if not value.lower().endswith((".csv", ".parquet", ".pq")):
        raise ValueError(f"must be one of {', '.join(BUNDLED_DATASETS)} or a .csv/.parquet path")
    return value


class TaskConfig(BaseModel):
    """Base of task configs: unknown keys are refused, so a typo names its field."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class TrainModelConfig(TaskConfig):
    """Config of ``train_model``: a PyTorch model predicting the next bar's direction.

    ``dataset`` is a bundled sample name (``GOOG`` daily 2004-2013, ``EURUSD`` hourly 2017-2018,
    ``BTCUSD`` monthly) or a path on the desktop to a CSV/Parquet file with Open, High, Low, Close,
    Volume columns and a date index/column.
    """

    dataset: str = Field("GOOG", min_length=1)
    feature_window: int = Field(16, ge=2, le=512, description="Bars of history per sample.")
    model: Literal["mlp", "lstm"] = "mlp"
    hidden_size: int = Field(64, ge=4, le=4096)
    num_layers: int = Field(2, ge=1, le=8)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    epochs: int = Field(20, ge=1, le=10_000)
    batch_size: int = Field(64, ge=1, le=65_536)
    learning_rate: float = Field(1e-3, gt=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    validation_fraction: float = Field(0.2, ge=0.05, le=0.5)
    seed: int = Field(42, ge=0)
    device: Literal["auto", "cuda", "cpu"] = "auto"

    @field_validator("dataset")
    @classmethod
    def _check_dataset(cls, value: str) -> str:
        return check_dataset(value)


class ProbeConfig(TaskConfig):
    """Config of ``probe``: a task that does nothing heavy, for health checks, tests and benchmarks.

    It sleeps ``sleep_s`` in ``steps`` steps (reporting progress after each and checkpointing the
    step count, so a retried probe resumes where it was; with ``report_steps`` off it sleeps
    once and does neither: a plain no-op, as ``bench.dispatch`` compares with Celery), then
    raises ``fail_with`` if set (on the first ``fail_times`` attempts only, when that is > 0; a
    ``RetryableTaskError`` if ``retryable``, else ``RuntimeError``), or kills its own process
    with SIGKILL if ``crash``.
    ``ignore_sigterm`` makes it ignore SIGTERM and stop requests (to test forced cancels).
    Before its steps it prints ``print_lines`` lines to stdout, one every ``print_every_s``, each
    with the wall-clock time it was printed (``ts=<Unix s>``), then one line to stderr and one log
    record (to test live logs). ``fork_sleeper_s`` first forks a process that sleeps that long
    (to test what a task leaves behind when its process dies).
    """

    sleep_s: float = Field(0.0, ge=0.0, le=24 * 3600)
    steps: int = Field(1, ge=1, le=100_000)
    fail_with: str | None = Field(None, max_length=1000)
    fail_times: int = Field(0, ge=0, le=100)
    retryable: bool = False
    crash: bool = False
    ignore_sigterm: bool = False
    needs_gpu: bool = Field(False, description="Route to the gpu queue instead of cpu.")
    print_lines: int = Field(0, ge=0, le=1_000_000)
    print_every_s: float = Field(0.0, ge=0.0, le=3600)
    report_steps: bool = Field(
        True, description="Report progress and checkpoint after each step; false: sleep once."
    )
    fork_sleeper_s: float = Field(
        0.0,
        ge=0.0,
        le=3600,
        description="First fork a process of its own that sleeps this long (tests: leftovers).",
    )


@dataclass(frozen=True)
class TaskType:
    """A task type: its name, config model and default queue route (``gpu`` or ``cpu``)."""

    name: str
    config_model: type[TaskConfig]
    route: str

    def route_for(self, config: TaskConfig) -> str:
        """Queue route for this config: the type's route, unless a probe asks for the GPU."""
        if isinstance(config, ProbeConfig):
            return ROUTE_GPU if config.needs_gpu else ROUTE_CPU
        return self.route


TASK_TYPES: dict[str, TaskType] = {
    "train_model": TaskType("train_model", TrainModelConfig, ROUTE_GPU),
    "probe": TaskType("probe", ProbeConfig, ROUTE_CPU),
}


def get_task_type(name: str) -> TaskType:
    """The registered type called ``name``.

    Raises:
        UnknownTaskTypeError: not registered (the message lists the known types).
    """
    try:
        return TASK_TYPES[name]
    except KeyError:
        known = ", ".join(sorted(TASK_TYPES))
        raise UnknownTaskTypeError(
            f"unknown task type {name!r} (known: {known})", task_type=name
        ) from None


def route_of(task_type: str, config: dict[str, Any]) -> str:
    """The queue route (``gpu``/``cpu``) a task of this type and config goes to.

    Raises:
        UnknownTaskTypeError, TaskConfigError: as ``validate_config``.
    """
    return get_task_type(task_type).route_for(validate_config(task_type, config))


def validate_config(task_type: str, config: dict[str, Any]) -> TaskConfig:
    """Validate ``config`` for ``task_type`` and return the parsed model (defaults filled in).

    Raises:
        UnknownTaskTypeError: the type is not registered.
        TaskConfigError: a field is invalid; the message names each field, e.g.
            ``invalid train_model config: epochs: Input should be greater than or equal to 1``.
    """
    model = get_task_type(task_type).config_model
    try:
        return model.model_validate(config)
    except ValidationError as e:
        errors = [(".".join(str(p) for p in err["loc"]), err["msg"]) for err in e.errors()]
        detail = "; ".join(f"{loc}: {msg}" for loc, msg in errors)
        raise TaskConfigError(f"invalid {task_type} config: {detail}", errors=errors) from e


import shared.backtest_config  # noqa: E402 - last: it registers "backtest" from there
import shared.hyperopt_config  # noqa: E402, F401 - registers "hyperopt", "hyperopt_trial"
