"""``tradectl sync ...``: where each desktop's checkout stands, and an on-demand fetch."""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from shared.cli.common import JsonOpt, err, format_ts, out, with_client
from shared.gitsync import SyncStatus

sync_app = typer.Typer(help="git-sync: the desktop checkout's state.", no_args_is_help=True)


def _age(ts: float | None) -> str:
    """``12 s ago`` style age of a desktop timestamp (by this machine's clock)."""
    if ts is None:
        return "never"
    seconds = max(0.0, time.time() - ts)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def print_reports(reports: list[SyncStatus], *, as_json: bool) -> None:
    """Print git-sync reports as JSON or a table.

    Exit 1 if there is no report, a report is stale (its git-sync is not running), or a checkout
    needs a person.
    """
    now = time.time()
    if as_json:
        print(json.dumps([r.model_dump(mode="json") for r in reports], indent=2))
    elif not reports:
        err.print("no git-sync report: is the git-sync service running?", markup=False)
    else:
        table = Table("host", "state", "branch", "local", "remote", "ahead", "behind")
        table.columns[0].header = "host (TP_WORKER_NAME)"
        for extra in ("last fetch", "checked", "message / last error"):
            table.add_column(extra)
        for r in reports:
            colour = "red" if r.state.is_problem or r.is_stale(now) else "green"
            detail = r.message
            if r.state.is_problem and r.last_error and r.last_error not in r.message:
                detail += f" (last error: {r.last_error})"
            if r.is_stale(now):
                detail = f"STALE: no report for {_age(r.checked_at)}; is git-sync running? {detail}"
            table.add_row(
                escape(r.host),
                f"[{colour}]{r.state.value}[/{colour}]",
                escape(f"{r.remote}/{r.branch}" if r.branch else r.remote),
                (r.local_sha or "-")[:12],
                (r.remote_sha or "-")[:12],
                str(r.ahead),
                str(r.behind),
                _age(r.last_fetch_at),
                f"{format_ts(r.checked_at)} ({_age(r.checked_at)})",
                escape(detail),
            )
        out.print(table)
    if not reports or any(r.state.is_problem or r.is_stale(now) for r in reports):
        raise typer.Exit(1)


@sync_app.command("status")
def status(as_json: JsonOpt = False) -> None:
    """State, SHAs, ahead/behind, last fetch, last error and age of each desktop's checkout.

    Exit 1 when a checkout is dirty, diverged, detached or cannot fetch, when a report is stale
    (git-sync not running there), or when there is no report at all.
    """
    print_reports(with_client(lambda c: c.sync_status()), as_json=as_json)


@sync_app.command("now")
def now(
    host: Annotated[str | None, typer.Option(help="Only this desktop.")] = None,
    timeout: Annotated[float, typer.Option(min=1, help="Wait this long for the fetch (s).")] = 90,
    as_json: JsonOpt = False,
) -> None:
    """Ask git-sync to fetch (and fast-forward) now; print the fresh status."""
    print_reports(with_client(lambda c: c.sync_now(host=host, wait_s=timeout)), as_json=as_json)
