"""``tradectl task sync-local``: publish tasks this machine ran while the desktop was away."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from shared.cli.common import JsonOpt, fail, load_settings, out, printable, with_client
from shared.client import DistributedClient
from shared.local_runs import LocalJournal, Published, publish_local_runs


def sync_local(
    task_id: Annotated[
        str | None, typer.Argument(help="Only this task (id or prefix); default every one.")
    ] = None,
    forget: Annotated[
        bool,
        typer.Option(
            "--forget",
            help="Drop TASK_ID's local record (and output lines) instead, e.g. after a conflict; "
            "its artifacts folder stays.",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Publish local runs to the desktop: state and result to Redis, artifacts to shared storage.

    Tasks that ran on this machine while Redis was unreachable (or whose end could not be
    recorded) are kept in TP_DATA_DIR/local/; this records each in Redis as run by
    local:<host>, so `task status` shows it, and copies its artifacts to shared storage when
    TP_ARTIFACT_BACKEND is set. Running it again changes nothing.

    Exit 0 when every finished run is published, 1 when one conflicts with what Redis holds
    or fails (the local record is kept; --forget drops it), 3 when Redis cannot be reached.
    """
    if forget:
        forget_local_run(task_id)
        return

    async def body(client: DistributedClient) -> list[Published]:
        broker = client.broker if client.broker.connected else None  # only to announce ends
        return await publish_local_runs(client.settings, client.store, broker, task_id=task_id)

    done = with_client(body, redis_only=True)
    if as_json:
        print(json.dumps([p.__dict__ for p in done], indent=2, default=str))
    elif not done:
        out.print("nothing to publish", highlight=False)
    else:
        table = Table("task", "state", "outcome", "artifacts", title="local runs")
        for p in done:
            table.add_row(p.task_id, p.state.value, printable(p.outcome), printable(p.artifacts))
        out.print(table, markup=False)
    if any(p.outcome.startswith(("conflict", "error")) for p in done):
        raise typer.Exit(1)


def forget_local_run(task_id: str | None) -> None:
    """``--forget``: drop one journalled local run (exit 2 without an id, 4 for no such run)."""
    if not task_id:
        fail("--forget needs the task id", 2)
    journal = LocalJournal(load_settings())
    found = [r.task_id for r in journal.all() if r.task_id.startswith(task_id)]
    if len(found) != 1:
        fail(f"no single local run matches {task_id!r} (found {len(found)})", 4)
    journal.remove(found[0])
    out.print(f"forgot local run {found[0]}", markup=False, highlight=False)
