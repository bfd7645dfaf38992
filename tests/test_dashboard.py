"""The dashboard in a real headless Chromium, fed live by a real health-monitor process.

Scheduler, worker and health-monitor run as processes against the real RabbitMQ and Redis; the
page is driven by Playwright through Debian's ``chromium`` (never a browser Playwright
downloads). One test walks the acceptance path: the worker shows ``online``, a probe task's
progress advances under "Active tasks" and it lands under "Recent results", a SIGKILLed worker
turns ``offline`` within heartbeat TTL + 1 s with an alert and a health problem, and a restarted
worker is ``online`` again, all without reloading the page. Another renders a hand-made
snapshot with one of everything (GPU gauges, queue order, sync states, alerts, a plot) served
through Playwright's request routing, and checks that text from tasks never becomes markup.
Screenshots are saved in ``$TP_TEST_ARTIFACTS`` (the test's temporary folder when unset).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import socket
import struct
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from services.health_monitor.snapshot import HealthSnapshot, QueueInfo, SyncSummary, TaskSummary
from shared.artifacts import ArtifactState, ArtifactStatus
from shared.client import DistributedClient
from shared.gitsync import SyncState, SyncStatus
from shared.health import (
    GpuInfo,
    GpuReport,
    HealthAlert,
    Heartbeat,
    RunningTask,
    ServiceState,
    ServiceStatus,
    WorkerFacts,
)
from shared.messages import TaskState
from tests.conftest import LIGHT_WORKER, ROOT, Platform, ServiceProcess, service_env

CHROMIUM = os.environ.get("TP_CHROMIUM", "/usr/bin/chromium")
# TESTING-NOTES "A real browser": no sandbox as root, no GPU, no background traffic, /tmp for
# shared memory (container /dev/shm is small).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-dev-shm-usage",
]
HEARTBEAT_TTL_S = 2.0
FAST_BEATS = {
    "TP_HEARTBEAT_INTERVAL_S": "0.5",
    "TP_HEARTBEAT_TTL_S": str(HEARTBEAT_TTL_S),
    "TP_HEALTH_INTERVAL_S": "0.5",
}
WORKER = "test-worker"
UI_TIMEOUT_MS = 30_000


def require_chromium() -> None:
    """Fail under CI, skip elsewhere, when Chromium or Playwright is missing."""
    missing = []
    if not os.access(CHROMIUM, os.X_OK):
        missing.append(f"Chromium not found at {CHROMIUM} (apt-get install chromium)")
    if importlib.util.find_spec("playwright") is None:
        missing.append("the playwright package is not installed (pip install -e '.[dev]')")
    if not missing:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("; ".join(missing))
    pytest.skip("; ".join(missing))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def artifact_dir(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("TP_TEST_ARTIFACTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


async def wait_http(url: str, monitor: ServiceProcess, timeout: float = 60) -> None:
    """Wait until the health-monitor answers (any status: 503 before its first pass is fine)."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2) as http:
        while True:
            try:
                await http.get(f"{url}/healthz")
                return
            except httpx.TransportError:
                pass
            if monitor.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"health-monitor not serving:\n{monitor.log_text()[-3000:]}")
            await asyncio.sleep(0.2)


@pytest.fixture
async def dashboard_url(platform: Platform) -> str:
    """Scheduler, worker and health-monitor with fast heartbeats; the dashboard's URL."""
    require_chromium()  # before minutes of services, not after
    await platform.start_all(**FAST_BEATS, **LIGHT_WORKER)
    port = free_port()
    monitor = platform.start("health_monitor", TP_HEALTH_PORT=str(port), **FAST_BEATS)
    url = f"http://127.0.0.1:{port}"
    await wait_http(url, monitor)
    return url


@dataclass
class Tab:
    """A browser page and the script errors it raised."""

    page: Any
    errors: list[str] = field(default_factory=list)


@pytest.fixture
async def tab(tmp_path: Path) -> AsyncIterator[Tab]:
    """A headless Chromium page; a last screenshot is saved whatever the outcome."""
    require_chromium()
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            tab = Tab(await browser.new_page(viewport={"width": 1400, "height": 1100}))
            tab.page.on("pageerror", lambda e: tab.errors.append(str(e)))
            yield tab
            shot = artifact_dir(tmp_path) / "dashboard-last.png"
            await tab.page.screenshot(path=shot, full_page=True)
        finally:
            await browser.close()


async def progress_values(page: Any, task_id: str, client: DistributedClient) -> list[float]:
    """The progress values the page shows for a task while it is active, in order."""
    seen: list[float] = []
    row = f'#active [data-task="{task_id}"]'
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        value = await page.evaluate(
            "sel => document.querySelector(sel)?.dataset.progress ?? null", row
        )
        if value:
            if not seen or float(value) != seen[-1]:
                seen.append(float(value))
        elif seen and (await client.status(task_id)).state.is_terminal:
            return seen
        await asyncio.sleep(0.05)
    raise AssertionError(f"task {task_id} never finished; progress seen {seen}")


@pytest.mark.slow
async def test_dashboard_live_worker_task_and_offline(
    dashboard_url: str, tab: Tab, platform: Platform, client: DistributedClient, tmp_path: Path
):
    page = tab.page
    worker_card = f'[data-worker="{WORKER}"]'
    await page.goto(dashboard_url)
    # A marker that a reload would wipe: everything below happens in this one document.
    await page.evaluate("window.__sameDocument = true")
    await page.wait_for_selector(f'{worker_card}[data-state="online"]', timeout=UI_TIMEOUT_MS)
    assert await page.text_content(f'{worker_card} [data-field="state"]') == "online"
    assert await page.text_content(f'{worker_card} [data-field="pid"]') == str(
        platform.procs["gpu_worker"].proc.pid
    )
    assert await page.get_attribute("#conn", "data-state") == "live"

    # A task: progress advances under "Active tasks", then it is listed under "Recent results".
    # Selected while it runs, its log tail appears before it ends and follows it to the end.
    config = {"sleep_s": 4, "steps": 8, "print_lines": 3, "print_every_s": 0.2}
    task = await client.submit("probe", config)
    active = f'#active [data-task="{task.task_id}"]'
    await page.wait_for_selector(active, timeout=UI_TIMEOUT_MS)
    await page.click(active)
    logs_while = asyncio.create_task(
        page.wait_for_function(
            """() => document.querySelector("#logs").textContent.includes("probe line 3/3")
                && document.querySelector("#detail").dataset.state""",
            timeout=UI_TIMEOUT_MS,
        )
    )
    seen = await progress_values(page, task.task_id, client)
    assert len([p for p in seen if 0 < p < 1]) >= 2, f"progress did not advance: {seen}"
    assert seen == sorted(seen)
    assert await (await logs_while).json_value() == "running"
    recent = f'#recent [data-task="{task.task_id}"]'
    await page.wait_for_selector(f'{recent}[data-state="completed"]', timeout=UI_TIMEOUT_MS)
    assert await page.is_visible(f'{recent} [data-metric="steps"]')
    await page.wait_for_selector(
        f'#detail[data-task="{task.task_id}"][data-state="completed"]', timeout=UI_TIMEOUT_MS
    )
    await page.wait_for_selector(
        '#logs [data-stream="stderr"]:has-text("probe printed 3 lines")', timeout=UI_TIMEOUT_MS
    )
    await page.screenshot(path=artifact_dir(tmp_path) / "dashboard-result.png", full_page=True)

    # SIGKILL the worker: no clean stop, so only its heartbeat running out can tell.
    worker = platform.procs["gpu_worker"]
    killed_at = time.monotonic()
    os.kill(worker.proc.pid, signal.SIGKILL)
    await page.wait_for_selector(f'{worker_card}[data-state="offline"]', timeout=UI_TIMEOUT_MS)
    offline_after_s = time.monotonic() - killed_at
    print(f"dashboard showed {WORKER} offline {offline_after_s:.2f} s after SIGKILL")
    assert offline_after_s <= HEARTBEAT_TTL_S + 1, offline_after_s

    alert = f'#alerts [data-alert-kind="worker_offline"][data-alert-subject="gpu-worker:{WORKER}"]'
    await page.wait_for_selector(f'{alert}[data-resolved="false"]', timeout=UI_TIMEOUT_MS)
    await page.wait_for_selector('#health[data-healthy="false"]', timeout=UI_TIMEOUT_MS)
    assert WORKER in await page.text_content("#problems")
    await page.screenshot(path=artifact_dir(tmp_path) / "dashboard-offline.png", full_page=True)

    # Restarted (a new process under the same name): online again, the alert greyed as resolved.
    worker.proc.wait()
    env = service_env(platform.settings, **FAST_BEATS, **LIGHT_WORKER)
    restarted = ServiceProcess("gpu_worker", env, tmp_path / "gpu_worker-restarted.log")
    platform.procs["gpu_worker_restarted"] = restarted
    await page.wait_for_selector(f'{worker_card}[data-state="online"]', timeout=UI_TIMEOUT_MS)
    pid = await page.text_content(f'{worker_card} [data-field="pid"]')
    assert pid == str(restarted.proc.pid)
    await page.wait_for_selector(f'{alert}[data-resolved="true"]', timeout=UI_TIMEOUT_MS)
    await page.wait_for_selector('#health[data-healthy="true"]', timeout=UI_TIMEOUT_MS)
    await page.wait_for_selector(f'#recent [data-task="{task.task_id}"]', timeout=UI_TIMEOUT_MS)
    record = await client.status(task.task_id)
    assert record.state is TaskState.COMPLETED

    assert await page.evaluate("window.__sameDocument === true"), "the page was reloaded"
    assert tab.errors == [], tab.errors


# ---------- the page alone, against a hand-made snapshot (no services) ----------

FAKE_ORIGIN = "http://dashboard.test"
STATIC = ROOT / "services" / "health_monitor" / "static"
HOSTILE = '<img src=x onerror="window.__injected = 1">'


def tiny_png() -> bytes:
    """A valid 2x2 grey PNG, so the page's <img> has something to decode."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = b"".join(b"\x00" + b"\x80" * 2 for _ in range(2))  # filter byte + 2 grey pixels
    header = struct.pack(">IIBBBBB", 2, 2, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def task(task_id: str, state: str, **fields: Any) -> TaskSummary:
    fields = {"task_type": "train_model", "priority": 5, **fields}
    return TaskSummary(task_id=task_id, state=state, **fields)


def fake_snapshot(now: float) -> HealthSnapshot:
    """A snapshot with one of everything: GPU and CPU workers, a queue, results, sync, alerts."""
    gpu = GpuReport(
        gpus=[
            GpuInfo(
                index=0,
                name="NVIDIA RTX 4090",
                memory_used_bytes=12 * 2**30,
                memory_total_bytes=24 * 2**30,
                utilization_pct=87.0,
                temperature_c=71.0,
            )
        ]
    )
    running = RunningTask(task_id="a1", task_type="train_model", lane="gpu", started_at=now - 60)

    def beat(name: str, **facts: Any) -> Heartbeat:
        return Heartbeat(
            kind="gpu-worker",
            name=name,
            host="desk",
            pid=4242,
            version="0.1.0",
            code_commit="ab" * 20,
            started_at=now - 3600,
            ts=now - 0.3,
            interval_s=2,
            ttl_s=6,
            worker=WorkerFacts(slots={"gpu": 1}, **facts),
        )

    git = SyncStatus(
        host="desk",
        repo_dir="/srv/tradeplat",
        remote="origin",
        branch="main",
        state=SyncState.DIVERGED,
        message="both sides have commits",
        ahead=1,
        behind=3,
        checked_at=now - 5,
        last_fetch_at=now - 5,
    )
    failed_sync = ArtifactStatus(
        task_id="r2", state=ArtifactState.FAILED, backend="s3", error="bucket gone", updated_at=now
    )
    return HealthSnapshot(
        ts=now,
        healthy=False,
        problems=["git-sync on desk is diverged"],
        services=[
            ServiceStatus(
                state=ServiceState.BUSY,
                age_s=0.3,
                heartbeat=beat("gpu-box", running=[running], gpu=gpu),
            ),
            ServiceStatus(
                state=ServiceState.ONLINE,
                age_s=0.3,
                heartbeat=beat(
                    "cpu-box", gpu=GpuReport(error="no GPU: NVML Shared Library Not Found")
                ),
            ),
        ],
        queues=[
            QueueInfo(name="tp.tasks.gpu", route="gpu", messages=2, consumers=0),
            QueueInfo(name="tp.dead", route="dead", messages=4, consumers=0),
        ],
        tasks_by_state={"queued": 2, "running": 1, "completed": 1, "failed": 1},
        active=[
            task(
                "a1",
                "running",
                worker="gpu-box",
                running_at=now - 60,
                progress=0.42,
                progress_message=HOSTILE,
            )
        ],
        queued=[
            task("q-high", "queued", priority=9, queued_at=now - 5),
            task("q-low", "queued", priority=1, queued_at=now - 90),
        ],
        recent=[
            task(
                "r1",
                "completed",
                runtime_s=75.0,
                finished_at=now - 30,
                metrics={"val_loss": 0.6931, "sharpe": 1.25},
                plots=["loss_curve.png"],
            ),
            task("r2", "failed", finished_at=now - 60, error=HOSTILE),
        ],
        sync=SyncSummary(git=[git], artifacts_failed=1, artifacts=[failed_sync]),
        alerts=[
            HealthAlert(
                kind="worker_offline",
                subject="gpu-worker:old",
                message="back",
                ts=now - 10,
                resolved=True,
            ),
            HealthAlert(
                kind="worker_offline", subject="gpu-worker:old", message="lost", ts=now - 20
            ),
            HealthAlert(kind="sync_failed", subject="git:desk", message="diverged", ts=now - 30),
        ],
    )


async def serve_fake(route: Any, snapshot: HealthSnapshot, streams: list[str]) -> None:
    """Answer the page's requests as the health-monitor would, from files and ``snapshot``."""
    path = urlsplit(route.request.url).path
    body = snapshot.public()
    if path == "/":
        await route.fulfill(path=STATIC / "index.html", content_type="text/html")
    elif path.startswith("/static/"):
        await route.fulfill(path=STATIC / path.removeprefix("/static/"))
    elif path == "/api/snapshot":
        await route.fulfill(json=body)
    elif path == "/api/stream":
        streams.append(path)
        # One snapshot and one alert, then the stream ends: the page must say "disconnected".
        pushed = HealthAlert(
            kind="queue_without_consumer", subject="tp.tasks.gpu", message="pushed", ts=snapshot.ts
        )
        events = "retry: 500\n\n"
        events += f"event: snapshot\ndata: {json.dumps(body)}\n\n"
        events += f"event: alert\ndata: {pushed.model_dump_json()}\n\n"
        await route.fulfill(body=events, content_type="text/event-stream")
    elif path == "/api/tasks/r1":
        await route.fulfill(json={"task": body["recent"][0], "history": []})
    elif path == "/api/tasks/r1/logs":
        lines = [
            {"ts": str(snapshot.ts - 2), "stream": "stdout", "attempt": "1", "text": "epoch 1/1"},
            {"ts": str(snapshot.ts - 1), "stream": "stderr", "attempt": "1", "text": HOSTILE},
        ]
        await route.fulfill(json={"lines": lines})
    elif path == "/api/tasks/r1/plots/loss_curve.png":
        await route.fulfill(body=tiny_png(), content_type="image/png")
    else:
        await route.fulfill(status=404, json={"detail": "not found"})


async def test_dashboard_renders_every_section_and_escapes_text(tab: Tab, tmp_path: Path):
    page = tab.page
    snapshot = fake_snapshot(time.time())
    streams: list[str] = []
    await page.route(f"{FAKE_ORIGIN}/**", lambda route: serve_fake(route, snapshot, streams))
    await page.goto(f"{FAKE_ORIGIN}/")
    await page.wait_for_selector('[data-worker="gpu-box"][data-state="busy"]')

    # GPU gauges, and "no GPU" with NVML's reason on a CPU machine.
    gauge = '[data-worker="gpu-box"] [data-gpu="0"]'
    assert await page.text_content(f'{gauge} [data-field="memory"] .label') == "12.0 / 24.0 GiB"
    assert await page.text_content(f'{gauge} [data-field="utilization"] .label') == "87 %"
    assert await page.text_content(f'{gauge} [data-field="temperature"]') == "71 °C"
    width = await page.evaluate(
        "s => document.querySelector(s).style.width", f'{gauge} [data-field="memory"] .fill'
    )
    assert width == "50%"
    assert "no GPU: NVML" in await page.text_content('[data-worker="cpu-box"] [data-field="gpu"]')

    # Progress with its message (hostile text shown as text), the queue in the order given.
    assert await page.text_content('#active [data-task="a1"] .bar .label') == "42 %"
    assert await page.text_content('#active [data-task="a1"] [data-field="message"]') == HOSTILE
    order = await page.eval_on_selector_all("#queued tr", "rows => rows.map(r => r.dataset.task)")
    assert order == ["q-high", "q-low"]
    assert await page.get_attribute('#queues [data-queue="tp.tasks.gpu"]', "class") == "warn"
    assert await page.text_content("#dead-letters") == "4"

    # Results with metrics; the failed one's error as text.
    assert (
        await page.text_content('#recent [data-task="r1"] [data-metric="sharpe"]') == "sharpe 1.25"
    )
    assert HOSTILE in await page.text_content('#recent [data-task="r2"] [data-field="metrics"]')

    # Sync and the health banner.
    git = '#git-sync [data-git-host="desk"]'
    assert await page.text_content(f'{git} [data-field="state"]') == "diverged"
    assert await page.text_content(f'{git} [data-field="behind"]') == "3"
    assert await page.text_content('#artifact-backlog [data-field="failed"]') == "1"
    assert await page.get_attribute("#health", "data-healthy") == "false"
    assert await page.text_content("#problems") == "git-sync on desk is diverged"

    # Alerts newest first (the pushed one on top); a fired alert later resolved is greyed too.
    alerts = await page.eval_on_selector_all(
        "#alerts li", "items => items.map(i => [i.dataset.alertSubject, i.dataset.resolved])"
    )
    assert alerts == [
        ["tp.tasks.gpu", "false"],
        ["gpu-worker:old", "true"],
        ["gpu-worker:old", "true"],
        ["git:desk", "false"],
    ]

    # A result's plot and log tail.
    await page.click('#recent [data-task="r1"]')
    await page.wait_for_selector('#logs [data-stream="stderr"]')
    assert HOSTILE in await page.text_content("#logs")
    plot = '#plots img[data-plot="loss_curve.png"]'
    await page.wait_for_function(f"document.querySelector('{plot}')?.naturalWidth === 2")
    await page.screenshot(path=artifact_dir(tmp_path) / "dashboard-sections.png", full_page=True)

    # The stream ended: the page says so and keeps the last picture; EventSource retries.
    await page.wait_for_selector('#conn[data-state="disconnected"]')
    assert await page.is_visible('[data-worker="gpu-box"]')
    deadline = time.monotonic() + 10
    while len(streams) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert len(streams) >= 2, "EventSource did not reconnect"

    # No hostile markup became an element anywhere.
    assert await page.evaluate("window.__injected === undefined")
    assert await page.eval_on_selector_all("img", "imgs => imgs.length") == 1
    assert tab.errors == [], tab.errors
