"""``tradectl pipeline ...``: submit a YAML chain of tasks in one command (``shared.pipelines``).

Exit codes as in ``common``: 0 submitted (with ``--wait``: every step completed), 1 a step failed
or was cancelled, 2 a refused pipeline (the message names the field), 124 ``--timeout`` passed.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from shared.cli.common import JsonOpt, err, fail, out, with_client
from shared.cli.tasks import print_warnings
from shared.client import DistributedClient
from shared.errors import TaskError
from shared.messages import TaskState, describe_validation_error
from shared.pipelines import Pipeline, load_pipeline, plan
from shared.store import TaskRecord

pipeline_app = typer.Typer(help="Submit chains of tasks from a YAML file.", no_args_is_help=True)


def _load(path: Path) -> Pipeline:
    try:
        return load_pipeline(path)
    except TaskError as e:
        fail(str(e), 2)


@pipeline_app.command("validate")
def validate(path: Annotated[Path, typer.Argument(help="Pipeline YAML file.")]) -> None:
    """Check a pipeline file without submitting anything; print its steps in run order."""
    for step in plan(_load(path)):
        parents = f" after {', '.join(step.parents)}" if step.parents else ""
        out.print(f"{step.name} ({step.step.type}){parents}", highlight=False, markup=False)


@pipeline_app.command("submit")
def submit(
    path: Annotated[Path, typer.Argument(help="Pipeline YAML file.")],
    wait: Annotated[
        bool, typer.Option("--wait", "-w", help="Follow every step to its end.")
    ] = False,
    timeout: Annotated[
        float | None, typer.Option(min=0.001, help="--wait gives up after this (s).")
    ] = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option(help="Same key, same tasks: a retried submit makes no second pipeline."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Submit every step (parents first) and print each step's task id.

    Each step waits on the desktop until its parents completed; a step whose parent failed or
    was cancelled fails naming that parent. With --wait, print each step as it ends.
    """
    pipeline = _load(path)

    async def body(client: DistributedClient) -> dict[str, TaskRecord]:
        commit = await client.pinned_commit(warn=print_warnings)
        records = await client.submit_pipeline(
            pipeline, idempotency_key=idempotency_key, git_commit=commit
        )
        if not as_json:
            for name, record in records.items():  # tab-separated: step, task id
                print(f"{name}\t{record.task_id}", flush=True)
        if wait:
            return await follow_steps(client, records, timeout, quiet=as_json)
        return records

    try:
        records: dict[str, TaskRecord] = with_client(body)
    except TaskError as e:
        fail(str(e), 2)
    except ValidationError as e:
        fail(describe_validation_error(e), 2)
    except TimeoutError:
        fail(f"pipeline {pipeline.name} still running after {timeout:g} s", 124)
    if as_json:
        print(json.dumps(pipeline_json(pipeline, records), indent=2))
    if wait and any(r.state is not TaskState.COMPLETED for r in records.values()):
        raise typer.Exit(1)


async def follow_steps(
    client: DistributedClient,
    records: dict[str, TaskRecord],
    timeout: float | None,
    *,
    quiet: bool,
) -> dict[str, TaskRecord]:
    """Wait for every step's task to end, printing each (on stderr) as it does.

    Raises:
        TimeoutError: ``timeout`` (s) passed first.
    """
    names = {r.task_id: name for name, r in records.items()}
    finals = dict(records)
    waits = [asyncio.create_task(client.wait(r.task_id)) for r in records.values()]
    try:
        async with asyncio.timeout(timeout):
            for ended in asyncio.as_completed(waits):
                record = await ended
                name = names[record.task_id]
                finals[name] = record
                if not quiet:
                    error = f": {record.error}" if record.error else ""
                    err.print(
                        f"step {name} ({record.task_id}) {record.state.value}{error}",
                        highlight=False,
                        markup=False,
                    )
    finally:
        for task in waits:
            task.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
    return finals


def pipeline_json(pipeline: Pipeline, records: dict[str, TaskRecord]) -> dict[str, Any]:
    """``{"pipeline": name, "steps": {step: {task_id, type, state, error, result}}}``."""
    return {
        "pipeline": pipeline.name,
        "steps": {
            name: {
                "task_id": r.task_id,
                "type": r.task_type,
                "state": r.state.value,
                "error": r.error,
                "result": r.result,
            }
            for name, r in records.items()
        },
    }
