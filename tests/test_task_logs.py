"""Live task logs: a task's output reaches a bounded Redis stream and ``tradectl task logs``.

End to end through real processes (scheduler, worker, the CLI) against the real Redis and
RabbitMQ; the child's capture runs in a real process; the writer meets a real Redis, and a port
where none listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import IO, Any

import redis.asyncio as aioredis

from shared.client import DistributedClient
from shared.constants import FINISHED_TASK_TTL_S
from shared.logstream import LogLine, LogStreamWriter, clean_text, read_after
from shared.messages import TaskState
from shared.settings import Settings
from shared.topology import Topology
from tests.conftest import ROOT, Platform, service_env, tradectl, wait_for_consumers
from tests.faults.test_outages import PrivateRedis, dump_logs

WAIT_S = 60
#: Plain output of ``task logs``: ``HH:MM:SS.mmm [stream] text``.
PLAIN_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} \[(stdout|stderr|log)\] (.*)$")
PROBE_LINE = re.compile(r"probe line (\d+)/(\d+) ts=([\d.]+)$")
#: A worker whose forkserver preloads only the probe starts in a second, not torch's few.
LIGHT_WORKER = {"TP_WORKER_PRELOAD": '["services.gpu_worker.tasks.probe"]'}


def redis_client(settings: Settings) -> aioredis.Redis:
    return aioredis.Redis.from_url(settings.redis_url, decode_responses=True)


async def blocked_readers(r: aioredis.Redis) -> int:
    """Clients blocked in ``XREAD`` right now (a follower waiting for lines)."""
    return sum(1 for c in await r.client_list() if c["cmd"] == "xread" and "b" in c["flags"])


def stamp_lines(stream: IO[str], into: list[tuple[float, str]]) -> threading.Thread:
    """Read ``stream`` line by line in a thread, noting when each line arrived (Unix s)."""

    def read() -> None:
        for line in stream:
            into.append((time.time(), line.rstrip("\n")))

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


async def test_follow_prints_each_line_within_a_second_and_ends_with_the_task(
    platform: Platform, client: DistributedClient
):
    s = platform.settings
    platform.start("scheduler")
    await wait_for_consumers(s, {Topology(s.namespace).queue("submit"): 1})
    # 60 lines 30 ms apart: several lines share each 0.1 s batch of the child's capture.
    task = await client.submit("probe", {"print_lines": 60, "print_every_s": 0.03})
    # Follow the task while it waits for a worker, so every line it prints is measured live.
    follower = subprocess.Popen(
        [sys.executable, "-m", "shared.cli", "task", "logs", task.task_id, "--follow"],
        cwd=ROOT,
        env=service_env(s),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    received: list[tuple[float, str]] = []
    reader = stamp_lines(follower.stdout, received)
    r = redis_client(s)
    try:
        deadline = time.monotonic() + 20
        while await blocked_readers(r) == 0:
            assert follower.poll() is None, follower.stderr.read()
            assert time.monotonic() < deadline, "the follower never reached XREAD BLOCK"
            await asyncio.sleep(0.05)
        platform.start("gpu_worker", **LIGHT_WORKER)
        record = await client.wait(task.task_id, timeout_s=WAIT_S)
        follower.wait(10)
        ended_at = time.time()
    finally:
        await r.aclose()
        if follower.poll() is None:
            follower.kill()
    reader.join(5)

    assert record.state is TaskState.COMPLETED
    assert follower.returncode == 0, follower.stderr.read()
    # It ends once the task has ended: within a block (0.5 s) and a CLI exit of completed_at.
    assert ended_at - record.completed_at < 3.0, ended_at - record.completed_at
    plain = [PLAIN_LINE.match(text) for _, text in received]
    assert all(plain), [text for _, text in received]
    latencies = []
    for (arrived, _text), match in zip(received, plain, strict=True):
        probe = PROBE_LINE.search(match.group(2)) if match else None
        if probe is not None:
            assert match.group(1) == "stdout"
            latencies.append((int(probe.group(1)), arrived - float(probe.group(3))))
    assert [n for n, _ in latencies] == list(range(1, 61)), received
    each = [lat for _, lat in latencies]
    worst = max(each)
    print(
        f"latency over {len(each)} lines: median {statistics.median(each):.3f} s, "
        f"max {worst:.3f} s; follower ended {ended_at - record.completed_at:.3f} s after the task"
    )
    assert worst < 1.0, latencies
    texts = [m.group(2) for m in plain if m]
    assert "probe printed 60 lines" in texts
    assert any("probe_printed" in t and "lines=60" in t for t in texts), texts
    assert texts[0] == "attempt 1 started on worker test-worker"
    assert texts[-1] == "attempt 1 ended: completed"


async def test_logs_prints_what_is_stored_json_failures_and_unknown_ids(
    platform: Platform, client: DistributedClient
):
    s = platform.settings
    await platform.start_all(**LIGHT_WORKER)
    ok = await client.submit("probe", {"print_lines": 3})
    failing = await client.submit("probe", {"print_lines": 1, "fail_with": "boom [red]x[/red]"})
    for task in (ok, failing):
        await client.wait(task.task_id, timeout_s=WAIT_S)
    env = service_env(s)

    cli = tradectl("task", "logs", ok.task_id[:8], env=env)
    assert cli.returncode == 0, cli.stderr
    shown = [PLAIN_LINE.match(line) for line in cli.stdout.splitlines()]
    assert all(shown), cli.stdout
    got = [(m.group(1), re.sub(r" ts=.*", "", m.group(2))) for m in shown if m]
    assert got[0] == ("log", "attempt 1 started on worker test-worker")
    assert got[-1] == ("log", "attempt 1 ended: completed")
    # Each stream keeps its order; stderr and log records race the last stdout lines.
    assert sorted(got[1:-1]) == [
        ("log", "[info] probe_printed [services.gpu_worker.tasks.probe] lines=3"),
        ("stderr", "probe printed 3 lines"),
        ("stdout", "probe line 1/3"),
        ("stdout", "probe line 2/3"),
        ("stdout", "probe line 3/3"),
    ]
    assert [text for stream, text in got if stream == "stdout"] == [
        f"probe line {i}/3" for i in (1, 2, 3)
    ]

    as_json = tradectl("task", "logs", ok.task_id, "--json", env=env)
    assert as_json.returncode == 0, as_json.stderr
    objects = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert len(objects) == 7
    for obj in objects:
        assert set(obj) == {"id", "ts", "stream", "attempt", "text"}
        assert obj["attempt"] == 1 and obj["stream"] in ("stdout", "stderr", "log")
        assert abs(obj["ts"] - time.time()) < 60

    # The failure, with its traceback, closes the failed run's lines; markup is printed as is.
    failed = tradectl("task", "logs", failing.task_id, env=env)
    assert failed.returncode == 0, failed.stderr
    assert "[log] attempt 1 ended: RuntimeError: boom [red]x[/red]" in failed.stdout
    assert "Traceback (most recent call last)" in failed.stdout

    unknown = tradectl("task", "logs", "no-such-task", env=env)
    assert unknown.returncode == 4, unknown.stdout + unknown.stderr
    assert tradectl("task", "logs", "no-such-task", "-f", env=env).returncode == 4

    # The stream expires with the finished task's record.
    r = redis_client(s)
    try:
        ttl = await r.ttl(client.store.keys.task_logs(ok.task_id))
    finally:
        await r.aclose()
    assert FINISHED_TASK_TTL_S - 300 < ttl <= FINISHED_TASK_TTL_S


async def test_stream_keeps_about_the_last_max_lines(platform: Platform, client: DistributedClient):
    await platform.start_all(TP_TASK_LOG_MAX_LINES="100", **LIGHT_WORKER)
    task = await client.submit("probe", {"print_lines": 900})  # under the 1,000 lines/0.1 s cap
    record = await client.wait(task.task_id, timeout_s=WAIT_S)
    assert record.state is TaskState.COMPLETED
    r = redis_client(platform.settings)
    try:
        key = client.store.keys.task_logs(task.task_id)
        length = await r.xlen(key)
        newest = await r.xrevrange(key, count=3)
    finally:
        await r.aclose()
    # MAXLEN ~ trims whole stream nodes (100 entries each by default): at most one node over.
    assert 100 <= length <= 200, length
    assert newest[0][1]["text"] == "attempt 1 ended: completed"
    lines = [line async for line in client.follow_logs(task.task_id)]
    assert len(lines) == length
    # What is kept is the newest part, without a gap.
    printed = [int(m.group(1)) for line in lines if (m := PROBE_LINE.search(line.text))]
    assert printed == list(range(901 - len(printed), 901)), printed


async def test_task_runs_on_while_redis_is_away_and_its_log_says_what_was_lost(
    settings: Settings, tmp_path: Path
):
    server = PrivateRedis(tmp_path / "redis", persist=True)
    server.start()
    private = settings.model_copy(update={"redis_url": server.url})
    platform = Platform(private, tmp_path)
    client = DistributedClient(private, name="test-client")
    try:
        await client.connect()
        await platform.start_all(**LIGHT_WORKER)
        task = await client.submit("probe", {"print_lines": 150, "print_every_s": 0.1})
        followed: list[LogLine] = []

        async def follow() -> None:
            async for line in client.follow_logs(task.task_id, follow=True):
                followed.append(line)

        follower = asyncio.create_task(follow())
        deadline = time.monotonic() + 30
        while sum(1 for line in followed if "probe line" in line.text) < 5:
            assert time.monotonic() < deadline and not follower.done(), dump_logs(platform)
            await asyncio.sleep(0.05)
        server.kill()  # longer than a write's retries: what the task prints meanwhile is lost
        await asyncio.sleep(8)
        server.start()
        await asyncio.wait_for(follower, WAIT_S)  # the follower waited the outage out
        record = await client.status(task.task_id)
        lines = [line async for line in client.follow_logs(task.task_id)]
    finally:
        platform.stop_all()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), 15)
        server.kill()

    assert record.state is TaskState.COMPLETED and record.attempts == 1, record
    assert followed == lines  # each line once, none missed
    printed = [
        (int(m.group(1)), float(m.group(3)))
        for line in lines
        if (m := PROBE_LINE.search(line.text))
    ]
    notes = [m for line in lines if (m := re.match(r"\[(\d+) lines of output lost", line.text))]
    lost = sum(int(m.group(1)) for m in notes)
    print(f"kept {len(printed)} of 150 lines, {lost} counted lost")
    assert notes and len(printed) < 150 <= len(printed) + lost, (len(printed), lost)
    assert [n for n, _ in printed] == sorted(n for n, _ in printed)
    assert printed[-1][0] == 150
    # The task never waited on Redis: it printed at its own pace through the outage.
    (first, first_ts), (last, last_ts) = printed[0], printed[-1]
    assert last_ts - first_ts < (last - first) * 0.1 + 2.0, (first_ts, last_ts)


#: In a real process: capture like a task child, write in every way a task can, print the lines.
CAPTURE_SCRIPT = textwrap.dedent(
    """
    import ctypes, json, logging, os, subprocess, sys
    import structlog
    from services.gpu_worker.capture import OutputCapture
    from shared.logging import configure_logging
    from shared.settings import Settings

    configure_logging(Settings.model_construct(log_level="info", log_format="json"), service="task")
    sent = []
    capture = OutputCapture(2, sent.append)
    capture.start()
    print("plain print, not flushed")
    os.write(1, b"raw fd write \\xff\\xfe end\\n")
    sys.stdout.write("x" * 10000 + "\\n")
    subprocess.run(["sh", "-c", "echo from a subprocess; echo its stderr >&2"], check=True)
    libc = ctypes.CDLL(None)
    libc.printf(b"from C printf\\n")
    libc.fflush(None)
    sys.stdout.write("progress\\r50%\\r100%\\r\\n")
    structlog.get_logger("services.demo").info("an_event", n=1)
    logging.getLogger("services.demo").warning("stdlib %s", "record")
    os.write(2, b"no newline at the end")
    capture.stop()
    lines = [line.as_dict() for kind, batch in sent for line in batch]
    with open(sys.argv[1], "w") as f:
        json.dump(lines, f)
    """
)


def run_capture_script(
    script: str, tmp_path: Path, name: str
) -> tuple[subprocess.CompletedProcess[bytes], Any]:
    """Run a capture script in a fresh process; its completed process and the JSON it wrote."""
    result_file = tmp_path / name
    proc = subprocess.run(
        [sys.executable, "-c", script, str(result_file)],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc, json.loads(result_file.read_text())


def test_child_capture_takes_fd_level_output_and_log_records(tmp_path: Path) -> None:
    proc, lines = run_capture_script(CAPTURE_SCRIPT, tmp_path, "lines.json")
    got = [(line["stream"], line["text"]) for line in lines]
    assert all(line["attempt"] == 2 for line in lines)
    stdout = [text for stream, text in got if stream == "stdout"]
    stderr = [text for stream, text in got if stream == "stderr"]
    logs = [text for stream, text in got if stream == "log"]
    assert stdout[:2] == ["plain print, not flushed", "raw fd write \ufffd\ufffd end"]
    assert stdout[2] == "x" * 4096 + " [... 5904 bytes cut]"
    assert stdout[3:] == ["from a subprocess", "from C printf", "progress", "50%", "100%"]
    assert stderr == ["its stderr", "no newline at the end"]
    assert logs == [
        "[info] an_event [services.demo] n=1",
        "[warning] stdlib record [services.demo]",
    ]
    # The output still reaches the process's own stdout and stderr (the worker's log) as before,
    # and log records stay JSON lines there, not "stderr" lines of the task.
    assert b"plain print, not flushed\n" in proc.stdout and b"from C printf\n" in proc.stdout
    assert b'"event": "an_event"' in proc.stderr and b"its stderr\n" in proc.stderr


BURST_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from services.gpu_worker.capture import OutputCapture

    sent = []
    capture = OutputCapture(1, sent.append)
    capture.start()
    for i in range(20000):
        print(f"burst line {i}")
    capture.stop()
    with open(sys.argv[1], "w") as f:
        json.dump([[line.as_dict() for line in batch] for _kind, batch in sent], f)
    """
)


def test_child_capture_drops_a_burst_beyond_its_rate_and_says_how_many(tmp_path: Path) -> None:
    proc, batches = run_capture_script(BURST_SCRIPT, tmp_path, "batches.json")
    assert proc.stdout.count(b"burst line") == 20000  # the worker's own stdout gets every line
    assert all(len(batch) <= 1001 for batch in batches)  # a message: 1,000 lines and a note
    kept = [line["text"] for batch in batches for line in batch if line["stream"] == "stdout"]
    notes = [line["text"] for batch in batches for line in batch if line["stream"] == "log"]
    dropped = [int(re.match(r"\[(\d+) lines dropped", note).group(1)) for note in notes]
    assert dropped and len(kept) + sum(dropped) == 20000, (len(kept), notes)
    assert kept == sorted(kept, key=lambda text: int(text.split()[-1]))


#: A reused child's capture: started once, two tasks each ``begin`` and ``flush``; what each
#: task wrote last has no line end, sits in Python's buffer or is a raw fd write. The first
#: task leaves fd 1 pointing at /dev/null.
FLUSH_SCRIPT = textwrap.dedent(
    """
    import json, logging, os, sys, threading
    from services.gpu_worker.capture import OutputCapture
    from shared.logging import configure_logging
    from shared.settings import Settings

    configure_logging(Settings.model_construct(log_level="info", log_format="json"), service="task")
    sent = []
    capture = OutputCapture(0, sent.append)
    capture.start()
    tasks = []
    for attempt in (1, 2):
        capture.begin(attempt, [f"hunter{attempt}x"])
        fds = [os.readlink(f"/proc/self/fd/{fd}") for fd in (1, 2)]
        for i in range(900):
            print(f"task {attempt} line {i}")
        logging.getLogger("demo").warning("task %d record hunter%dx", attempt, attempt)
        sys.stderr.write(f"task {attempt} err, not flushed, hunter{attempt}x")
        os.write(1, f"task {attempt} raw, no line end".encode())
        if attempt == 1:
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        flushed = capture.flush()
        tasks.append({
            "flushed": flushed,
            "messages": len(sent),
            "threads": sorted(t.ident for t in threading.enumerate()),
            "fds": fds,
        })
    capture.stop()
    with open(sys.argv[1], "w") as f:
        json.dump({"tasks": tasks, "sent": [[l.as_dict() for l in b] for _k, b in sent]}, f)
    """
)


def test_reused_capture_sends_each_tasks_output_before_flush_returns(tmp_path: Path) -> None:
    """The end barrier: all a task wrote is sent, as its own lines, when ``flush`` returns.

    One capture (same threads, same pipes) serves both tasks of the child, even after a task
    pointed fd 1 elsewhere; no flush marker shows anywhere.
    """
    proc, got = run_capture_script(FLUSH_SCRIPT, tmp_path, "flush.json")
    first, second = got["tasks"]
    assert first["flushed"] and second["flushed"]
    assert first["threads"] == second["threads"] and len(first["threads"]) == 4  # main + 3
    assert first["fds"] == second["fds"] and all(fd.startswith("pipe:") for fd in first["fds"])
    assert len(got["sent"]) == second["messages"]  # stop() found nothing left to send
    for attempt, batches in (
        (1, got["sent"][: first["messages"]]),
        (2, got["sent"][first["messages"] :]),
    ):
        lines = [line for batch in batches for line in batch]
        assert all(line["attempt"] == attempt for line in lines), lines[:3]
        by_stream = {
            stream: [line["text"] for line in lines if line["stream"] == stream]
            for stream in ("stdout", "stderr", "log")
        }
        assert by_stream == {
            "stdout": [f"task {attempt} line {i}" for i in range(900)]
            + [f"task {attempt} raw, no line end"],
            "stderr": [f"task {attempt} err, not flushed, ***"],
            "log": [f"[warning] task {attempt} record *** [demo]"],
        }
    for output in (proc.stdout, proc.stderr):
        assert b"tp-flush" not in output and b"\0" not in output
    # The copy on the worker's own output is redacted with the running task's secrets (its log
    # records there are the logging set-up's to redact: not this test's).
    assert b"hunter" not in proc.stdout and b"not flushed, hunter" not in proc.stderr
    assert b"task 1 raw, no line end" in proc.stdout and b"task 2 line 899\n" in proc.stdout
    assert b"task 2 err, not flushed, ***" in proc.stderr


#: Three tasks of one capture: the first's output was all read before its end (no marker needed),
#: the second ends on an unfinished line read long before (a marker must close it), the third
#: ends right after 500 lines (whatever the readers got to, every line must be sent).
QUIET_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    from services.gpu_worker.capture import OutputCapture

    sent = []
    capture = OutputCapture(0, sent.append)
    capture.start()
    tasks = []
    for attempt, last in ((1, "line\\n"), (2, "no line end"), (3, None)):
        capture.begin(attempt)
        if last is None:
            for i in range(500):
                print(f"task 3 line {i}")
        else:
            os.write(1, f"task {attempt} {last}".encode())
            time.sleep(0.3)  # the reader has long handled it when the task ends
        before = capture._flushes
        flushed = capture.flush()
        tasks.append({"flushed": flushed, "markers": capture._flushes - before, "sent": len(sent)})
    capture.stop()
    with open(sys.argv[1], "w") as f:
        json.dump({"tasks": tasks, "sent": [[l.as_dict() for l in b] for _k, b in sent]}, f)
    """
)


def test_flush_skips_its_markers_only_when_nothing_can_be_left_behind(tmp_path: Path) -> None:
    _proc, got = run_capture_script(QUIET_SCRIPT, tmp_path, "quiet.json")
    first, second, third = got["tasks"]
    assert first["flushed"] and second["flushed"] and third["flushed"]
    assert first["markers"] == 0  # all read and queued: shipped at once
    assert second["markers"] == 1  # an unfinished line was held: only a marker ends it
    texts = [
        [line["text"] for batch in got["sent"][start:end] for line in batch]
        for start, end in (
            (0, first["sent"]),
            (first["sent"], second["sent"]),
            (second["sent"], third["sent"]),
        )
    ]
    assert texts[0] == ["task 1 line"]
    assert texts[1] == ["task 2 no line end"]
    assert texts[2] == [f"task 3 line {i}" for i in range(500)]


def test_clean_text_replaces_bad_bytes_and_cuts_at_a_character() -> None:
    assert clean_text(b"ok \xff") == "ok \ufffd"
    assert clean_text("lone \udc80 surrogate") == "lone ? surrogate"
    cut = clean_text("é" * 3000, max_bytes=4095)  # 2 bytes each: byte 4095 is mid-character
    assert cut == "é" * 2047 + " [... 1906 bytes cut]"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_writer_drops_and_counts_lines_it_cannot_write(settings: Settings) -> None:
    lines = [LogLine(time.time(), "stdout", 1, f"line {i}") for i in range(50)]
    down = aioredis.Redis(port=closed_port(), socket_connect_timeout=1, decode_responses=True)
    writer = LogStreamWriter(down, "nowhere", attempt=1, max_lines=100)
    started = time.monotonic()
    writer.add(lines)  # returns at once: the write happens in the background
    assert time.monotonic() - started < 0.05
    await writer.close()
    await down.aclose()
    assert (writer.dropped, writer.written) == (50, 0)

    # A server that takes the connection and never answers: close() gives up in time.
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen()
        silent = aioredis.Redis(port=mute.getsockname()[1], decode_responses=True)
        writer = LogStreamWriter(silent, "nowhere", attempt=1, max_lines=100)
        writer.add(lines)
        started = time.monotonic()
        await writer.close(timeout_s=0.5)
        assert time.monotonic() - started < 1.5
        assert (writer.dropped, writer.written) == (50, 0)
        await silent.aclose()

    r = redis_client(settings)
    key = f"{settings.namespace}:task:bounded:logs"
    try:
        writer = LogStreamWriter(r, key, attempt=1, max_lines=100, max_pending=10)
        writer.add(lines[:25])  # a write is started with the first 10; the other 15 are dropped
        await writer.close()
        stored = await read_after(r, key)
    finally:
        await r.aclose()
    assert (writer.dropped, writer.written) == (15, 10)
    assert stored[0].text.startswith("[15 lines of output lost")
    assert [line.text for line in stored[1:]] == [f"line {i}" for i in range(10)]
