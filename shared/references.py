"""Config references: values of a child task's config taken from its parents' results.

A task that depends on others may carry ``ConfigRef``s (``shared.messages``): "set ``epochs`` to
the parent's ``result.metrics.steps``", "merge the parent's ``result.best_params`` into the
config", "set ``model_task`` to the parent's task id". At submit the config is validated with the
referenced fields left open (``validate_with_refs``); once every parent completed the scheduler
fills them in (``resolve_config``) and validates the whole config, so a bad value still fails the
child naming its field, as Argo and GitHub Actions resolve ``${{ needs.x.outputs.y }}`` only when
the producing step has finished.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from shared.errors import DependencyError, TaskConfigError
from shared.messages import ConfigRef
from shared.task_types import get_task_type

#: Sentinel for "no value at this path" (``None`` is a valid JSON value).
_MISSING = object()


def lookup(data: Any, path: Sequence[str]) -> Any:
    """The value at ``path`` inside nested mappings and lists, or ``_MISSING``.

    A list is indexed by a decimal path part (``trials.0.value``).
    """
    value = data
    for part in path:
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def set_path(config: dict[str, Any], target: str, value: Any) -> None:
    """Set ``config[a][b] = value`` for ``target`` ``"a.b"``, creating mappings on the way.

    Raises:
        DependencyError: a part on the way is not a mapping (``field`` names the target).
    """
    *parents, leaf = target.split(".")
    node = config
    for i, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            where = ".".join(parents[: i + 1])
            raise DependencyError(
                f"config.{target}: config.{where} is not a mapping", field=f"config.{target}"
            )
    node[leaf] = value


def ref_value(ref: ConfigRef, results: Mapping[str, Mapping[str, Any] | None]) -> Any:
    """The value ``ref`` names, from its parent's result (or the parent's id).

    Args:
        ref: the reference.
        results: each completed parent's result, by task id.

    Raises:
        DependencyError: the parent is not among ``results`` or its result lacks the path; the
            message names the config field and the reference.
    """
    field = f"config.{ref.target}" if ref.target else "config"
    if ref.source == "task_id":
        return ref.task_id
    if ref.task_id not in results:
        raise DependencyError(f"{field}: {ref.text}: not a parent of this task", field=field)
    value = lookup(results[ref.task_id] or {}, ref.source.split(".")[1:])
    if value is _MISSING:
        raise DependencyError(
            f"{field}: cannot resolve {ref.text}: parent {ref.task_id} has no "
            f"{ref.source} (its result has keys: {', '.join(sorted(results[ref.task_id] or {}))})",
            field=field,
        )
    return copy.deepcopy(value)


def resolve_config(
    config: Mapping[str, Any],
    refs: Iterable[ConfigRef],
    results: Mapping[str, Mapping[str, Any] | None],
) -> dict[str, Any]:
    """The config with every reference filled in from the parents' results.

    Merges (``config_from``) come first, in order, over the step's own config (the config holds
    defaults, the parent's result what it tuned); direct references are set last, so a field
    written as ``${steps.x.result.y}`` always gets exactly that value.

    Raises:
        DependencyError: a reference cannot be resolved, or a merged value is not a mapping.
    """
    resolved = copy.deepcopy(dict(config))
    ordered = sorted(refs, key=lambda r: not r.merge)  # stable: merges first, in order
    for ref in ordered:
        value = ref_value(ref, results)
        if not ref.merge:
            set_path(resolved, ref.target, value)
            continue
        if not isinstance(value, Mapping):
            field = f"config.{ref.target}" if ref.target else "config"
            raise DependencyError(
                f"{field}: {ref.text} is a {type(value).__name__}, not a mapping to merge",
                field=field,
            )
        for key, item in value.items():
            set_path(resolved, f"{ref.target}.{key}" if ref.target else str(key), item)
    return resolved


def validate_with_refs(
    task_type: str, config: Mapping[str, Any], refs: Sequence[ConfigRef]
) -> None:
    """Validate ``config`` for ``task_type`` at submit, leaving referenced fields open.

    An error at (or under) a field a reference will set is ignored, and so is a missing field
    while a merge may supply it; every other error is reported, unknown field names included
    (even when referenced: ``epochz: ${...}`` is a typo now, not after an hour-long parent).

    Raises:
        UnknownTaskTypeError: the type is not registered.
        TaskConfigError: another field is invalid (the message names each).
    """
    model = get_task_type(task_type).config_model
    candidate = copy.deepcopy(dict(config))
    for ref in refs:  # present, so a misspelt target is an unknown field
        if not ref.merge and ref.target and lookup(candidate, ref.target.split(".")) is _MISSING:
            set_path(candidate, ref.target, ref.text)
    try:
        model.model_validate(candidate)
    except ValidationError as e:
        targets = [tuple(r.target.split(".")) for r in refs if not r.merge and r.target]
        merging = any(r.merge for r in refs)
        errors = []
        for err in e.errors():
            loc = tuple(str(p) for p in err["loc"])
            if err["type"] != "extra_forbidden" and (
                any(loc[: len(t)] == t for t in targets) or (merging and err["type"] == "missing")
            ):
                continue
            errors.append((".".join(loc), err["msg"]))
        if errors:
            detail = "; ".join(f"{loc}: {msg}" for loc, msg in errors)
            raise TaskConfigError(f"invalid {task_type} config: {detail}", errors=errors) from e
