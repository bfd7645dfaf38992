"""git-sync against real repositories: a bare origin, a desktop clone and a laptop clone.

The service runs in the test's event loop (``GitSync``) or as a real process, with real Redis and
RabbitMQ; remotes that hang or want credentials are real sockets on loopback.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import aio_pika
import pytest

from services.git_sync.app import GitSync
from shared.gitsync import SyncEvent, SyncState, SyncStatus
from shared.messages import decode
from shared.settings import Settings
from tests.conftest import Platform, service_env, tradectl
from tests.gitrepos import Repos, git

pytestmark = pytest.mark.usefixtures("isolated_git")


def desktop_settings(settings: Settings, repos: Repos, **extra: object) -> Settings:
    return settings.model_copy(
        update={
            "code_dir": repos.desktop,
            "git_sync_interval_s": 1.0,
            "git_timeout_s": 5.0,
            **extra,
        }
    )


@pytest.fixture
async def sync_events(settings: Settings) -> AsyncIterator[list[SyncEvent]]:
    """Every ``sync.*`` event of the test's namespace, in arrival order."""
    received: list[SyncEvent] = []
    connection = await aio_pika.connect(settings.amqp_url)
    channel = await connection.channel()
    exchange = await channel.declare_exchange(
        f"{settings.namespace}.events", aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(exchange, routing_key="sync.#")

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        received.append(decode(message.body, SyncEvent, max_bytes=1 << 20))

    await queue.consume(on_message, no_ack=True)
    yield received
    await connection.close()


@pytest.fixture
async def service(settings: Settings, repos: Repos) -> AsyncIterator[GitSync]:
    """A GitSync for the desktop clone, connected but without its loop: tests call ``check``."""
    sync = GitSync(desktop_settings(settings, repos))
    await sync.store.start()
    await sync.broker.start()
    yield sync
    await sync.broker.stop()
    await sync.store.stop()


async def wait_for(predicate, timeout: float = 20.0, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(step)
    return value


async def test_pushed_commit_reaches_desktop_within_one_interval(
    platform: Platform, repos: Repos, sync_events: list[SyncEvent]
) -> None:
    interval = 2.0
    env = {"TP_CODE_DIR": str(repos.desktop), "TP_GIT_SYNC_INTERVAL_S": str(interval)}
    platform.start("git_sync", **env)
    first = await wait_for(lambda: [e for e in sync_events if e.event == "up_to_date"])
    old = repos.head(repos.desktop)
    assert first[0].new_sha == old

    new = repos.commit(repos.laptop, "strategy.py", "FAST = 12\n", push=True)
    pushed_at = time.monotonic()
    updated = await wait_for(lambda: [e for e in sync_events if e.event == "updated"])
    took = time.monotonic() - pushed_at
    assert took <= interval + 1.0, f"update took {took:.2f} s with a {interval} s interval"
    assert (updated[0].old_sha, updated[0].new_sha) == (old, new)
    assert repos.head(repos.desktop) == new
    assert (repos.desktop / "strategy.py").read_text() == "FAST = 12\n"

    shown = tradectl("sync", "status", "--json", env=service_env(platform.settings))
    assert shown.returncode == 0, shown.stderr
    (report,) = json.loads(shown.stdout)
    assert report["local_sha"] == report["remote_sha"] == new
    assert report["state"] in ("updated", "up_to_date")
    assert (report["ahead"], report["behind"], report["last_error"]) == (0, 0, None)
    assert report["last_fetch_at"] is not None
    table = tradectl("sync", "status", env=service_env(platform.settings))
    assert table.returncode == 0 and new[:12] in table.stdout


async def test_sync_now_fetches_at_once(platform: Platform, repos: Repos) -> None:
    env = {"TP_CODE_DIR": str(repos.desktop), "TP_GIT_SYNC_INTERVAL_S": "3600"}
    platform.start("git_sync", **env)
    senv = service_env(platform.settings)
    first = await asyncio.to_thread(tradectl, "sync", "now", "--json", env=senv)
    assert first.returncode == 0, first.stderr
    new = repos.commit(repos.laptop, "strategy.py", "FAST = 13\n", push=True)
    started = time.monotonic()
    done = await asyncio.to_thread(tradectl, "sync", "now", "--json", env=senv)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 10  # the hour-long interval did not apply
    assert json.loads(done.stdout)[0]["local_sha"] == new == repos.head(repos.desktop)


async def test_dirty_tree_is_reported_kept_and_resumes_by_itself(
    settings: Settings, repos: Repos, sync_events: list[SyncEvent]
) -> None:
    interval = 0.5
    sync = GitSync(desktop_settings(settings, repos, git_sync_interval_s=interval))
    await sync.start()
    try:
        await wait_for(lambda: sync.status is not None)
        before = repos.head(repos.desktop)
        (repos.desktop / "strategy.py").write_text("FAST = 99  # tuning by hand\n")
        repos.commit(repos.laptop, "strategy.py", "FAST = 11\n", push=True)
        await wait_for(lambda: sync.status and sync.status.state is SyncState.DIRTY)
        fetches_then = sync.status.fetches
        await asyncio.sleep(6 * interval)
        status = sync.status
        assert status.state is SyncState.DIRTY and "strategy.py" in status.message
        assert status.behind == 1 and status.local_sha == before
        assert (repos.desktop / "strategy.py").read_text() == "FAST = 99  # tuning by hand\n"
        # No retry storm: one fetch per interval at most, one dirty event for the whole spell.
        assert status.fetches - fetches_then <= 6 + 1
        assert [e.event for e in sync_events].count("dirty") == 1

        git(repos.desktop, "checkout", "--", "strategy.py")  # the edit is removed
        updated = await wait_for(lambda: [e for e in sync_events if e.event == "updated"], 10)
        assert updated[0].old_sha == before
        assert (repos.desktop / "strategy.py").read_text() == "FAST = 11\n"
    finally:
        await sync.stop()


async def test_committed_local_edit_is_diverged_and_nothing_is_rewritten(
    service: GitSync, repos: Repos, sync_events: list[SyncEvent]
) -> None:
    local = repos.commit(repos.desktop, "strategy.py", "FAST = 7  # desktop experiment\n")
    remote = repos.commit(repos.laptop, "strategy.py", "FAST = 8\n", push=True)
    status = await service.check()
    assert status.state is SyncState.DIVERGED
    assert (status.ahead, status.behind) == (1, 1)
    assert (status.local_sha, status.remote_sha) == (local, remote)
    assert "diverged" in status.message and "1 local, 1 remote" in status.message
    assert repos.head(repos.desktop) == local
    assert (repos.desktop / "strategy.py").read_text() == "FAST = 7  # desktop experiment\n"
    assert git(repos.desktop, "status", "--porcelain") == ""
    await wait_for(lambda: [e for e in sync_events if e.event == "diverged"])
    again = await service.check()  # still reported, still untouched
    assert again.state is SyncState.DIVERGED and repos.head(repos.desktop) == local


async def test_detached_head_and_missing_upstream_are_reported(
    service: GitSync, repos: Repos
) -> None:
    git(repos.desktop, "checkout", "-q", "--detach")
    status = await service.check()
    assert status.state is SyncState.DETACHED and "detached" in status.message
    git(repos.desktop, "checkout", "-q", "main")
    git(repos.desktop, "checkout", "-q", "-b", "research")
    service.settings = service.settings.model_copy(update={"git_branch": "research"})
    status = await service.check()
    assert status.state is SyncState.UPSTREAM_MISSING
    assert "research" in (status.last_error or "") or "research" in status.message


class _SilentServer:
    """Accepts TCP connections and never answers (a remote that hangs)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes whose arguments contain ``text`` (from /proc)."""
    return list(pids_mentioning(text).values())


def pids_mentioning(text: str) -> dict[int, str]:
    """Live (not zombie) processes whose arguments contain ``text``: pid -> command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().split(") ", 1)[1][0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found[int(entry.name)] = cmdline
    return found


@pytest.fixture
def silent_server() -> Iterator[_SilentServer]:
    server = _SilentServer()
    yield server
    server.close()


async def test_hanging_remote_times_out_and_leaves_no_git_process(
    service: GitSync, repos: Repos, silent_server: _SilentServer
) -> None:
    url = f"http://127.0.0.1:{silent_server.port}/platform.git"
    git(repos.desktop, "remote", "set-url", "origin", url)
    service.settings = service.settings.model_copy(update={"git_timeout_s": 2.0})
    started = time.monotonic()
    check = asyncio.create_task(service.check())
    # While it hangs, git and its HTTP helper are alive (so the count below means something).
    seen = await wait_for(lambda: processes_mentioning(url), timeout=5)
    assert any("remote-http" in c for c in seen), seen
    status = await check
    took = time.monotonic() - started
    assert took < 2.0 + 1.5, took
    assert status.state is SyncState.UNREACHABLE
    assert "timed out after 2 s" in status.message
    await asyncio.sleep(0.2)
    assert processes_mentioning(url) == []
    assert service.next_pause_s() == 2 * service.settings.git_sync_interval_s


class _AuthRequired(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="private"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


async def test_remote_needing_credentials_fails_fast_with_auth_failed(
    service: GitSync, repos: Repos
) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _AuthRequired)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/private.git"
        git(repos.desktop, "remote", "set-url", "origin", url)
        started = time.monotonic()
        status = await service.check()
        assert time.monotonic() - started < 3.0
        assert status.state is SyncState.AUTH_FAILED, status.message
        assert status.last_error and "terminal prompts disabled" in status.last_error
        assert processes_mentioning(url) == []
    finally:
        server.shutdown()
        server.server_close()


async def test_not_a_checkout_is_an_error_state_not_a_crash(
    service: GitSync, tmp_path: Path
) -> None:
    empty = tmp_path / "not-a-repo"
    empty.mkdir()
    service.repo_dir = empty
    status = await service.check()
    assert status.state is SyncState.ERROR and "not a git checkout" in status.message
    stored = await service.store.redis.get(service.store.keys.git_sync(service.host))
    assert SyncStatus.model_validate_json(stored).state is SyncState.ERROR


async def test_unborn_branch_and_odd_names_are_reported_not_crashed(
    service: GitSync, repos: Repos
) -> None:
    repos.commit(repos.desktop, "my strategy.py", "A = 1\n")
    (repos.desktop / "my strategy.py").write_text("A = 2\n")
    status = await service.check()
    assert status.state is SyncState.DIRTY and "my strategy.py" in status.message
    git(repos.desktop, "checkout", "-q", "--orphan", "scratch")
    status = await service.check()
    assert status.state is SyncState.ERROR and "no commit yet" in status.message
    stored = await service.store.redis.get(service.store.keys.git_sync(service.host))
    assert SyncStatus.model_validate_json(stored).state is SyncState.ERROR


async def test_a_burst_of_sync_requests_is_rate_limited(
    settings: Settings, repos: Repos, client
) -> None:
    sync = GitSync(desktop_settings(settings, repos, git_sync_interval_s=3600.0))
    await sync.start()
    try:
        await wait_for(lambda: sync.status is not None)
        from shared.gitsync import SyncRequest

        for _ in range(30):
            await client.broker.request_sync(SyncRequest(requested_by="burst", ts=time.time()))
        await asyncio.sleep(3.0)
        assert sync.status.fetches <= 1 + 2  # one pass per 2 s at most, not 30
    finally:
        await sync.stop()


async def test_sync_now_without_git_sync_fails_fast(settings: Settings) -> None:
    started = time.monotonic()
    done = await asyncio.to_thread(tradectl, "sync", "now", env=service_env(settings))
    assert done.returncode == 1 and "no git-sync report" in done.stderr
    assert time.monotonic() - started < 30
    shown = await asyncio.to_thread(tradectl, "sync", "status", env=service_env(settings))
    assert shown.returncode == 1


async def test_git_sync_killed_mid_fetch_leaves_nothing_once_restarted(
    platform: Platform, repos: Repos, silent_server: _SilentServer
) -> None:
    url = f"http://127.0.0.1:{silent_server.port}/platform.git"
    git(repos.desktop, "remote", "set-url", "origin", url)
    env = {"TP_CODE_DIR": str(repos.desktop), "TP_GIT_TIMEOUT_S": "120"}
    first = platform.start("git_sync", **env)
    old = set(await wait_for(lambda: pids_mentioning(url), timeout=30))
    fetch = str(repos.desktop)
    first.proc.kill()
    first.proc.wait()
    # git itself dies with git-sync (parent-death signal)...
    await wait_for(lambda: not [c for c in processes_mentioning(fetch) if " fetch " in c], 5)
    # ... and a helper it left (when it did not end with git) is ended by the next git-sync.
    platform.start("git_sync", **env)
    await wait_for(lambda: not (set(pids_mentioning(url)) & old), 15)


def test_leftover_git_group_is_killed_and_a_reused_id_is_not(tmp_path: Path) -> None:
    import subprocess

    from services.git_sync.gitproc import kill_leftover_group

    group_file = tmp_path / "git-sync.pgid"
    # A git process that blocks for ever (reading stdin from a pipe nobody writes to).
    stuck = subprocess.Popen(
        ["git", "hash-object", "--stdin"], stdin=subprocess.PIPE, start_new_session=True
    )
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        group_file.write_text(str(other.pid))  # not git: must be left alone
        assert kill_leftover_group(group_file) is False and other.poll() is None
        group_file.write_text(str(stuck.pid))
        assert kill_leftover_group(group_file) is True
        assert stuck.wait(5) == -9 and not group_file.exists()
    finally:
        for proc in (stuck, other):
            proc.kill()
            proc.wait()
