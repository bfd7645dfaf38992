"""Pipelines: a small YAML file of steps, each a task that may depend on earlier ones.

    name: goog-nightly
    steps:
      - name: search
        type: hyperopt
        config: {...}
      - name: train
        type: train_model
        config_from: {search: best_params}      # merge the parent's result.best_params
        config: {dataset: GOOG, epochs: 20}
      - name: backtest
        type: backtest
        config:
          model_task: ${steps.train.task_id}    # a parent's id
          cash: ${steps.search.result.cash}     # or any value of a parent's result

A step depends on the steps it names in ``depends_on``, ``config_from`` and ``${steps.NAME...}``
references (a reference is the whole value of a field; the field takes the referenced value's
JSON type). ``load_pipeline`` refuses, naming the field, anything that cannot run: unknown keys,
an unknown or duplicate step, a cycle, a reference that is not one, a config invalid apart from
its referenced fields. ``plan`` orders the steps parents first; ``DistributedClient
.submit_pipeline`` submits them in that order, each task holding its parents' ids.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.constants import DEFAULT_PRIORITY, MAX_PRIORITY
from shared.errors import PipelineError, TaskError
from shared.messages import MAX_DEPENDENCIES, ConfigRef, describe_validation_error
from shared.references import validate_with_refs

STEP_NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]{0,63}$"
PIPELINE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"

#: ``${steps.NAME.task_id}``, ``${steps.NAME.result}``, ``${steps.NAME.result.a.b}``.
REFERENCE = re.compile(
    r"^\$\{\s*steps\.(?P<step>[A-Za-z][A-Za-z0-9_-]*)\."
    r"(?P<source>task_id|result(?:\.[A-Za-z0-9_-]+)*)\s*\}$"
)
_CONFIG_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


class PipelineStep(BaseModel):
    """One step: a task type, its config, and where its inputs come from."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=STEP_NAME_PATTERN)
    type: str = Field(min_length=1)
    config: dict[str, Any] = Field(default_factory=dict)
    #: Step name -> path in that step's result (``best_params`` or ``result.best_params``) of
    #: a mapping merged into this step's config once it completed.
    config_from: dict[str, str] = Field(default_factory=dict)
    depends_on: list[str] = Field(default_factory=list)
    priority: int = Field(DEFAULT_PRIORITY, ge=0, le=MAX_PRIORITY)
    time_limit_s: float | None = Field(None, gt=0)
    max_attempts: int | None = Field(None, ge=1, le=100)


class Pipeline(BaseModel):
    """A pipeline file."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("pipeline", pattern=PIPELINE_NAME_PATTERN)
    steps: list[PipelineStep] = Field(min_length=1, max_length=MAX_DEPENDENCIES)


@dataclass(frozen=True)
class StepRef:
    """A config value of one step taken from another (a ``ConfigRef`` by step name)."""

    target: str
    step: str
    source: str
    merge: bool = False

    def bind(self, task_ids: Mapping[str, str]) -> ConfigRef:
        """The ``ConfigRef`` once every step has a task id."""
        return ConfigRef(
            target=self.target, task_id=task_ids[self.step], source=self.source, merge=self.merge
        )


@dataclass(frozen=True)
class PlannedStep:
    """A step ready to submit: its parents (step names) and references."""

    step: PipelineStep
    parents: list[str]
    refs: list[StepRef] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The step's name."""
        return self.step.name


#: Longest pipeline document read (characters): a pipeline is a page of YAML, not a data set.
MAX_PIPELINE_CHARS = 1_000_000


def load_pipeline(path: Path) -> Pipeline:
    """Read and check a pipeline file (YAML, ``safe_load``).

    Raises:
        PipelineError: unreadable, not YAML, or refused by ``parse_pipeline``.
    """
    try:
        text = path.read_text()
    except OSError as e:
        raise PipelineError(f"cannot read pipeline {path}: {e}") from e
    return parse_pipeline(text, source=str(path))


def _refuse_aliases(text: str, source: str) -> None:
    """Refuse YAML aliases, which a pipeline never needs.

    A few nested ones expand into billions of nodes (a "YAML bomb").

    Raises:
        PipelineError: the document uses an alias (``*name``).
        yaml.YAMLError: not YAML.
    """
    for token in yaml.scan(text, Loader=yaml.SafeLoader):
        if isinstance(token, yaml.AliasToken):
            raise PipelineError(f"{source}: YAML aliases (*{token.value}) are not allowed")


def parse_pipeline(text: str, *, source: str = "pipeline") -> Pipeline:
    """Parse and check a pipeline document (see the module docstring).

    Raises:
        PipelineError: the message names the field (``steps.train.depends_on: unknown step
            'serch'``, ``steps: cycle a -> b -> a``).
    """
    if len(text) > MAX_PIPELINE_CHARS:
        raise PipelineError(f"{source} is over {MAX_PIPELINE_CHARS} characters")
    try:
        _refuse_aliases(text, source)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PipelineError(f"{source} is not valid YAML: {e}") from e
    except RecursionError as e:
        raise PipelineError(f"{source} is nested too deeply") from e
    if not isinstance(data, dict):
        raise PipelineError(f"{source} must be a mapping with 'steps'")
    try:
        pipeline = Pipeline.model_validate(data)
    except ValidationError as e:
        raise PipelineError(f"invalid pipeline: {describe_validation_error(e)}") from e
    plan(pipeline)
    return pipeline


def plan(pipeline: Pipeline) -> list[PlannedStep]:
    """The steps with their parents and references, parents before children.

    Raises:
        PipelineError: a duplicate or unknown step, a bad reference, a cycle, or an invalid
            config; the message names the field.
    """
    names = [s.name for s in pipeline.steps]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise PipelineError(f"steps: duplicate step name {', '.join(map(repr, duplicates))}")
    planned = {s.name: _plan_step(s, set(names)) for s in pipeline.steps}
    order = _topological(planned)
    for p in order:
        _check_config(p)
    return order


def _plan_step(step: PipelineStep, known: set[str]) -> PlannedStep:
    where = f"steps.{step.name}"
    refs = list(_config_refs(step.config, where))
    for name, path in step.config_from.items():
        source = path if path == "result" or path.startswith("result.") else f"result.{path}"
        if not re.fullmatch(r"result(\.[A-Za-z0-9_-]+)*", source):
            raise PipelineError(f"{where}.config_from.{name}: bad result path {path!r}")
        refs.append(StepRef("", name, source, merge=True))
    parents = list(step.depends_on)
    parents += [r.step for r in refs]
    for i, parent in enumerate(step.depends_on):
        if parent not in known:
            raise PipelineError(f"{where}.depends_on.{i}: unknown step {parent!r}")
    for name in step.config_from:
        if name not in known:
            raise PipelineError(f"{where}.config_from.{name}: unknown step {name!r}")
    for ref in refs:
        if ref.step not in known:
            raise PipelineError(f"{where}.config.{ref.target}: unknown step {ref.step!r}")
    if step.name in parents:
        raise PipelineError(f"{where}: a step cannot depend on itself")
    return PlannedStep(step, list(dict.fromkeys(parents)), refs)


def _config_refs(config: Any, where: str, path: tuple[str, ...] = ()) -> Iterator[StepRef]:
    """Every ``${steps...}`` reference in ``config``, with the dotted path it sits at."""
    if isinstance(config, dict):
        for key, value in config.items():
            yield from _config_refs(value, where, (*path, str(key)))
    elif isinstance(config, list):
        for i, value in enumerate(config):
            if any(True for _ in _config_refs(value, where, (*path, str(i)))):
                raise PipelineError(
                    f"{where}.config.{'.'.join((*path, str(i)))}: references inside lists are "
                    "not supported; reference the whole list"
                )
    elif isinstance(config, str) and "${" in config:
        dotted = ".".join(path)
        match = REFERENCE.match(config)
        if match is None:
            raise PipelineError(
                f"{where}.config.{dotted}: {config!r} is not a reference; write the whole value "
                "as ${steps.NAME.task_id} or ${steps.NAME.result.KEY}"
            )
        if not all(_CONFIG_KEY.match(p) for p in path):
            raise PipelineError(f"{where}.config.{dotted}: field names must be [A-Za-z0-9_-]")
        yield StepRef(dotted, match["step"], match["source"])


def _topological(planned: dict[str, PlannedStep]) -> list[PlannedStep]:
    """Kahn's algorithm, keeping the file's order among ready steps; a cycle is named."""
    waiting = {name: set(p.parents) for name, p in planned.items()}
    order: list[PlannedStep] = []
    while waiting:
        ready = [name for name, parents in waiting.items() if not parents]
        if not ready:
            raise PipelineError(f"steps: cycle {' -> '.join(_find_cycle(waiting))}")
        for name in ready:
            order.append(planned[name])
            del waiting[name]
        for parents in waiting.values():
            parents.difference_update(ready)
    return order


def _find_cycle(waiting: dict[str, set[str]]) -> list[str]:
    """One cycle among steps that all wait on each other: ``[a, b, a]``."""
    start = min(waiting)
    path = [start]
    while True:
        following = min(waiting[path[-1]])
        if following in path:
            return [*path[path.index(following) :], following]
        path.append(following)


def _check_config(p: PlannedStep) -> None:
    refs = [r.bind({r.step: "placeholder"}) for r in p.refs]
    try:
        validate_with_refs(p.step.type, p.step.config, refs)
    except TaskError as e:
        raise PipelineError(f"steps.{p.name}.config: {e}") from e
