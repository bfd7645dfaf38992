"""The health-monitor's HTTP side (FastAPI): health check, metrics, JSON API, dashboard, SSE.

Routes:
    ``GET /healthz``                       200 ``{"healthy": true}`` or 503 with ``problems``
    ``GET /metrics``                       Prometheus text format
    ``GET /api/snapshot``                  the whole ``HealthSnapshot``
    ``GET /api/workers``                   gpu-workers (state, heartbeat, GPUs)
    ``GET /api/services``                  every service
    ``GET /api/queues``                    queue depths and consumers, queued tasks in order
    ``GET /api/tasks?state=&limit=``       tasks, newest first (by state if given)
    ``GET /api/tasks/{id}``                one task's record and history
    ``GET /api/tasks/{id}/logs?tail=``     the last lines of its output
    ``GET /api/tasks/{id}/plots/{name}``   a PNG from its local artifact folder
    ``GET /api/sync``                      git-sync and artifact-sync state
    ``GET /api/alerts?active=``            recent alert events, newest first; or those holding now
    ``GET /api/stream``                    server-sent events: ``snapshot`` and ``alert``
    ``GET /``                              the dashboard (``static/index.html``)

With ``TP_HEALTH_TOKEN`` set, every path but ``/healthz`` (what container and unit health checks
and load balancers probe; it tells only healthy or not and why) answers 401 unless the request
carries ``Authorization: Bearer <token>`` (Prometheus' ``authorization`` setting, curl) or the
``tp_health_token`` cookie. A browser opens the dashboard once as ``/?token=<token>``: the answer
sets that cookie (HttpOnly, SameSite=Strict) and redirects to the same path without the token,
so it leaves the address bar and the history; the dashboard's fetches and its event stream then
carry the cookie.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import RedirectResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from services.health_monitor.collector import summarise
from shared.errors import StoreError, TaskNotFoundError
from shared.messages import TaskState
from shared.storage.naming import UnsafeNameError, safe_task_id

if TYPE_CHECKING:
    from services.health_monitor.app import HealthMonitor

STATIC = Path(__file__).resolve().parent / "static"
#: How long an SSE connection waits for news before it sends a comment to keep proxies open (s).
SSE_KEEPALIVE_S = 15.0
#: The cookie a browser keeps the token in after ``?token=``.
TOKEN_COOKIE = "tp_health_token"  # noqa: S105 - a cookie name, not a secret
#: Paths open without the token.
OPEN_PATHS = frozenset({"/healthz"})


class TokenGate:
    """ASGI middleware: 401 on every path but :data:`OPEN_PATHS` without the right token.

    The token is compared in constant time (``hmac.compare_digest``). See the module docstring
    for where a request may carry it.
    """

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._token = token.encode()

    def _matches(self, candidate: str | None) -> bool:
        return candidate is not None and hmac.compare_digest(candidate.encode(), self._token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        bearer = credentials.strip() if scheme.lower() == "bearer" else None
        if self._matches(bearer) or self._matches(request.cookies.get(TOKEN_COOKIE)):
            await self.app(scope, receive, send)
            return
        if self._matches(request.query_params.get("token")):
            # Relative: the Host header is the client's to choose (no redirect to elsewhere).
            rest = request.url.remove_query_params("token")
            target = rest.path + (f"?{rest.query}" if rest.query else "")
            redirect = RedirectResponse(target, 303)
            redirect.set_cookie(
                TOKEN_COOKIE, self._token.decode(), httponly=True, samesite="strict"
            )
            await redirect(scope, receive, send)
            return
        refused = JSONResponse(
            {"detail": "token required: Authorization: Bearer <TP_HEALTH_TOKEN>"},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
        await refused(scope, receive, send)


def create_app(monitor: HealthMonitor) -> FastAPI:
    """The FastAPI application over a running ``HealthMonitor``."""
    app = FastAPI(title="tradeplat health-monitor", docs_url="/api/docs", redoc_url=None)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        snap = monitor.latest
        if snap is None:
            return JSONResponse({"healthy": False, "problems": ["starting"]}, status_code=503)
        body = {"healthy": snap.healthy, "problems": snap.problems, "ts": snap.ts}
        return JSONResponse(body, status_code=200 if snap.healthy else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(monitor.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/snapshot")
    async def snapshot() -> dict[str, Any]:
        return monitor.require_snapshot().public()

    @app.get("/api/workers")
    async def workers() -> list[dict[str, Any]]:
        return [w.model_dump(mode="json") for w in monitor.require_snapshot().workers]

    @app.get("/api/services")
    async def services() -> list[dict[str, Any]]:
        return [s.model_dump(mode="json") for s in monitor.require_snapshot().services]

    @app.get("/api/queues")
    async def queues() -> dict[str, Any]:
        snap = monitor.require_snapshot().public()
        return {
            "queues": snap["queues"],
            "queued": snap["queued"],
            "oldest_queued_age_s": snap["oldest_queued_age_s"],
        }

    @app.get("/api/sync")
    async def sync() -> dict[str, Any]:
        return monitor.require_snapshot().sync.model_dump(mode="json")

    @app.get("/api/alerts")
    async def alerts(active: bool = False) -> list[dict[str, Any]]:
        chosen = monitor.require_snapshot().active_alerts if active else monitor.recent_alerts
        return [a.model_dump(mode="json") for a in chosen]

    @app.get("/api/tasks")
    async def tasks(
        state: TaskState | None = None, limit: int = Query(50, ge=1, le=500)
    ) -> list[dict[str, Any]]:
        store = monitor.store
        with _task_errors():
            if state is not None:
                records = await store.in_state(state, limit, newest_first=True)
            else:
                records = await store.list_recent(limit)
        tasks_dir = monitor.settings.tasks_dir
        return [summarise(r, tasks_dir).model_dump(mode="json") for r in records]

    @app.get("/api/tasks/{task_id}")
    async def task(task_id: str) -> dict[str, Any]:
        with _task_errors():
            record = await monitor.store.get(_checked(task_id))
            history = await monitor.store.history(record.task_id)
        return {
            "task": summarise(record, monitor.settings.tasks_dir).model_dump(mode="json"),
            "record": record.model_dump(mode="json"),
            "history": history,
        }

    @app.get("/api/tasks/{task_id}/logs")
    async def logs(task_id: str, tail: int = Query(200, ge=1, le=5000)) -> dict[str, Any]:
        with _task_errors():
            return {"lines": await monitor.log_tail(_checked(task_id), tail)}

    @app.get("/api/tasks/{task_id}/plots/{name}")
    async def plot(task_id: str, name: str) -> FileResponse:
        folder = monitor.settings.tasks_dir / _checked(task_id) / "artifacts"
        if "/" in name or "\\" in name or not name.endswith(".png"):
            raise HTTPException(404, "no such plot")
        path = folder / name
        if path.is_symlink() or not path.is_file():
            raise HTTPException(404, f"no plot {name} for task {task_id} on this desktop")
        return FileResponse(path, media_type="image/png")

    @app.get("/api/stream")
    async def stream() -> StreamingResponse:
        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return StreamingResponse(_events(monitor), media_type="text/event-stream", headers=headers)

    @app.get("/")
    async def dashboard() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")
    token = monitor.settings.health_token
    if token is not None and token.get_secret_value():
        app.add_middleware(TokenGate, token=token.get_secret_value())
    return app


def _checked(task_id: str) -> str:
    """A task id safe to use in keys and paths, or 404."""
    try:
        return safe_task_id(task_id)
    except UnsafeNameError as e:
        raise HTTPException(404, str(e)) from e


@contextlib.contextmanager
def _task_errors() -> Iterator[None]:
    try:
        yield
    except TaskNotFoundError as e:
        raise HTTPException(404, str(e)) from e
    except StoreError as e:
        raise HTTPException(503, str(e)) from e


async def _events(monitor: HealthMonitor) -> AsyncIterator[bytes]:
    """Server-sent events: the current snapshot at once, then every new one and every alert."""
    yield b"retry: 2000\n\n"
    inbox = monitor.subscribe()
    try:
        if monitor.latest is not None:
            yield _sse("snapshot", monitor.latest.public())
        while True:
            try:
                kind, data = await asyncio.wait_for(inbox.get(), SSE_KEEPALIVE_S)
            except TimeoutError:
                yield b": keep-alive\n\n"
                continue
            if kind == "close":
                return  # the monitor stops; EventSource reconnects to the next one
            yield _sse(kind, data)
    finally:
        monitor.unsubscribe(inbox)


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class EmbeddedServer(uvicorn.Server):
    """uvicorn inside a service's own event loop: the service, not uvicorn, handles signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    @property
    def port(self) -> int | None:
        """The port it listens on once started (useful with port 0)."""
        for server in getattr(self, "servers", []):
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        return None
