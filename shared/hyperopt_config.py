"""Config of ``hyperopt`` (an Optuna study over a target task type) and of its trial tasks.

Importable without torch or Optuna, like every config model: the CLI and the scheduler refuse a
bad study before anything is queued, naming the field (``search_space``: an unknown parameter, a
range with ``low >= high``, a bound the target would refuse; ``metric``: not a result of the
target; ``target``: not a task type that can be searched). Registered in the task-type registry
from here, as ``backtest`` is: ``shared/task_types.py`` imports this module on its last lines,
after ``TaskConfig``, ``TaskType`` and ``TASK_TYPES`` exist, so either module may be imported
first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from shared.constants import ROUTE_GPU
from shared.messages import TASK_ID_PATTERN
from shared.task_types import TASK_TYPES, TaskConfig, TaskType

#: Target task types a study can search, with the result metrics it may optimise (names as in
#: each target's ``result["metrics"]``; a backtest's are ``backtest_report.METRICS``, which a test
#: compares with this list). train_model's are reported after every epoch too, which is what the
#: median pruner compares; a backtest reports its statistics once, at the end.
TARGET_METRICS: dict[str, tuple[str, ...]] = {
    "train_model": ("val_loss", "val_accuracy", "train_loss", "train_accuracy"),
    "backtest": (
        "sharpe_ratio",
        "sortino_ratio",
        "calmar_ratio",
        "return_pct",
        "return_ann_pct",
        "cagr_pct",
        "volatility_ann_pct",
        "max_drawdown_pct",
        "max_drawdown_duration_days",
        "win_rate_pct",
        "profit_factor",
        "n_trades",
        "exposure_time_pct",
        "equity_final",
    ),
}
#: Targets whose metrics are reported per epoch, so trials can be pruned early.
PRUNABLE_TARGETS = ("train_model",)

#: Sampled values of one parameter: JSON scalars.
Choice = bool | int | float | str


def _invalid(reason: str) -> PydanticCustomError:
    """A validation error whose message is ``reason`` as is (no ``Value error,`` prefix)."""
    return PydanticCustomError("hyperopt_config", "{reason}", {"reason": reason})


class ParamSpec(BaseModel):
    """One searched parameter: a float or int range, or a list of choices.

    Attributes:
        type: ``float`` (``trial.suggest_float``), ``int`` (``suggest_int``) or
            ``categorical`` (``suggest_categorical``).
        low, high: the range, both included; ``low < high``. Required for float and int.
        log: sample on a log scale (``low > 0``; no ``step``).
        step: sample on a grid ``low, low + step, ...`` (float: discretised; int: default 1).
        choices: the values of a categorical parameter (at least one).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    type: Literal["float", "int", "categorical"]
    low: int | float | None = None
    high: int | float | None = None
    log: bool = False
    step: float | None = Field(None, gt=0)
    choices: list[Choice] | None = Field(None, min_length=1, max_length=1000)

    @model_validator(mode="after")
    def _check_shape(self) -> ParamSpec:
        if self.type == "categorical":
            if self.choices is None:
                raise _invalid("a categorical parameter needs choices")
            if self.low is not None or self.high is not None or self.log or self.step is not None:
                raise _invalid("a categorical parameter takes choices only (no low/high/log/step)")
            return self
        if self.choices is not None:
            raise _invalid(f"choices are for categorical parameters, not {self.type}")
        if self.low is None or self.high is None:
            raise _invalid(f"a {self.type} parameter needs low and high")
        if self.low >= self.high:
            raise _invalid(f"low ({self.low:g}) must be below high ({self.high:g})")
        if self.log and self.low <= 0:
            raise _invalid(f"log scale needs low > 0 (got {self.low:g})")
        if self.log and self.step is not None:
            raise _invalid("log and step cannot be combined")
        if self.type == "int":
            for name, value in (("low", self.low), ("high", self.high), ("step", self.step)):
                if value is not None and not float(value).is_integer():
                    raise _invalid(f"{name} of an int parameter must be a whole number")
        return self

    def bounds(self) -> list[Choice]:
        """The values the target must accept: the choices, or the two ends of the range."""
        if self.choices is not None:
            return list(self.choices)
        ends = [self.low, self.high]
        if self.type == "int":
            return [int(v) for v in ends if v is not None]
        return [float(v) for v in ends if v is not None]

    def to_optuna(self) -> dict[str, Any]:
        """Keyword arguments of the matching ``trial.suggest_*`` call (without the name)."""
        if self.choices is not None:
            return {"choices": list(self.choices)}
        if self.type == "int":
            step = 1 if self.step is None else int(self.step)
            return {"low": int(self.low or 0), "high": int(self.high or 0), "step": step}
        return {"low": self.low, "high": self.high, "log": self.log, "step": self.step}


class HyperoptConfig(TaskConfig):
    """Config of ``hyperopt``: an Optuna study over the config of ``train_model`` or a backtest.

    Each trial runs the target in-process with ``base_config`` updated by the trial's sampled
    parameters and reports the target's ``metric``. ``parallel: N`` runs N trials at once: the
    hyperopt task itself plus N - 1 ``hyperopt_trial`` tasks on the worker pool, all sharing one
    study in Redis (Optuna's journal storage). The study ends with exactly ``n_trials`` trials
    counted (complete, pruned, or failed by their own error; a trial lost with its worker is run
    again and not counted).

    Attributes:
        target: the task type searched (``train_model`` or ``backtest``).
        base_config: the target's config that every trial starts from (validated against it).
        search_space: parameter name (a field of the target's config) -> its range or choices.
        metric: the target's result metric to optimise (``val_loss``, ``sharpe_ratio``...).
        direction: ``minimize`` or ``maximize`` it.
        n_trials: trials the study runs in all (1-10,000).
        parallel: trials run at once (1-64); more than ``n_trials`` is trimmed to it.
        pruner: ``median`` stops a trial whose per-epoch metric is worse than the median of
            earlier trials at the same epoch (train_model only); ``none`` never prunes.
        seed: seed of the TPE sampler; with ``parallel: 1`` a study is reproducible from it.
    """

    target: str = Field(min_length=1)
    base_config: dict[str, Any] = Field(default_factory=dict)
    search_space: dict[str, ParamSpec] = Field(min_length=1, max_length=100)
    metric: str = Field(min_length=1)
    direction: Literal["minimize", "maximize"] = "minimize"
    n_trials: int = Field(ge=1, le=10_000)
    parallel: int = Field(1, ge=1, le=64)
    pruner: Literal["none", "median"] = "none"
    seed: int | None = Field(None, ge=0, le=2**32 - 1)

    @field_validator("target")
    @classmethod
    def _check_target(cls, value: str) -> str:
        known = sorted(t for t in TARGET_METRICS if t in TASK_TYPES)
        if value not in known:
            raise _invalid(
                f"unknown target task type {value!r} (a study can search: {', '.join(known)})"
            )
        return value

    @field_validator("base_config")
    @classmethod
    def _check_base_config(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        target = info.data.get("target")
        if target is None:  # the target itself was refused; that error says why
            return value
        return _validate_target(target, value, f"invalid {target} config")

    @field_validator("search_space")
    @classmethod
    def _check_search_space(
        cls, value: dict[str, ParamSpec], info: ValidationInfo
    ) -> dict[str, ParamSpec]:
        target, base = info.data.get("target"), info.data.get("base_config")
        if target is None or base is None:
            return value
        fields = _target_fields(target)
        for name, spec in value.items():
            if name not in fields:
                raise _invalid(
                    f"{name}: unknown parameter of {target} (known: {', '.join(sorted(fields))})"
                )
            for bound in spec.bounds():
                # Only the parameter's own field is judged: a bound that clashes with another
                # field (fast_window above the base's slow_window) may suit other trials.
                errors = _target_errors(target, {**base, name: bound})
                own = [msg for loc, msg in errors if loc.split(".")[0] == name]
                if own:
                    raise _invalid(f"{name} = {bound!r}: {'; '.join(own)}")
        return value

    @field_validator("metric")
    @classmethod
    def _check_metric(cls, value: str, info: ValidationInfo) -> str:
        target = info.data.get("target")
        if target is not None and value not in TARGET_METRICS[target]:
            known = ", ".join(TARGET_METRICS[target])
            raise _invalid(f"unknown metric {value!r} of {target} (known: {known})")
        return value

    @field_validator("pruner")
    @classmethod
    def _check_pruner(cls, value: str, info: ValidationInfo) -> str:
        target = info.data.get("target")
        if value != "none" and target is not None and target not in PRUNABLE_TARGETS:
            raise _invalid(f"{target} reports no per-epoch metric to prune on; use none")
        return value

    @property
    def runners(self) -> int:
        """Trials run at once: ``parallel``, but never more than ``n_trials``."""
        return min(self.parallel, self.n_trials)

    def trial_config(self, params: dict[str, Any]) -> dict[str, Any]:
        """The target's config of one trial: ``base_config`` updated with ``params``."""
        return {**self.base_config, **params}

    def target_route(self) -> str:
        """The queue the target would run on with ``base_config``: where the study runs too."""
        from shared.task_types import route_of

        return route_of(self.target, self.base_config)


class HyperoptTrialConfig(TaskConfig):
    """Config of ``hyperopt_trial``: one more runner of trials of a running ``hyperopt`` task.

    Submitted by the hyperopt task itself (``parallel`` > 1), never by hand.

    Attributes:
        parent_task_id: the hyperopt task whose study it works on.
        runner: its number among the study's runners (the hyperopt task is 0).
        study: the hyperopt task's config.
    """

    parent_task_id: str = Field(pattern=TASK_ID_PATTERN)
    runner: int = Field(ge=1, le=63)
    study: HyperoptConfig

    def target_route(self) -> str:
        """The queue of the study's target (see ``HyperoptConfig.target_route``)."""
        return self.study.target_route()


@dataclass(frozen=True)
class HyperoptTaskType(TaskType):
    """``hyperopt`` and ``hyperopt_trial``: routed where their target would run.

    A study over ``train_model`` runs its trials on the gpu queue, one over a backtest on the cpu
    queue (or gpu when its base config asks for it), so each trial gets the hardware the target
    would have had.
    """

    def route_for(self, config: TaskConfig) -> str:
        """The target's route for the study's base config (``HyperoptConfig.target_route``)."""
        if isinstance(config, HyperoptConfig | HyperoptTrialConfig):
            return config.target_route()
        return self.route


def study_key_prefix(namespace: str, parent_task_id: str) -> str:
    """Redis key prefix of a study's journal: ``<ns>:hyperopt:<task id>``.

    Under the namespace, so ``shared.admin.delete_namespace`` removes a study with the rest.
    """
    return f"{namespace}:hyperopt:{parent_task_id}"


def _target_fields(target: str) -> set[str]:
    from shared.task_types import get_task_type

    return set(get_task_type(target).config_model.model_fields)


def _target_errors(target: str, config: dict[str, Any]) -> list[tuple[str, str]]:
    """``(field, message)`` of each error the target's model finds in ``config`` (none: [])."""
    from shared.errors import TaskConfigError
    from shared.task_types import validate_config

    try:
        validate_config(target, config)
    except TaskConfigError as e:
        return list(e.fields.get("errors", []))
    return []


def _validate_target(target: str, config: dict[str, Any], what: str) -> dict[str, Any]:
    """``config`` validated by the target's model (defaults filled in), or a named refusal."""
    from shared.task_types import validate_config

    errors = _target_errors(target, config)
    if errors:
        raise _invalid(f"{what}: " + "; ".join(f"{loc}: {msg}" for loc, msg in errors))
    return validate_config(target, config).model_dump(mode="json")


TASK_TYPES["hyperopt"] = HyperoptTaskType("hyperopt", HyperoptConfig, ROUTE_GPU)
TASK_TYPES["hyperopt_trial"] = HyperoptTaskType("hyperopt_trial", HyperoptTrialConfig, ROUTE_GPU)
