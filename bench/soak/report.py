"""The soak's report: the figures as one dict (written as JSON), and the printed table."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

from shared.settings import Settings

from .analysis import analyse, scan_logs
from .constants import SOAK_SERVICE_ENV
from .load import LoadResult
from .processes import Fleet, Incarnation

#: Problems of each kind shown in full under the table.
DETAILS_PER_KIND = 10


def problem_details(
    a: dict[str, Any], load: LoadResult, logs: dict[str, Any], fleet: Fleet
) -> list[str]:
    """Lines showing each problem found: histories, log lines, exits."""
    histories, records = load.histories, load.records
    details: list[str] = []
    for task_id in a["completed_twice"][:DETAILS_PER_KIND]:
        details.append(f"completed twice: {task_id}")
        details.extend(f"    history {h}" for h in histories.get(task_id, []))
        details.extend(
            f"    log {x['file']}: {json.dumps({k: v for k, v in x.items() if k != 'file'})}"
            for x in logs["refused"]
            if x.get("task_id") == task_id
        )
    for task_id in a["lost"][:DETAILS_PER_KIND]:
        rec = records.get(task_id) or {}
        details.append(
            f"lost: {task_id} state={rec.get('state', 'missing')} worker={rec.get('worker')} "
            f"attempts={rec.get('attempts')}"
        )
        details.extend(f"    history {h}" for h in histories.get(task_id, [])[-6:])
    details.extend(
        f"refused outcome: {x['file']}: {json.dumps(x)}" for x in logs["refused"][:DETAILS_PER_KIND]
    )
    for task_id in a["completion_by_other_than_last_claimer"][:5]:
        details.append(f"completed by other than last claimer: {task_id}")
        details.extend(f"    history {h}" for h in histories.get(task_id, []))
    details.extend(f"unexpected exit: {x}" for x in fleet.unexpected_exits)
    details.extend(f"lingering after kill: {x}" for x in fleet.lingering_after_kill[:10])
    if logs["unparsed"]:
        details.append(f"{len(logs['unparsed'])} log lines were not JSON, e.g.:")
        details.extend(f"    {u}" for u in logs["unparsed"][:5])
    return details


def _run_figures(
    args: argparse.Namespace, s: Settings, load: LoadResult, a: dict[str, Any]
) -> dict[str, Any]:
    """What was asked for and what was submitted."""
    st = load.st
    return {
        "namespace": s.namespace,
        "settings_note": "TP_LEASE_S=3 TP_REAPER_INTERVAL_S=0.5 TP_MAX_ATTEMPTS=20"
        + (f" TP_WORKER_PRELOAD={args.preload}" if args.preload is not None else ""),
        "service_env": SOAK_SERVICE_ENV,
        "tasks": args.tasks,
        "workers": args.workers,
        "kill_every_s": args.kill_every,
        "seed": args.seed,
        "submitted": len(st.submitted),
        "submit_errors": st.submit_errors,
        "submit_failed": st.submit_failed,
        "analysis": a,
    }


def _first_completion_after_s(workers: list[Incarnation], logs: dict[str, Any]) -> list[float]:
    """For each worker incarnation that completed a task: seconds from its start to the first."""
    first_done = []
    for inc in workers:
        stamp = logs["first_completion"].get(inc.log_path.name)
        if stamp:
            first_done.append(datetime.fromisoformat(stamp).timestamp() - inc.started_wall)
    return first_done


def _fleet_figures(fleet: Fleet, logs: dict[str, Any]) -> dict[str, Any]:
    """Kills, worker incarnations, readiness and what outlived a kill."""
    workers = [i for i in fleet.history if i.role == "worker"]
    ready_times = [i.ready_after_s for i in workers if i.ready_after_s is not None]
    first_done = _first_completion_after_s(workers, logs)
    first_note = (
        f"{statistics.median(first_done):.1f} s median, {min(first_done):.1f} s min"
        if first_done
        else "-"
    )
    lingering = fleet.lingering_after_kill
    return {
        "kills": len(fleet.kills),
        "kills_before_ready": sum(1 for k in fleet.kills if not k["was_ready"]),
        "worker_incarnations": f"{len(workers)} / {len(ready_times)}",
        "ready_s": (
            f"{statistics.median(ready_times):.1f} / {max(ready_times):.1f}" if ready_times else "-"
        ),
        "incarnations_that_completed": (
            f"{len(first_done)} of {len(workers)}; first completion after {first_note}"
        ),
        "completions_per_incarnation_max": max(logs["completions_by_file"].values(), default=0),
        "lingering_after_kill": len(lingering),
        "lingering_after_kill_detail": lingering,
        "lingering_kinds": dict(
            Counter(d.split(" ", 1)[1].split(" (")[0] for x in lingering for d in x["pids"])
        ),
        "unexpected_exits": fleet.unexpected_exits,
    }


def _end_figures(load: LoadResult, end: dict[str, Any], completed: int) -> dict[str, Any]:
    """How the services stopped, what was left, and the timings."""
    st, wall = load.st, load.wall_s
    return {
        "stop_exit_codes": end["codes"],
        "stray_processes": end["stray"] or 0,
        "queues_at_end": {k.split(".", 1)[1]: v["messages"] for k, v in end["queues"].items()},
        "gave_up": load.gave_up or "no",
        "submit_s": round(st.submit_done_s, 1) if st.submit_done_s else None,
        "wall_s": round(wall, 1),
        "total_s": round(time.monotonic() - end["t_total"], 1),
        "throughput_per_s": round(completed / wall, 2) if wall > 0 else None,
    }


def _log_figures(log_dir: Path, logs: dict[str, Any]) -> dict[str, Any]:
    """Where the logs are and what they said."""
    return {
        "log_dir": str(log_dir),
        "log_events": dict(logs["events"]),
        "log_problems": dict(logs["problems"]),
        "child_tracebacks": logs["child_tracebacks"],
        "raw_exceptions": dict(logs["raw_exceptions"]),
        "log_problem_samples": logs["samples"],
        "refused_lines": logs["refused"],
    }


def build_report(
    args: argparse.Namespace,
    s: Settings,
    fleet: Fleet,
    load: LoadResult,
    end: dict[str, Any],
) -> dict[str, Any]:
    """Everything the table and the JSON show.

    ``end``: ``codes`` (exit codes of the final stop), ``stray`` (processes left after it),
    ``queues`` (their counts then) and ``t_total`` (monotonic time the soak began).
    """
    logs = scan_logs(fleet.log_dir)
    a = analyse(load.st.ids, load.records, load.histories, logs, load.redis_now)
    bad = bool(a["lost"]) or bool(a["completed_twice"])
    verdict = "FAIL" if bad else "PASS"
    if bad:
        verdict += f" ({len(a['lost'])} lost, {len(a['completed_twice'])} completed twice)"
    return {
        **_run_figures(args, s, load, a),
        **_fleet_figures(fleet, logs),
        **_end_figures(load, end, a["states"].get("completed", 0)),
        **_log_figures(fleet.log_dir, logs),
        "details": problem_details(a, load, logs, fleet),
        "verdict": verdict,
        "failed": bad,
    }


def _task_rows(report: dict[str, Any]) -> list[tuple[str, Any]]:
    """The table's rows about the tasks: what happened to them."""
    a = report["analysis"]
    st = a["states"]
    return [
        ("namespace", report["namespace"]),
        ("settings", report["settings_note"]),
        ("tasks", report["tasks"]),
        ("workers", report["workers"]),
        ("kill every (s, +-30 %)", report["kill_every_s"]),
        ("submitted", report["submitted"]),
        ("submit errors (retried)", report["submit_errors"]),
        ("completed", st.get("completed", 0)),
        ("failed", st.get("failed", 0)),
        ("cancelled", st.get("cancelled", 0)),
        ("LOST (missing or not terminal)", len(a["lost"])),
        ("  by state at the end", a["lost_kinds"] or "-"),
        ("COMPLETED TWICE (total)", len(a["completed_twice"])),
        ("  history: >1 move into completed", len(a["completed_twice_in_history"])),
        ("  logs: >1 task_completed line", len(a["completed_twice_in_logs"])),
        ("  refused late finish of a completed run", len(a["refused_completion_tasks"])),
        ("late duplicate finishes (refused)", a["late_duplicate_finishes_refused"]),
        ("  by outcome", a["late_duplicate_finishes_refused_by_outcome"] or "-"),
        ("completed by other than last claimer", len(a["completion_by_other_than_last_claimer"])),
        ("runs abandoned (lease lost)", a["abandoned_runs"]),
        ("runs per task (claims in history)", a["runs_per_task"]),
        ("most runs of one task", a["runs_max"]),
        ("reaper moves", a["reaper_moves"] or "-"),
        ("probe resumed from checkpoint", a["completed_resumed_from_checkpoint"]),
        (
            "  all steps done in an earlier lost run",
            a["completed_all_steps_in_an_earlier_lost_run"],
        ),
    ]


def _process_rows(report: dict[str, Any]) -> list[tuple[str, Any]]:
    """The table's rows about the processes, what was left, and the timings."""
    return [
        ("kills performed", report["kills"]),
        ("  of a worker not yet ready", report["kills_before_ready"]),
        ("worker incarnations / ever ready", report["worker_incarnations"]),
        ("time to worker_ready s (median/max)", report["ready_s"]),
        ("incarnations that completed a task", report["incarnations_that_completed"]),
        ("killed workers' processes left >3 s", report["lingering_after_kill"]),
        ("  what was left", report["lingering_kinds"] or "-"),
        ("task children that outlived their worker", report["child_tracebacks"]),
        ("  (raw tracebacks in worker logs; last lines)", report["raw_exceptions"] or "-"),
        ("unexpected service exits", len(report["unexpected_exits"])),
        ("stray processes at the end", report["stray_processes"]),
        ("queues at the end", report["queues_at_end"]),
        ("gave up early (deadline / stall)", report["gave_up"]),
        ("latency submit->completed s", report["analysis"]["latency_s"]),
        ("submit phase s", report["submit_s"]),
        ("wall time s (first submit -> all terminal)", report["wall_s"]),
        ("total run time s (incl. start-up, stop)", report["total_s"]),
        ("throughput (completed / wall s)", report["throughput_per_s"]),
        ("logs", report["log_dir"]),
    ]


def print_report(report: dict[str, Any]) -> None:
    """The table, then failed tasks' errors, log problem samples, details and the verdict."""
    rows = _task_rows(report) + _process_rows(report)
    width = max(len(k) for k, _ in rows)
    print("\n" + "=" * 100)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print("=" * 100)
    if report["analysis"]["failed_errors"]:
        print("failed tasks' errors:", report["analysis"]["failed_errors"])
    for key, lines in report["log_problem_samples"].items():
        print(f"log {key} x{report['log_problems'][key]}, e.g.:")
        for line in lines:
            print(f"    {line}")
    for detail in report["details"]:
        print(detail)
    print(f"VERDICT: {report['verdict']}", flush=True)


def write_json(report: dict[str, Any], path: str) -> None:
    """The whole report as indented JSON (values JSON cannot hold are written as strings)."""
    Path(path).write_text(json.dumps(report, indent=2, default=str) + "\n")
