"""``tradectl queue ...``: what waits where, and the dead letters with their reasons."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer
from rich.markup import escape
from rich.table import Table

from shared.cli.common import JsonOpt, fail, out, printable, with_client
from shared.cli.workers import duration
from shared.client import DistributedClient
from shared.errors import DeadLetterNotFoundError
from shared.queues import DeadLetter, DeadLetterList, QueueReport, Requeued

T = TypeVar("T")

queue_app = typer.Typer(help="Queues: depth, consumers, dead letters.", no_args_is_help=True)


def queue_tables(report: QueueReport) -> list[Table]:
    """The broker's queues, then the tasks queued in Redis per priority."""
    queues = Table("queue", "messages", "consumers", "note")
    for q in report.queues:
        note = ""
        if q.name == report.dead_letter_queue:
            note = "dead letters: tradectl queue dead" if q.messages else ""
        elif q.messages and not q.consumers:
            note = "[red]messages but no consumer[/red]"
        queues.add_row(escape(q.name), str(q.messages), str(q.consumers), note)
    tasks = report.tasks
    oldest = "" if tasks.oldest_age_s is None else f", oldest {duration(tasks.oldest_age_s)}"
    partial = "" if tasks.counted >= tasks.total else f", first {tasks.counted} by priority"
    title = f"queued tasks (Redis): {tasks.total}{oldest}{partial}"
    priorities = Table("priority", "tasks", title=title, title_justify="left")
    for p in tasks.by_priority:
        priorities.add_row(str(p.priority), str(p.tasks))
    return [queues, priorities]


@queue_app.command("status")
def status(as_json: JsonOpt = False) -> None:
    """Messages and consumers per queue as RabbitMQ counts them, queued tasks per priority.

    Messages are those ready for delivery (a worker acks at claim, so few are held unacked).
    Redis may list more queued tasks than the work queues hold: a task waiting for its retry
    back-off, or for a commit, is queued with no message yet.
    """
    report: QueueReport = with_client(lambda c: c.queue_status())
    if as_json:
        print(json.dumps(report.model_dump(mode="json"), indent=2))
        return
    for table in queue_tables(report):
        out.print(table)
    out.print(f"dead letters: {report.dead_letters}", markup=False, highlight=False)


def dead_table(found: DeadLetterList) -> Table:
    """Dead letters, oldest first, with reason, source queue and the start of the body."""
    title = f"{len(found.letters)} of {found.total} dead letters (all left in the queue)"
    table = Table("id", "reason", "source queue", "requeues", "bytes", "body", title=title)
    table.title_justify = "left"
    for d in found.letters:
        table.add_row(
            escape(printable(d.id)),
            escape(printable(d.reason)),
            escape(printable(d.source_queue or "-")),
            str(d.requeues),
            str(d.size_bytes),
            escape(d.preview),
        )
    return table


@queue_app.command("dead")
def dead(
    requeue: Annotated[
        str | None,
        typer.Option(
            help="Put this dead letter (id, message id or task id) back into its source queue."
        ),
    ] = None,
    drop: Annotated[
        str | None,
        typer.Option(help="Delete this dead letter (id, message id or task id) for good."),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="List at most this many.")] = 100,
    as_json: JsonOpt = False,
) -> None:
    """List dead-lettered messages with their reasons (they stay in the queue), or act on one.

    --requeue ID republishes that message to the queue it came from (the submit queue for
    intake messages) and removes it from the dead-letter queue; a message still bad is
    dead-lettered again with its reason. --drop ID deletes it for good. Exit 4 when no dead
    letter has that id.
    """
    if requeue is not None and drop is not None:
        fail("pass --requeue or --drop, not both", 2)
    if drop is not None:
        drop_id = drop
        gone: DeadLetter = _on_one_letter(lambda c: c.drop_dead_letter(drop_id))
        if as_json:
            print(json.dumps(gone.model_dump(mode="json"), indent=2))
        else:
            out.print(f"dropped {gone.id} ({gone.reason})", markup=False, highlight=False)
        return
    if requeue is None:
        found: DeadLetterList = with_client(lambda c: c.dead_letters(limit))
        if as_json:
            print(json.dumps(found.model_dump(mode="json"), indent=2))
        else:
            out.print(dead_table(found))
        return
    letter_id = requeue
    done: Requeued = _on_one_letter(lambda c: c.requeue_dead_letter(letter_id))
    if as_json:
        print(json.dumps(done.model_dump(mode="json"), indent=2))
        return
    out.print(
        f"requeued {done.letter.id} to {done.queue} (it was dead-lettered: {done.letter.reason})",
        markup=False,
        highlight=False,
    )


def _on_one_letter(act: Callable[[DistributedClient], Awaitable[T]]) -> T:
    """Run ``act`` (a requeue or a drop of one dead letter); exit 4 when none has that id."""
    try:
        return with_client(act)
    except DeadLetterNotFoundError as e:
        fail(str(e), 4)
