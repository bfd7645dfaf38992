"""``tradectl schedule ...``: recurring submissions kept in Redis, fired by the scheduler.

Exit codes as in ``common``: 2 a refused schedule (bad cron expression or zone, a taken name, a
bad task config), 4 no schedule of that name.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError
from rich.markup import escape
from rich.table import Table

from shared.cli.common import JsonOpt, fail, format_ts, out, with_client
from shared.cli.tasks import SET_HELP, parse_config
from shared.client import DistributedClient
from shared.constants import DEFAULT_PRIORITY, MAX_PRIORITY
from shared.errors import ScheduleNotFoundError, TaskError
from shared.messages import describe_validation_error
from shared.schedules import Schedule

schedule_app = typer.Typer(
    help="Recurring submissions: add, list, pause, resume, remove.", no_args_is_help=True
)
T = TypeVar("T")

CRON_HELP = (
    "Cron expression: 5 fields (minute hour day month weekday, '0 2 * * 1-5' = 02:00 on "
    "weekdays) or 6 with seconds last ('* * * * * */10' = every 10 s)."
)


def schedule_json(schedule: Schedule) -> dict[str, Any]:
    """A schedule as ``--json`` prints it: spec fields at the top level, then its state."""
    return {
        **schedule.spec.model_dump(mode="json"),
        "paused": schedule.paused,
        "next_due_at": schedule.next_due_at,
        "last_fired_at": schedule.last_fired_at,
        "last_task_id": schedule.last_task_id,
        "fired": schedule.fired,
    }


def run_schedules(body: Callable[[DistributedClient], Awaitable[T]]) -> T:
    """``with_client`` plus the schedule refusals: exit 2 (refused) or 4 (no such schedule)."""
    try:
        return with_client(body)
    except ScheduleNotFoundError as e:
        fail(str(e), 4)
    except TaskError as e:
        fail(str(e), 2)
    except ValidationError as e:
        fail(describe_validation_error(e), 2)


def print_schedule(schedule: Schedule, *, as_json: bool, verb: str) -> None:
    """One schedule as JSON, or ``schedule NAME <verb>; next due ...``."""
    if as_json:
        print(json.dumps(schedule_json(schedule), indent=2))
        return
    due = "paused" if schedule.paused else f"next due {_when(schedule.next_due_at)}"
    out.print(f"schedule {schedule.name} {verb}; {due}", highlight=False, markup=False)


def _when(ts: float | None) -> str:
    return format_ts(ts) if ts else "-"


@schedule_app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="Unique name ([A-Za-z0-9_.-]).")],
    task_type: Annotated[str, typer.Argument(help="Task type, e.g. train_model.")],
    cron: Annotated[str, typer.Option("--cron", help=CRON_HELP)],
    config_file: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML/JSON config.")
    ] = None,
    assignments: Annotated[list[str] | None, typer.Option("--set", "-s", help=SET_HELP)] = None,
    timezone: Annotated[
        str, typer.Option("--tz", help="IANA time zone the expression is read in.")
    ] = "UTC",
    priority: Annotated[
        int, typer.Option(min=0, max=MAX_PRIORITY, help="0 low .. 9 high")
    ] = DEFAULT_PRIORITY,
    time_limit: Annotated[
        float | None, typer.Option(help="Time limit of each task (s); default TP_TASK_TIMEOUT_S.")
    ] = None,
    max_attempts: Annotated[
        int | None, typer.Option(min=1, max=100, help="Runs per task; default TP_MAX_ATTEMPTS.")
    ] = None,
    paused: Annotated[bool, typer.Option("--paused", help="Create it paused.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Create a recurring submission; the scheduler submits the task at every occurrence.

    A run missed while no scheduler was running is made up once when one starts (not once per
    missed occurrence); the next run is then computed from now.
    """
    config = parse_config(config_file, assignments or [])
    schedule = run_schedules(
        lambda c: c.add_schedule(
            name,
            cron,
            task_type,
            config,
            timezone=timezone,
            priority=priority,
            time_limit_s=time_limit,
            max_attempts=max_attempts,
            paused=paused,
        )
    )
    print_schedule(schedule, as_json=as_json, verb="added")


@schedule_app.command("list")
def list_schedules(as_json: JsonOpt = False) -> None:
    """List every schedule: cron, task, state, next due, last run."""
    schedules: list[Schedule] = run_schedules(lambda c: c.schedules())
    if as_json:
        print(json.dumps([schedule_json(s) for s in schedules], indent=2))
        return
    table = Table("name", "cron", "tz", "task", "state", "next due", "last run", "fired")
    for s in schedules:
        last = _when(s.last_fired_at)
        if s.last_task_id:
            last = f"{last} {s.last_task_id[:8]}"
        table.add_row(
            escape(s.name),
            escape(s.spec.cron),
            escape(s.spec.timezone),
            escape(s.spec.task_type),
            "paused" if s.paused else "active",
            "-" if s.paused else _when(s.next_due_at),
            last,
            str(s.fired),
        )
    out.print(table)


@schedule_app.command("pause")
def pause(name: str, as_json: JsonOpt = False) -> None:
    """Stop firing a schedule (tasks already submitted are not touched)."""
    print_schedule(run_schedules(lambda c: c.pause_schedule(name)), as_json=as_json, verb="paused")


@schedule_app.command("resume")
def resume(name: str, as_json: JsonOpt = False) -> None:
    """Fire a paused schedule again from its next occurrence (missed runs are not made up)."""
    print_schedule(
        run_schedules(lambda c: c.resume_schedule(name)), as_json=as_json, verb="resumed"
    )


@schedule_app.command("remove")
def remove(name: str) -> None:
    """Delete a schedule (tasks it submitted stay)."""
    run_schedules(lambda c: c.remove_schedule(name))
    out.print(f"schedule {name} removed", highlight=False, markup=False)
