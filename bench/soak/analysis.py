"""Reading the tasks' records, histories and the services' logs, and the verdict's numbers.

* lost: a task that is missing or not terminal at the end;
* completed twice: a task whose history moves into ``completed`` more than once, that more than
  one worker log line says completed, or whose probe ran to completion in a run whose outcome was
  then refused (``task_outcome_not_recorded`` with outcome ``completed`` in a worker log: a late
  duplicate finish).
"""

from __future__ import annotations

import contextlib
import json
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.keys import Keys

from .constants import TERMINAL

#: Tasks per Redis pipeline round trip when collecting (two commands each).
COLLECT_BATCH = 500
#: Log lines kept per kind of warning or error, as examples.
SAMPLES_PER_PROBLEM = 3


async def collect(
    r: Any, keys: Keys, ids: list[str]
) -> tuple[dict[str, dict[str, str]], dict[str, list[dict[str, Any]]]]:
    """Every task's record (hash) and history."""
    records: dict[str, dict[str, str]] = {}
    histories: dict[str, list[dict[str, Any]]] = {}
    for i in range(0, len(ids), COLLECT_BATCH):
        chunk = ids[i : i + COLLECT_BATCH]
        async with r.pipeline(transaction=False) as pipe:
            for task_id in chunk:
                pipe.hgetall(keys.task(task_id))
                pipe.lrange(keys.history(task_id), 0, -1)
            rows = await pipe.execute()
        for j, task_id in enumerate(chunk):
            records[task_id] = rows[2 * j]
            histories[task_id] = [json.loads(x) for x in rows[2 * j + 1]]
    return records, histories


# --------------------------------------------------------------------------------------------
# Logs


@dataclass
class _LogScan:
    """Counts and kept lines of the services' logs, filled line by line."""

    events: Counter[str] = field(default_factory=Counter)
    problems: Counter[str] = field(default_factory=Counter)
    samples: defaultdict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    completed_by_task: Counter[str] = field(default_factory=Counter)
    refused: list[dict[str, Any]] = field(default_factory=list)
    abandoned: list[dict[str, Any]] = field(default_factory=list)
    unparsed: list[str] = field(default_factory=list)
    child_tracebacks: int = 0
    completions_by_file: Counter[str] = field(default_factory=Counter)
    first_completion: dict[str, str] = field(default_factory=dict)
    raw_exceptions: Counter[str] = field(default_factory=Counter)

    def add_text(self, file: str, raw: str) -> None:
        """A line that is not a JSON object: a traceback from a process's stderr, or noise."""
        if raw.strip():
            self.unparsed.append(f"{file}: {raw[:300]}")
        if raw.startswith("Process ForkServerProcess-"):
            self.child_tracebacks += 1
        elif raw and not raw[0].isspace() and raw.split(":", 1)[0].endswith("Error"):
            self.raw_exceptions[raw[:120]] += 1

    def add_event(self, file: str, raw: str, line: dict[str, Any]) -> None:
        """A structured log line."""
        event = str(line.get("event", ""))
        self.events[event] += 1
        level = line.get("level", "")
        if level in ("warning", "error", "critical"):
            key = f"{line.get('service', '?')} {level} {event}"
            self.problems[key] += 1
            if len(self.samples[key]) < SAMPLES_PER_PROBLEM:
                self.samples[key].append(f"{file}: {raw[:600]}")
        if event == "task_completed" and line.get("task_id"):
            self.completed_by_task[str(line["task_id"])] += 1
            self.completions_by_file[file] += 1
            self.first_completion.setdefault(file, str(line.get("timestamp", "")))
        elif event == "task_outcome_not_recorded":
            self.refused.append({"file": file, **line})
        elif event == "task_abandoned":
            self.abandoned.append({"file": file, **line})

    def as_dict(self) -> dict[str, Any]:
        return {
            "events": self.events,
            "problems": self.problems,
            "samples": dict(self.samples),
            "completed_by_task": self.completed_by_task,
            "refused": self.refused,
            "abandoned": self.abandoned,
            "unparsed": self.unparsed,
            "child_tracebacks": self.child_tracebacks,
            "completions_by_file": self.completions_by_file,
            "first_completion": self.first_completion,
            "raw_exceptions": self.raw_exceptions,
        }


def _json_object(raw: str) -> dict[str, Any] | None:
    """The line as a JSON object, or None if it is not one."""
    try:
        line = json.loads(raw)
    except ValueError:
        return None
    return line if isinstance(line, dict) else None


def scan_logs(log_dir: Path) -> dict[str, Any]:
    """Count the services' log events; keep the lines that matter for the verdict."""
    scan = _LogScan()
    for path in sorted(log_dir.glob("*.log")):
        for raw in path.read_text(errors="replace").splitlines():
            line = _json_object(raw)
            if line is None:
                scan.add_text(path.name, raw)
            else:
                scan.add_event(path.name, raw, line)
    return scan.as_dict()


# --------------------------------------------------------------------------------------------
# Records and histories


def lost_kind(rec: dict[str, str], now: float) -> str:
    """Why a task is not terminal: waiting, running under a live lease, or stuck."""
    state = rec.get("state", "missing")
    if state in {"running", "cancelling"}:
        lease = float(rec.get("lease_until") or 0)
        return f"{state}, lease live" if lease > now else f"{state}, LEASE EXPIRED (not reaped)"
    if state == "queued" and rec.get("retry_at"):
        return "queued, dispatch due" if float(rec["retry_at"]) <= now else "queued, retry later"
    return state


@dataclass
class _Tally:
    """Per-task findings, summed over the tasks."""

    states: Counter[str] = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)
    lost_kinds: Counter[str] = field(default_factory=Counter)
    doubled_history: list[str] = field(default_factory=list)
    stale_completion: list[str] = field(default_factory=list)
    runs: Counter[str] = field(default_factory=Counter)
    runs_max: int = 0
    reaper: Counter[str] = field(default_factory=Counter)
    resumed: int = 0
    finished_earlier: int = 0
    latencies: list[float] = field(default_factory=list)
    failed_errors: Counter[str] = field(default_factory=Counter)

    def add(
        self, task_id: str, rec: dict[str, str], hist: list[dict[str, Any]], now: float
    ) -> None:
        """One task's record and history (``now``: Redis time, to judge leases)."""
        state = rec.get("state", "missing")
        self.states[state] += 1
        if state not in TERMINAL:
            self.lost.append(task_id)
            self.lost_kinds[lost_kind(rec, now)] += 1
        if state == "failed":
            self.failed_errors[rec.get("error", "")[:120]] += 1
        if sum(1 for h in hist if h.get("to") == "completed") > 1:
            self.doubled_history.append(task_id)
        n_runs = sum(1 for h in hist if h.get("to") == "running")
        self.runs_max = max(self.runs_max, n_runs)
        self.runs[str(n_runs) if n_runs < 3 else "3+"] += 1
        self._follow_owner(task_id, hist)
        if state == "completed":
            self._add_completed(rec)

    def _follow_owner(self, task_id: str, hist: list[dict[str, Any]]) -> None:
        """Count the reaper's moves; note a completion by other than the last claimer."""
        owner = None
        for h in hist:
            if h.get("to") == "running":
                owner = h.get("by")
            elif h.get("by") == "reaper":
                self.reaper[f"{h.get('from')}->{h.get('to')}"] += 1
                owner = None
            elif h.get("to") == "completed" and h.get("by") != owner:
                self.stale_completion.append(task_id)

    def _add_completed(self, rec: dict[str, str]) -> None:
        """Resumption from a checkpoint and latency of a completed probe."""
        result = json.loads(rec.get("result") or "{}")
        metrics = result.get("metrics", {})
        if metrics.get("resumed_from_step", 0) > 0:
            self.resumed += 1
            if metrics.get("resumed_from_step") >= metrics.get("steps", 1):
                self.finished_earlier += 1
        with contextlib.suppress(KeyError, ValueError):
            self.latencies.append(float(rec["completed_at"]) - float(rec["submitted_at"]))


def _latency_summary(latencies: list[float]) -> dict[str, float | None]:
    """Percentiles, max and mean of the latencies (s, rounded to 10 ms; None when empty)."""
    ordered = sorted(latencies)

    def pct(p: float) -> float | None:
        if not ordered:
            return None
        return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))], 2)

    return {
        "p50": pct(0.5),
        "p90": pct(0.9),
        "p99": pct(0.99),
        "max": round(ordered[-1], 2) if ordered else None,
        "mean": round(statistics.fmean(ordered), 2) if ordered else None,
    }


def analyse(
    ids: list[str],
    records: dict[str, dict[str, str]],
    histories: dict[str, list[dict[str, Any]]],
    logs: dict[str, Any],
    now: float,
) -> dict[str, Any]:
    """The verdict's numbers, from records, histories and logs."""
    t = _Tally()
    for task_id in ids:
        t.add(task_id, records.get(task_id) or {}, histories.get(task_id, []), now)
    logged_twice = sorted(k for k, n in logs["completed_by_task"].items() if n > 1)
    refused = logs["refused"]
    refused_completions = sorted(
        {str(x.get("task_id")) for x in refused if x.get("outcome") == "completed"}
    )
    return {
        "states": dict(t.states),
        "lost": t.lost,
        "lost_kinds": dict(t.lost_kinds),
        "completed_twice": sorted(
            set(t.doubled_history) | set(logged_twice) | set(refused_completions)
        ),
        "completed_twice_in_history": t.doubled_history,
        "completed_twice_in_logs": logged_twice,
        "late_duplicate_finishes_refused": len(refused),
        "late_duplicate_finishes_refused_by_outcome": dict(
            Counter(f"{x.get('outcome')} (found {x.get('found')})" for x in refused)
        ),
        "refused_completion_tasks": refused_completions,
        "completion_by_other_than_last_claimer": sorted(set(t.stale_completion)),
        "runs_per_task": dict(t.runs),
        "runs_max": t.runs_max,
        "reaper_moves": dict(t.reaper),
        "abandoned_runs": len(logs["abandoned"]),
        "completed_resumed_from_checkpoint": t.resumed,
        "completed_all_steps_in_an_earlier_lost_run": t.finished_earlier,
        "failed_errors": dict(t.failed_errors),
        "latency_s": _latency_summary(t.latencies),
    }
