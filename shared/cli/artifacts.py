"""``tradectl artifacts ...`` and the download behind ``task result --download``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from shared.artifacts import ArtifactStatus
from shared.cli.common import JsonOpt, err, fail, load_settings, out, run, with_client
from shared.downloads import download_artifacts
from shared.errors import TradePlatError
from shared.storage import Manifest

artifacts_app = typer.Typer(help="Artifact sync to shared storage.", no_args_is_help=True)


def download_into(task_id: str, dest: Path, *, quiet: bool, partial_ok: bool = False) -> Manifest:
    """Fetch the task's artifacts from shared storage into ``dest``; exit 1 on failure.

    Needs only the storage settings (``TP_ARTIFACT_BACKEND`` and its ``TP_S3_*``/
    ``TP_ARTIFACT_DIR``): neither RabbitMQ nor Redis, so it works with the desktop off.
    """
    settings = load_settings()
    try:
        manifest = run(download_artifacts(settings, task_id, dest, partial_ok=partial_ok))
    except (TradePlatError, OSError) as e:
        fail(f"download failed: {e}", 1)
    if not quiet:
        size = manifest.total_bytes
        note = "" if manifest.complete else " (synced while the task was still running)"
        out.print(
            f"downloaded {len(manifest.files)} files, {size} bytes, into {dest}, "
            f"each verified against the manifest's SHA-256{note}",
            highlight=False,
            markup=False,
        )
    return manifest


def _row(status: ArtifactStatus) -> list[str]:
    colour = {"synced": "green", "failed": "red"}.get(status.state.value, "cyan")
    state = status.state.value
    if status.state.value == "synced" and not status.complete:
        state += " (checkpoint)"
    share = f"{status.bytes_done}/{status.bytes_total}"
    return [
        escape(status.task_id),
        f"[{colour}]{state}[/{colour}]",
        f"{status.files} ({status.uploaded} copied, {status.skipped} unchanged)",
        share,
        str(status.attempts),
        escape(status.location),
        f"{time.time() - status.updated_at:.0f} s ago",
        escape(status.error or ""),
    ]


@artifacts_app.command("status")
def status(
    task_id: Annotated[str | None, typer.Argument(help="One task (id or prefix).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Artifact sync state (pending, syncing, synced, failed) of one task or of all."""
    found: list[ArtifactStatus] = with_client(lambda c: c.artifact_status(task_id))
    if as_json:
        print(json.dumps([s.model_dump(mode="json") for s in found], indent=2))
        return
    if not found and task_id:
        err.print(f"no artifact sync recorded for task {task_id}")
        raise typer.Exit(4)
    if not found:
        err.print("no artifact sync recorded (is TP_ARTIFACT_BACKEND set on the desktop?)")
        return
    table = Table("task id", "state", "files", "bytes", "tries", "location", "updated", "error")
    for s in found:
        table.add_row(*_row(s))
    out.print(table)
    if any(s.state.value == "failed" for s in found):
        raise typer.Exit(1)


@artifacts_app.command("sync")
def sync(task_id: str) -> None:
    """Queue a (re)sync of a task's folder, e.g. after a failed sync."""
    full = with_client(lambda c: c.request_artifact_sync(task_id))
    out.print(f"artifact sync of {full} queued", highlight=False, markup=False)
