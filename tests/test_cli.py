"""``tradectl`` without a scheduler or worker: dynamic text printed literally, --set, options.

Commands run as real processes (``python -m shared.cli``) against the test's namespace; records
are written straight into Redis with ``StatusStore`` where a test needs a task in some state.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from typing import Any

import pytest
import typer

from shared.cli import parse_config, parse_set_value, print_event
from shared.messages import EventKind, TaskEvent, TaskState, TaskSubmission
from shared.settings import Settings
from shared.store import StatusStore
from tests.conftest import service_env, tradectl

#: Text rich would take as markup: a closing tag with no opening one, and a style-like range.
BRACKETED_ERROR = "cannot read [/data/x.csv]: bad pattern [a-z] in [bold red]column[/bold red]"


def plain_env(**extra: str) -> dict[str, str]:
    """The current environment without TP_ variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TP_")}
    env.update(extra)
    return env


async def _make_record(
    settings: Settings,
    state: TaskState,
    fields: dict[str, str | int | float] | None = None,
    task_type: str = "probe",
) -> str:
    store = StatusStore(settings)
    await store.start()
    try:
        task_id = str(uuid.uuid4())
        submission = TaskSubmission(
            task_id=task_id, task_type=task_type, submitted_at=time.time(), config={}
        )
        assert await store.create(submission)
        if state is not TaskState.SUBMITTED:
            moved = await store.transition(task_id, [TaskState.SUBMITTED], state, fields=fields)
            assert moved.applied
        return task_id
    finally:
        await store.stop()


def make_record(
    settings: Settings,
    state: TaskState,
    fields: dict[str, str | int | float] | None = None,
) -> str:
    return asyncio.run(_make_record(settings, state, fields))


# --- dynamic text is printed literally, never as rich markup ------------------------------------


def test_failed_task_error_with_brackets_is_printed_literally(settings: Settings) -> None:
    task_id = make_record(
        settings, TaskState.FAILED, {"error": BRACKETED_ERROR, "worker": "box[1]"}
    )
    env = service_env(settings)
    for command, code in (("status", 0), ("result", 1)):
        proc = tradectl("task", command, task_id, env=env)
        assert proc.returncode == code, proc.stderr
        assert "MarkupError" not in proc.stderr
        assert BRACKETED_ERROR in proc.stdout
        assert "worker=box[1]" in proc.stdout


def test_metrics_artifacts_and_list_rows_are_printed_literally(settings: Settings) -> None:
    result = {
        "metrics": {"loss[val]": 0.25, "[/x]": 1},
        "artifacts": ["[/data/model.pt]"],
        "mlflow_run_id": "run[/1]",
    }
    task_id = make_record(
        settings, TaskState.COMPLETED, {"result": json.dumps(result), "worker": "gpu[/0]"}
    )
    env = service_env(settings)
    proc = tradectl("task", "result", task_id, env=env)
    assert proc.returncode == 0, proc.stderr
    for text in ("loss[val]", "[/x]", "artifacts [/data/model.pt]", "mlflow run run[/1]"):
        assert text in proc.stdout
    listed = tradectl("task", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    assert task_id in listed.stdout
    assert "gpu[/0]" in listed.stdout


def test_bad_setting_message_keeps_its_brackets() -> None:
    proc = tradectl("task", "list", env=plain_env(TP_NAMESPACE="BAD"))
    assert proc.returncode == 2
    assert "TP_NAMESPACE" in proc.stderr
    assert "^[a-z][a-z0-9_-]{0,39}$" in proc.stderr


def test_error_message_with_closing_tag_does_not_crash(settings: Settings) -> None:
    proc = tradectl("task", "submit", "x[/y]", env=service_env(settings))
    assert proc.returncode == 2, proc.stderr
    assert "unknown task type 'x[/y]'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_events_are_printed_literally(capsys: pytest.CaptureFixture[str]) -> None:
    task_id = str(uuid.uuid4())
    print_event(
        TaskEvent(
            task_id=task_id,
            kind=EventKind.PROGRESS,
            state=TaskState.RUNNING,
            ts=0.0,
            progress=0.5,
            message="reading [/data/x.csv]",
        )
    )
    print_event(
        TaskEvent(
            task_id=task_id, kind=EventKind.STATE, state=TaskState.FAILED, ts=0.0, error="[a-z]"
        )
    )
    err = capsys.readouterr().err
    assert "50% reading [/data/x.csv]" in err
    assert "state failed: [a-z]" in err


# --- --set values -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("5", 5),
        ("0.5", 0.5),
        ("true", True),
        ("lstm", "lstm"),
        ("", ""),
        ("null", None),
        ("'quoted: yes'", "quoted: yes"),
        ("[1, 2]", [1, 2]),
        ("{a: 1}", {"a": 1}),
        ("@home", "@home"),  # not valid YAML: kept as typed
        ("[bold red]x", "[bold red]x"),
        ("boom: bad", "boom: bad"),  # a mapping only from {...}
        ("- a", "- a"),  # a list only from [...]
        ("2024-01-02", "2024-01-02"),  # a YAML date would not survive JSON
        ("%x", "%x"),
    ],
)
def test_set_value_parsing(raw: str, value: Any) -> None:
    assert parse_set_value(raw) == value
    assert parse_config(None, [f"key={raw}"]) == {"key": value}


def test_set_dotted_keys_and_bad_assignments() -> None:
    assert parse_config(None, ["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}
    for bad in (["novalue"], ["=1"], ["a=1", "a.b=2"]):
        with pytest.raises(typer.Exit) as info:
            parse_config(None, bad)
        assert info.value.exit_code == 2


def test_set_value_that_is_not_yaml_is_submitted_as_typed(settings: Settings) -> None:
    env = service_env(settings)
    proc = tradectl(
        "task",
        "submit",
        "probe",
        "--set",
        "fail_with=[bold red]x",
        "--set",
        "steps=2",
        "--json",
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    config = json.loads(proc.stdout)["config"]
    assert (config["fail_with"], config["steps"]) == ("[bold red]x", 2)
    proc = tradectl("task", "submit", "probe", "--set", "fail_with=boom: bad", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["config"]["fail_with"] == "boom: bad"


def test_set_value_that_is_not_yaml_is_validated_not_a_traceback(settings: Settings) -> None:
    # Refused by validation (exit 2, nothing queued), not by a YAML ParserError (exit 1).
    proc = tradectl("task", "submit", "probe", "--set", "sleep_s=@home", env=service_env(settings))
    assert proc.returncode == 2, proc.stderr
    assert "invalid probe config: sleep_s:" in proc.stderr
    assert "Traceback" not in proc.stderr


# --- options ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "-1", "-0.5"])
def test_timeout_must_be_positive(value: str) -> None:
    proc = tradectl("task", "submit", "probe", "--wait", "--timeout", value, env=plain_env())
    assert proc.returncode == 2
    assert "--timeout" in proc.stderr


def test_list_state_filter_covers_the_whole_index(settings: Settings) -> None:
    old_failed = make_record(settings, TaskState.FAILED, {"error": "old"})
    newer = [make_record(settings, TaskState.SUBMITTED) for _ in range(3)]
    env = service_env(settings)
    proc = tradectl("task", "list", "--limit", "2", "--state", "failed", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert [r["task_id"] for r in json.loads(proc.stdout)] == [old_failed]
    proc = tradectl("task", "list", "--limit", "2", "--json", env=env)
    assert [r["task_id"] for r in json.loads(proc.stdout)] == newer[::-1][:2]


def test_task_output_cannot_drive_the_laptop_terminal() -> None:
    """ESC/BEL sequences in a task's output or a dead letter's reason are shown, not obeyed."""
    from shared.cli.common import printable
    from shared.cli.tasks import log_line_text
    from shared.logstream import LogLine

    hostile = "\x1b]0;PWNED\x07 \x1b[2J\x1b[31mred\tok"
    shown = log_line_text(LogLine(ts=0.0, stream="stdout", attempt=1, text=hostile)).plain
    assert "\x1b" not in shown and "\x07" not in shown
    assert "\\x1b[2J" in shown and "\tok" in shown
    assert printable("plain text") == "plain text"
