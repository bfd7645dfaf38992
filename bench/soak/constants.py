"""The soak's fixed values, each with the reason for it."""

from pathlib import Path

#: The repository root: services start there, results go under ``bench/results``.
ROOT = Path(__file__).resolve().parents[2]

#: Short leases so a killed worker's task is reaped within ~3.5 s, and enough attempts that a
#: task hit by many kills still finishes (the product default is 3).
SOAK_SERVICE_ENV = {
    "TP_LEASE_S": "3",
    "TP_REAPER_INTERVAL_S": "0.5",
    "TP_MAX_ATTEMPTS": "20",
    # Only for the final graceful stop: a draining worker waits at most this long.
    "TP_DRAIN_TIMEOUT_S": "5",
    "TP_CANCEL_GRACE_S": "2",
}

#: States a task never leaves; one in any other state at the end is lost.
TERMINAL = frozenset({"completed", "failed", "cancelled"})

#: Environment variable that tags every process of one service incarnation (and its children).
INCARNATION_VAR = "SOAK_INCARNATION"

#: A killed worker's processes still alive this long after the kill are reported as lingering.
LINGER_S = 3.0
