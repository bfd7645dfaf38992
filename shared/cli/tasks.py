"""``tradectl task ...``: submit, follow, inspect and cancel tasks (exit codes in ``common``)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from pydantic import ValidationError
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table
from rich.text import Text

from shared.cli.artifacts import download_into
from shared.cli.common import (
    JsonOpt,
    err,
    fail,
    format_ts,
    live_displays,
    load_settings,
    out,
    printable,
    run,
    with_client,
)
from shared.client import CancelResult, DistributedClient
from shared.constants import DEFAULT_PRIORITY, MAX_PRIORITY
from shared.errors import (
    BrokerError,
    DependencyError,
    StoreError,
    TaskError,
    TaskNotFoundError,
)
from shared.fallback import split_local_profile
from shared.local_runs import LocalJournal, LocalRecord, is_local_worker
from shared.logstream import LogLine
from shared.messages import EventKind, TaskEvent, TaskState, describe_validation_error
from shared.schedules import parse_start_time
from shared.settings import FallbackMode, Settings
from shared.store import TaskRecord
from shared.task_types import validate_config

task_app = typer.Typer(help="Submit, follow and inspect tasks.", no_args_is_help=True)


class FallbackOpt(StrEnum):
    """``--fallback`` choices."""

    LOCAL = "local"
    NEVER = "never"
    ASK = "ask"


class WaitTimedOutError(Exception):
    """``--wait --timeout`` passed before the task ended; the message says in which state."""


#: Help of ``--set``; typer renders help as rich markup, so brackets are escaped.
SET_HELP = escape(
    "key=value, repeatable; dotted keys set nested values. The value is read as a YAML scalar "
    "(epochs=5 an int, lr=1e-3 a float, flag=true a bool, x=null None, model=lstm a string), "
    "as a list only when it starts with [ and as a mapping only when it starts with {. "
    "Anything else is kept as the text typed: x=@home (not YAML), fail_with=boom: bad."
)

#: Types a ``--set`` value may parse to; others (YAML dates, timestamps, bytes) stay strings.
_JSON_TYPES = (type(None), bool, int, float, str, list, dict)


def parse_set_value(raw: str) -> Any:
    """The value of one ``--set key=value``: a YAML scalar or flow value, else ``raw`` itself.

    ``raw`` is parsed as YAML (``5`` is an int, ``1e-3`` a float, ``true`` a bool, ``null``
    None, ``lstm`` a string, ``'a: b'`` the string ``a: b``). The result is kept only when it is
    a scalar, a list from text starting with ``[`` or a mapping from text starting with ``{``;
    otherwise ``raw`` is used unchanged: text that is not valid YAML (``@home``,
    ``[bold red]x``), plain text that YAML would read as a mapping or list (``boom: bad``,
    ``- a``) and YAML-only types such as dates (``2024-01-02``). An empty value is ``""``.
    """
    if not raw:
        return ""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    start = raw.lstrip()[:1]
    if isinstance(value, dict) and start != "{":
        return raw
    if isinstance(value, list) and start != "[":
        return raw
    if not isinstance(value, _JSON_TYPES):
        return raw
    return value


def parse_config(config_file: Path | None, assignments: list[str]) -> dict[str, Any]:
    """Read ``--config FILE`` (YAML or JSON mapping) and apply ``--set key=value`` on top.

    Values in ``--set`` are read by :func:`parse_set_value`: YAML scalars (``epochs=5`` is an
    int, ``model=lstm`` a string), a list or mapping only from text starting with ``[`` or
    ``{``, and the text as typed when it is not valid YAML or would become a mapping or list
    without those brackets (``fail_with=boom: bad`` is the string ``boom: bad``). Dotted keys set
    nested values. A bad assignment exits 2.
    """
    config: dict[str, Any] = {}
    if config_file is not None:
        try:
            loaded = yaml.safe_load(config_file.read_text())
        except (OSError, yaml.YAMLError) as e:
            fail(f"cannot read config {config_file}: {e}", 2)
        if loaded is not None and not isinstance(loaded, dict):
            fail(f"config {config_file} must be a mapping of field: value", 2)
        config = loaded or {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            fail(f"--set expects key=value, got {item!r}", 2)
        target = config
        *parents, leaf = key.split(".")
        for i, part in enumerate(parents):
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                fail(f"--set {item!r}: {'.'.join(parents[: i + 1])} is not a mapping", 2)
        target[leaf] = parse_set_value(raw)
    return config


def record_json(record: TaskRecord) -> str:
    """The record as JSON, with ``finished_at`` spelled out."""
    data = record.model_dump(mode="json")
    data["finished_at"] = record.finished_at
    return json.dumps(data, indent=2)


def print_record(record: TaskRecord, *, as_json: bool) -> None:
    """Print a record as JSON or as a short rich summary with its metrics."""
    if as_json:
        print(record_json(record))
        return
    colour = {"completed": "green", "failed": "red", "cancelled": "yellow"}.get(
        record.state, "cyan"
    )
    out.print(
        f"task [bold]{escape(record.task_id)}[/bold] ({escape(record.task_type)}) "
        f"[{colour}]{record.state}[/{colour}] attempts={record.attempts} "
        f"worker={escape(record.worker or '-')}",
        highlight=False,
    )
    if record.fallback_reason and is_local_worker(record.worker):
        out.print(f"ran locally: {record.fallback_reason}", highlight=False, markup=False)
    for name in (
        "submitted_at",
        "queued_at",
        "running_at",
        "completed_at",
        "failed_at",
        "cancelled_at",
    ):
        value = getattr(record, name)
        if value:
            out.print(f"  {name:<13} {format_ts(value)}", highlight=False)
    if record.error:
        out.print(f"  [red]error[/red] {escape(record.error)}", highlight=False)
    if record.waiting:
        out.print(f"  [yellow]waiting[/yellow] {escape(record.waiting)}", highlight=False)
    if record.depends_on:
        out.print(f"  depends on    {', '.join(record.depends_on)}", highlight=False, markup=False)
    if record.not_before:
        out.print(f"  not before    {format_ts(record.not_before)}", highlight=False, markup=False)
    ran_on = (record.result or {}).get("git_commit") or record.code_commit
    if record.git_commit or ran_on:
        out.print(
            f"  commit        submitted {(record.git_commit or '-')[:12]}, "
            f"ran on {(ran_on or '-')[:12]}",
            highlight=False,
            markup=False,
        )
    metrics = (record.result or {}).get("metrics") or {}
    if metrics:
        table = Table("metric", "value", title="metrics")
        for key, value in metrics.items():
            shown = f"{value:.6g}" if isinstance(value, float) else str(value)
            table.add_row(escape(str(key)), escape(shown))
        out.print(table)


def _positive(value: float | None) -> float | None:
    """Refuse a ``--timeout`` of zero or less (a usage error, exit 2)."""
    if value is not None and not value > 0:
        raise typer.BadParameter(f"must be > 0, got {value:g}")
    return value


@task_app.command("submit")
def submit(
    task_type: Annotated[str, typer.Argument(help="Task type, e.g. train_model.")],
    config_file: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML/JSON config.")
    ] = None,
    assignments: Annotated[list[str] | None, typer.Option("--set", "-s", help=SET_HELP)] = None,
    priority: Annotated[
        int, typer.Option(min=0, max=MAX_PRIORITY, help="0 low .. 9 high")
    ] = DEFAULT_PRIORITY,
    wait: Annotated[bool, typer.Option("--wait", "-w", help="Follow until the task ends.")] = False,
    timeout: Annotated[
        float | None,
        typer.Option(callback=_positive, help="--wait gives up after this (s, > 0)."),
    ] = None,
    task_id: Annotated[str | None, typer.Option("--task-id", help="Choose the task id.")] = None,
    idempotency_key: Annotated[str | None, typer.Option(help="Same key, same task.")] = None,
    time_limit: Annotated[
        float | None,
        typer.Option(help="Kill and fail the task after this long (s); default TP_TASK_TIMEOUT_S."),
    ] = None,
    max_attempts: Annotated[
        int | None,
        typer.Option(min=1, max=100, help="Runs before giving up; default TP_MAX_ATTEMPTS."),
    ] = None,
    depends_on: Annotated[
        list[str] | None,
        typer.Option(
            "--depends-on",
            help="Parent task id (or unique prefix), repeatable: the task waits until every "
            "parent completed, and fails if one fails or is cancelled.",
        ),
    ] = None,
    at: Annotated[
        str | None,
        typer.Option(
            "--at",
            help="Not queued before this time: ISO (2025-01-31T02:00 local time, "
            "2025-01-31T02:00:00Z UTC) or relative to now (+30s, +5m, +2h, +1d).",
        ),
    ] = None,
    fallback: Annotated[
        FallbackOpt | None,
        typer.Option(
            help="When the desktop cannot run the task: run it on this machine (local), never, "
            "or ask; default TP_FALLBACK. Applies with --wait, and at once when RabbitMQ or "
            "Redis cannot be reached.",
            case_sensitive=False,
        ),
    ] = None,
    start_timeout: Annotated[
        float | None,
        typer.Option(
            callback=_positive,
            help="With no worker online for the task, run it locally after this long (s); "
            "default TP_FALLBACK_START_TIMEOUT_S.",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Validate and submit a task; with --wait follow its progress and print its metrics.

    When the desktop is unreachable, or (with --wait) no worker starts the task, it runs on this
    machine as the desktop would run it (see --fallback); the output says where it ran and why.
    A config's "local" mapping is applied over it only then (e.g. local: {epochs: 2}).
    """
    config = parse_config(config_file, assignments or [])
    settings = load_settings()
    try:  # refused before anything is connected to: a bad config is exit 2 even when offline
        validate_config(task_type, split_local_profile(task_type, config)[0])
    except TaskError as e:
        fail(str(e), 2)
    mode: FallbackMode = fallback.value if fallback is not None else settings.fallback
    ran_locally: list[str] = []

    async def body(client: DistributedClient) -> TaskRecord:
        commit = await client.pinned_commit(warn=print_warnings)
        if client.unreachable and not client.store.connected and (depends_on or at):
            raise StoreError(f"{client.unreachable} (--depends-on and --at need Redis)")
        submit_kw: dict[str, Any] = {
            "git_commit": commit,
            "priority": priority,
            "task_id": task_id,
            "idempotency_key": idempotency_key,
            "time_limit_s": time_limit,
            "max_attempts": max_attempts,
            "depends_on": [await resolve_parent(client, p) for p in depends_on or []],
            "not_before": None if at is None else parse_start_time(at, await client.store.now()),
        }
        if not wait and client.unreachable is None:
            return await client.submit(task_type, config, **submit_kw)
        return await follow(
            client, task_type, config, submit_kw, timeout, quiet=as_json, ran_locally=ran_locally
        )

    try:
        record: TaskRecord = with_client(body, fallback=mode, start_timeout_s=start_timeout)
    except TaskError as e:
        fail(str(e), 2)
    except ValidationError as e:
        fail(describe_validation_error(e), 2)
    except WaitTimedOutError as e:
        fail(str(e), 124)
    if ran_locally:
        note_unpublished(settings, record.task_id)
    if wait or ran_locally:
        print_record(record, as_json=as_json)
        raise typer.Exit(0 if record.state == "completed" else 1)
    if as_json:
        print(record_json(record))
    else:
        out.print(record.task_id, highlight=False, markup=False)


def note_unpublished(settings: Settings, task_id: str) -> None:
    """After a local run Redis could not record: say where it is kept and how to publish it."""
    kept = LocalJournal(settings).load(task_id)
    if kept is not None and not kept.published:
        err.print(
            f"note: kept on this machine only, in {LocalJournal(settings).path(task_id)}; "
            "run `tradectl task sync-local` once Redis is reachable",
            highlight=False,
            markup=False,
        )


async def resolve_parent(client: DistributedClient, id_or_prefix: str) -> str:
    """The full id of a ``--depends-on`` parent, or a refusal naming the option (exit 2)."""
    try:
        return await client.store.resolve_id(id_or_prefix)
    except TaskNotFoundError as e:
        raise DependencyError(f"depends_on: {e}", field="depends_on") from e


def print_warnings(problems: list[str]) -> None:
    """Print commit-check problems on stderr (the task is submitted anyway)."""
    for problem in problems:
        err.print(f"[yellow]warning:[/yellow] {escape(problem)}", highlight=False)


async def follow(
    client: DistributedClient,
    task_type: str,
    config: dict[str, Any],
    submit_kw: dict[str, Any],
    timeout: float | None,
    *,
    quiet: bool,
    ran_locally: list[str] | None = None,
) -> TaskRecord:
    """Submit and wait, drawing a progress bar from the pushed events (nothing when quiet).

    ``ran_locally`` gets the reason when the task runs on this machine instead.
    """
    submitted: list[str] = []

    def on_submitted(record: TaskRecord) -> None:
        submitted.append(record.task_id)
        if not quiet:
            err.print(f"submitted {record.task_id}", highlight=False, markup=False)

    def on_local(reason: str) -> None:
        if ran_locally is not None:
            ran_locally.append(reason)
        err.print(f"running locally: {printable(reason)}", highlight=False, markup=False)

    async def wait(on_event: Callable[[TaskEvent], None] | None) -> TaskRecord:
        try:
            return await client.submit_and_wait(
                task_type,
                config,
                timeout_s=timeout,
                on_event=on_event,
                on_submitted=on_submitted,
                on_local=on_local,
                **submit_kw,
            )
        except TimeoutError:
            record = await client.status(submitted[0])
            hint = ""
            if record.state is TaskState.SUBMITTED:
                hint = f" ({record.waiting})" if record.waiting else " (is a scheduler running?)"
            elif record.state is TaskState.QUEUED and not record.worker:
                hint = f" ({record.waiting})" if record.waiting else " (is a worker running?)"
            elif record.worker:
                hint = f" on {record.worker}"
                if client.fallback.enabled:
                    hint += " (not run locally: it started there)"
            raise WaitTimedOutError(
                f"task {record.task_id} still {record.state.value} after {timeout:g} s{hint}"
            ) from None

    if quiet or not sys.stderr.isatty():
        return await wait(None if quiet else in_order(print_event))
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=err,
    ) as bar:
        handle = bar.add_task("submitted", total=1.0)
        live_displays.append(bar)  # paused while --fallback ask asks

        def on_event(event: TaskEvent) -> None:
            if event.kind is EventKind.PROGRESS:
                # The description column renders markup: the task's message is escaped.
                bar.update(
                    handle,
                    completed=event.progress or 0.0,
                    description=escape(event.message) or "running",
                )
            else:
                bar.update(handle, description=event.state.value)

        try:
            return await wait(in_order(on_event))
        finally:
            live_displays.remove(bar)


def in_order(show: Callable[[TaskEvent], None]) -> Callable[[TaskEvent], None]:
    """Pass on state events in the order they happened, dropping one that arrives late.

    The scheduler's ``queued`` and the worker's ``running`` come from two processes and may
    arrive swapped; both stamp ``ts`` with the desktop's clock, so an event older than the last
    state shown is stale news.
    """
    latest = 0.0

    def on_event(event: TaskEvent) -> None:
        nonlocal latest
        if event.kind is EventKind.STATE:
            if event.ts < latest:
                return
            latest = event.ts
        show(event)

    return on_event


def print_event(event: TaskEvent) -> None:
    """One line per event when stderr is not a terminal (logs, CI)."""
    if event.kind is EventKind.PROGRESS:
        pct = f"{(event.progress or 0) * 100:.0f}%"
        metrics = " ".join(f"{k}={v:.4g}" for k, v in event.metrics.items())
        err.print(f"{pct:>4} {event.message} {metrics}", highlight=False, markup=False)
    else:
        err.print(
            f"state {event.state.value}" + (f": {event.error}" if event.error else ""),
            highlight=False,
            markup=False,
        )


@task_app.command("status")
def status(task_id: str, as_json: JsonOpt = False) -> None:
    """Show a task's state, timestamps, progress and history of transitions."""

    async def body(c: DistributedClient) -> tuple[TaskRecord, list[dict[str, Any]]]:
        record = await c.status(task_id)
        return record, await c.history(record.task_id)

    try:
        record, history = with_client(body, redis_only=True)
    except typer.Exit as e:  # Redis unreachable: a run kept on this machine is still shown
        kept = find_local_run(task_id) if e.exit_code == 3 else None
        if kept is None:
            raise
        err.print("note: from this machine's journal of local runs (not yet in Redis)")
        record, history = kept.to_task_record(), []
    if as_json:
        data = json.loads(record_json(record))
        data["history"] = history
        print(json.dumps(data, indent=2))
        return
    print_record(record, as_json=False)
    if record.progress is not None and not record.state.is_terminal:
        out.print(
            f"  progress {record.progress:.0%} {record.progress_message}",
            highlight=False,
            markup=False,
        )
    table = Table("time", "from", "to", "by", "attempt", "reason", title="history")
    for h in history:
        table.add_row(
            format_ts(h["ts"]),
            h.get("from", ""),
            h["to"],
            escape(str(h.get("by", ""))),
            str(h.get("attempt", "")),
            escape(str(h.get("reason", ""))),
        )
    out.print(table)


def find_local_run(task_id: str) -> LocalRecord | None:
    """The journalled local run with this id (or unique prefix), if any."""
    found = [r for r in LocalJournal(load_settings()).all() if r.task_id.startswith(task_id)]
    return found[0] if len(found) == 1 else None


@task_app.command("cancel")
def cancel(
    task_id: str,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Do not wait for it to stop.")] = False,
    timeout: Annotated[float, typer.Option(help="Wait at most this long (s).")] = 60.0,
    as_json: JsonOpt = False,
) -> None:
    """Cancel a task: a queued one never runs; a running one is stopped (SIGTERM, then SIGKILL).

    Exit 0 when the task is cancelled or had already finished (nothing changed then), 124 when
    it is still stopping after --timeout.
    """
    # Only Redis is needed: a runner without the control message learns of the cancel from its
    # lease (a local run whose laptop has no broker, a worker whose message was lost).
    result: CancelResult = with_client(
        lambda c: c.cancel(task_id, wait_s=None if no_wait else timeout), redis_only=True
    )
    record = result.record
    if as_json:
        print(
            json.dumps(
                {"outcome": result.outcome, "task_id": record.task_id, "state": record.state}
            )
        )
    elif result.outcome.startswith("already_"):
        out.print(
            f"task {record.task_id} already {record.state.value}; nothing changed",
            markup=False,
            highlight=False,
        )
    else:
        out.print(f"task {record.task_id} {result.outcome}", markup=False, highlight=False)
    if result.outcome == "cancelling" and not no_wait:
        raise typer.Exit(124)


def try_record(task_id: str) -> TaskRecord | None:
    """The task's record, or None (with a note) when the desktop's Redis/RabbitMQ is away."""

    async def read() -> TaskRecord:
        async with DistributedClient(load_settings(), name="tradectl") as client:
            return await client.status(task_id)

    try:
        return run(read())
    except TaskNotFoundError as e:  # its record may have expired while its artifacts remain
        err.print(f"note: {escape(str(e))}; trying shared storage with the id as given")
        return None
    except (StoreError, BrokerError) as e:
        err.print(
            f"note: desktop unreachable ({escape(str(e))}); using shared storage only, "
            "which needs the full task id"
        )
        return None


@task_app.command("result")
def result(
    task_id: str,
    download: Annotated[
        Path | None,
        typer.Option(
            "--download",
            help="Also fetch its artifacts from shared storage into this folder (verified); "
            "works with the desktop off when given the full task id.",
        ),
    ] = None,
    partial: Annotated[
        bool,
        typer.Option("--partial", help="With --download, accept a set synced mid-run."),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Show a finished task's result and metrics (exit 1 if it failed)."""
    if download is not None:
        record_or_none = try_record(task_id)
        full_id = record_or_none.task_id if record_or_none else task_id
        download_into(full_id, download, quiet=as_json, partial_ok=partial)
        if record_or_none is None:
            return
    record: TaskRecord = with_client(lambda c: c.status(task_id), redis_only=True)
    if as_json:
        print(
            json.dumps(
                {
                    "task_id": record.task_id,
                    "state": record.state,
                    "result": record.result,
                    "error": record.error,
                    "finished_at": record.finished_at,
                },
                indent=2,
            )
        )
    else:
        print_record(record, as_json=False)
        if record.result:
            artifacts = record.result.get("artifacts")
            if artifacts:
                shown = ", ".join(map(str, artifacts))
                out.print(f"  artifacts {shown}", highlight=False, markup=False)
            if record.result.get("mlflow_run_id"):
                run_id = record.result["mlflow_run_id"]
                out.print(f"  mlflow run {run_id}", highlight=False, markup=False)
        if not record.state.is_terminal:
            out.print("  (not finished yet)")
    if record.state in ("failed", "cancelled"):
        raise typer.Exit(1)


@task_app.command("list")
def list_tasks(
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 20,
    state: Annotated[TaskState | None, typer.Option(help="Only tasks in this state.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List recent tasks, newest first (with --state, the most recent in that state)."""
    # The store filters by state while it reads the index, so older matches are found too.
    records: list[TaskRecord] = with_client(lambda c: c.list_tasks(limit, state), redis_only=True)
    if as_json:
        print(json.dumps([r.model_dump(mode="json") for r in records], indent=2))
        return
    table = Table("type", "state", "prio", "progress", "submitted", "worker")
    table.columns.insert(0, Column("task id", no_wrap=True, min_width=36))
    for r in records:
        progress = "" if r.progress is None else f"{r.progress:.0%}"
        table.add_row(
            escape(r.task_id),
            escape(r.task_type),
            r.state.value,
            str(r.priority),
            progress,
            format_ts(r.submitted_at) if r.submitted_at else "",
            escape(r.worker or ""),
        )
    out.print(table)


#: Style of each stream's tag in ``task logs`` (on a terminal; a pipe gets plain text).
STREAM_STYLES = {"stdout": "green", "stderr": "red", "log": "cyan"}


def log_line_text(line: LogLine) -> Text:
    """``HH:MM:SS.mmm [stream] text`` (local time) as rich ``Text``: never read as markup."""
    stamp = datetime.fromtimestamp(line.ts).strftime("%H:%M:%S.%f")[:-3]
    tag = (f"[{line.stream}]", STREAM_STYLES.get(line.stream, ""))
    return Text.assemble((stamp, "dim"), " ", tag, " ", printable(line.text))


def print_log_line(line: LogLine, *, as_json: bool) -> None:
    """One line of a task's output, printed (and flushed) as soon as it is read."""
    if as_json:
        text = json.dumps(line.as_dict(), ensure_ascii=False)
        out.print(text, markup=False, highlight=False, emoji=False)
    else:
        out.print(log_line_text(line), highlight=False)


@task_app.command("logs")
def logs(
    task_id: str,
    follow: Annotated[
        bool,
        typer.Option("--follow", "-f", help="Print new lines as they come until the task ends."),
    ] = False,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="One JSON object per line: id, ts, stream, attempt, text."),
    ] = False,
) -> None:
    """Print a task's output: stdout, stderr and log lines of each run, oldest first.

    Each line shows its time (HH:MM:SS.mmm), its stream in brackets and its text.

    The desktop keeps the last TP_TASK_LOG_MAX_LINES lines of a task, as long as its record.

    --follow prints new lines as they come and exits 0 once the task has ended.
    """

    async def body(client: DistributedClient) -> None:
        async for line in client.follow_logs(task_id, follow=follow):
            print_log_line(line, as_json=as_json)

    try:
        with_client(body, redis_only=True)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
