"""``tradectl worker ...``: see the gpu-workers, drain and stop them, start one.

``status`` reads the heartbeats the workers write to Redis (the dashboard's data); ``stop`` sends
a drain request over the control exchange (``worker.<name>.drain`` / ``worker.all.drain``), which
a worker handles exactly as SIGTERM; ``start`` runs a worker here or starts its systemd unit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from shared.cli.common import JsonOpt, err, fail, out, with_client
from shared.client import DistributedClient
from shared.health import GpuReport, ServiceState, ServiceStatus, WorkerFacts

worker_app = typer.Typer(help="gpu-workers: status, drain and stop, start.", no_args_is_help=True)

#: The worker's systemd unit when none is named.
DEFAULT_UNIT = "trading-worker@0.service"
#: How long ``systemctl start`` may take (s): it returns once the unit has started.
SYSTEMCTL_TIMEOUT_S = 120.0
#: Default wait of ``worker stop`` (s): the desktop's drain timeout (60 s by default) plus the
#: stop grace of a handed-back task (10 s) and the time to record it, with room to spare.
STOP_WAIT_S = 300.0

_STATE_COLOURS = {
    ServiceState.ONLINE: "green",
    ServiceState.BUSY: "yellow",
    ServiceState.DRAINING: "magenta",
    ServiceState.OFFLINE: "red",
}
_GIB = 1024**3

#: What ``worker stop`` learns: the workers asked to drain, those still alive after the wait,
#: and (when none was asked) every known worker, to name them in the error.
_DrainOutcome = tuple[list[ServiceStatus], list[ServiceStatus], list[ServiceStatus]]


def duration(seconds: float) -> str:
    """``42 s``, ``12 min``, ``3.5 h`` or ``2.1 d`` for a span in seconds."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def uptime_s(worker: ServiceStatus) -> float:
    """Seconds the worker has run: until now if it is alive, else until its last heartbeat."""
    beat = worker.heartbeat
    alive = worker.state is not ServiceState.OFFLINE
    return beat.uptime_s + (worker.age_s if alive else 0.0)


def worker_json(worker: ServiceStatus) -> dict[str, Any]:
    """A worker for ``--json``: name, state, ages and its whole last heartbeat."""
    return {
        "name": worker.heartbeat.name,
        "state": worker.state.value,
        "age_s": round(worker.age_s, 3),
        "uptime_s": round(uptime_s(worker), 3),
        "heartbeat": worker.heartbeat.model_dump(mode="json"),
    }


def describe_gpus(report: GpuReport) -> str:
    """One line per GPU (name, memory used/total in GiB, utilisation, temperature), or why none."""
    if not report.gpus:
        return report.error or "no GPU"
    lines = []
    for gpu in report.gpus:
        line = (
            f"{gpu.index}: {gpu.name} {gpu.memory_used_bytes / _GIB:.1f}/"
            f"{gpu.memory_total_bytes / _GIB:.1f} GiB"
        )
        if gpu.utilization_pct is not None:
            line += f" {gpu.utilization_pct:.0f}%"
        if gpu.temperature_c is not None:
            line += f" {gpu.temperature_c:.0f}°C"
        lines.append(line)
    return "\n".join(lines)


def describe_tasks(facts: WorkerFacts, now: float) -> str:
    """One line per running task: short id, type, lane and how long it has run."""
    return "\n".join(
        f"{t.task_id[:12]} {t.task_type} ({t.lane}, {duration(max(0.0, now - t.started_at))})"
        for t in facts.running
    )


def describe_slots(facts: WorkerFacts) -> str:
    """``gpu 1, cpu 2`` and how many of them are taken."""
    slots = ", ".join(f"{lane} {n}" for lane, n in sorted(facts.slots.items()))
    return f"{slots or 'none'} ({len(facts.running)} busy)"


def worker_table(workers: list[ServiceStatus]) -> Table:
    """The workers as a rich table (text from outside escaped)."""
    table = Table("worker", "state", "host", "pid", "version", "commit", "uptime", "slots")
    for column in ("running", "GPU", "last heartbeat"):
        table.add_column(column)
    now = time.time()
    for w in workers:
        beat = w.heartbeat
        facts = beat.worker or WorkerFacts(slots={})
        colour = _STATE_COLOURS[w.state]
        table.add_row(
            escape(beat.name),
            f"[{colour}]{w.state.value}[/{colour}]",
            escape(beat.host),
            str(beat.pid),
            escape(beat.version),
            (beat.code_commit or "-")[:12],
            duration(uptime_s(w)),
            describe_slots(facts),
            escape(describe_tasks(facts, now)) or "-",
            escape(describe_gpus(facts.gpu)),
            f"{w.age_s:.1f} s ago",
        )
    return table


@worker_app.command("status")
def status(as_json: JsonOpt = False) -> None:
    """Each worker's state (online, busy, draining, offline), host, pid, commit, tasks, GPUs.

    Also its version, uptime and slots. Offline workers stay listed for a day. Exit 1 when no
    worker is alive (none known, or every one offline).
    """
    workers: list[ServiceStatus] = with_client(lambda c: c.workers())
    if as_json:
        print(json.dumps([worker_json(w) for w in workers], indent=2))
    elif not workers:
        err.print("no worker has sent a heartbeat: is a gpu-worker running?", markup=False)
    else:
        out.print(worker_table(workers))
    if all(w.state is ServiceState.OFFLINE for w in workers):
        raise typer.Exit(1)


@worker_app.command("stop")
def stop(
    name: Annotated[str | None, typer.Argument(help="The worker's name (TP_WORKER_NAME).")] = None,
    all_workers: Annotated[bool, typer.Option("--all", help="Drain every worker.")] = False,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Wait until the workers have stopped.")
    ] = True,
    timeout: Annotated[
        float, typer.Option(min=0, help="Wait at most this long (s).")
    ] = STOP_WAIT_S,
    as_json: JsonOpt = False,
) -> None:
    """Drain a worker (or every one with --all) and let it exit, as SIGTERM does.

    The worker stops consuming, lets its running tasks finish within the desktop's
    TP_DRAIN_TIMEOUT_S, else hands them back to the queue (attempt not counted), then exits 0;
    the other workers keep serving. Exit 4 when no worker of that name is online, 124 when
    --timeout passed while a worker was still draining, 1 when a worker's heartbeat expired
    without a clean stop (killed or paused mid-drain).
    """
    if (name is None) == (not all_workers):
        fail("name one worker or pass --all", 2)
    outcome = with_client(lambda c: _drain(c, name, wait=wait, timeout_s=timeout, quiet=as_json))
    targets, alive, known = outcome  # known: every worker (no target) or the lost ones
    names = [w.heartbeat.name for w in targets]
    lost = known if targets else []
    if as_json:
        left = {w.heartbeat.name for w in [*alive, *lost]}
        stopped = [n for n in names if n not in left] if wait else []
        lost_names = [w.heartbeat.name for w in lost]
        body = {"requested": names, "stopped": stopped, "lost": lost_names, "waited": wait}
        print(json.dumps(body, indent=2))
    if not targets and name is not None:
        listed = ", ".join(f"{w.heartbeat.name} ({w.state.value})" for w in known) or "none"
        fail(f"no worker named {name!r} is online (known workers: {listed})", 4)
    if not targets:
        err.print("no worker is online: nothing to drain", markup=False)
    elif wait and alive:
        fail(f"still draining after {timeout:g} s: {', '.join(_label(w) for w in alive)}", 124)
    elif wait and lost:
        gone = ", ".join(w.heartbeat.name for w in lost)
        fail(
            f"lost, not stopped: {gone} (its heartbeat expired without a clean stop: killed, or "
            "paused; its tasks come back when their leases expire)",
            1,
        )
    elif wait and not as_json:
        out.print(f"stopped: {', '.join(names)}", markup=False, highlight=False)


async def _drain(
    client: DistributedClient, name: str | None, *, wait: bool, timeout_s: float, quiet: bool
) -> _DrainOutcome:
    """Ask ``name`` (None: all) to drain, say so unless ``quiet``, and wait if asked."""
    targets = await client.drain_workers(name)
    if not targets:
        return targets, [], await client.workers()
    if not quiet:
        for w in targets:
            out.print(f"drain requested: {_label(w)}", markup=False, highlight=False)
    if not wait:
        return targets, targets, []
    alive = await client.wait_workers_stopped(targets, timeout_s=timeout_s)
    wanted = {(w.heartbeat.name, w.heartbeat.pid, w.heartbeat.started_at) for w in targets}
    # Gone without saying "stopped": killed, or paused past its TTL (SIGSTOP), mid-drain.
    lost = [
        w
        for w in await client.workers()
        if (w.heartbeat.name, w.heartbeat.pid, w.heartbeat.started_at) in wanted
        and w.state is ServiceState.OFFLINE
        and not w.heartbeat.stopped
    ]
    return targets, alive, lost


def _label(worker: ServiceStatus) -> str:
    """``name`` with the tasks it runs, for drain messages."""
    facts = worker.heartbeat.worker
    running = [t.task_id[:12] for t in facts.running] if facts else []
    return worker.heartbeat.name + (f" (running {', '.join(running)})" if running else "")


@worker_app.command("start")
def start(
    systemd: Annotated[
        bool, typer.Option("--systemd", help="Start the worker's systemd unit instead.")
    ] = False,
    unit: Annotated[
        str | None,
        typer.Option(help=escape(f"The unit to start with --systemd [default: {DEFAULT_UNIT}].")),
    ] = None,
    user: Annotated[
        bool, typer.Option("--user", help="With --systemd: a user unit (systemctl --user).")
    ] = False,
    name: Annotated[
        str | None, typer.Option(help="Worker name (sets TP_WORKER_NAME) for a worker run here.")
    ] = None,
) -> None:
    """Run a gpu-worker here in the foreground, or start its systemd unit with --systemd.

    In the foreground tradectl becomes the worker (``python -m services.gpu_worker``, same
    environment and TP_* settings); Ctrl-C or SIGTERM drains it. With --systemd it runs
    ``systemctl start UNIT`` and exits 1 with systemctl's message when that fails.
    """
    if systemd:
        if name is not None:
            fail("--name sets the name of a worker run here; a unit takes its own settings", 2)
        start_unit(unit or DEFAULT_UNIT, user=user)
        return
    if unit is not None or user:
        fail("--unit and --user go with --systemd", 2)
    env = dict(os.environ)
    if name is not None:
        env["TP_WORKER_NAME"] = name
    argv = [sys.executable, "-m", "services.gpu_worker"]
    sys.stdout.flush()
    sys.stderr.flush()
    # exec, not a child: signals from the terminal or a supervisor reach the worker itself.
    os.execve(sys.executable, argv, env)  # noqa: S606 - fixed argv, no shell


def start_unit(unit: str, *, user: bool) -> None:
    """``systemctl [--user] start UNIT``; exit 1 naming the problem when it cannot or fails."""
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        fail(
            "systemctl not found: this machine does not run systemd; run "
            "`tradectl worker start` without --systemd to run a worker here",
            1,
        )
    scope = ["--user"] if user else []
    command = [systemctl, *scope, "--no-ask-password", "start", "--", unit]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=SYSTEMCTL_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        fail(f"systemctl start {unit} did not return within {SYSTEMCTL_TIMEOUT_S:g} s", 1)
    except OSError as e:
        fail(f"cannot run systemctl: {e}", 1)
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip() or "no message"
        fail(f"systemctl start {unit} failed (exit {done.returncode}): {why}", 1)
    out.print(
        f"started {unit}; `tradectl worker status` shows the worker once it sends a heartbeat",
        markup=False,
        highlight=False,
    )
