"""Integration fixtures: the bot runs in-process against the session's Synapse; test users
are real nio clients. Waiting is always for a condition, never a fixed sleep."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import structlog
import yaml
from appservice import registration
from homeserver import LocalHomeserver, free_port
from nio import (
    AsyncClient,
    LoginResponse,
    RoomCreateResponse,
    RoomSendResponse,
    SyncResponse,
    TypingNoticeEvent,
)

from adapter.matrix.config import Config, Registration
from adapter.matrix.handlers.chat_rooms import linked_rooms
from adapter.matrix.run import run_bot
from core.store import is_postgres_url, open_store
from core.store.postgres import drop_bot_tables
from tests.integration.fault_proxy import FaultProxy

_names = itertools.count()
TIMEOUT = 30.0
ROOT = Path(__file__).resolve().parents[2]


def unique(prefix: str) -> str:
    return f"{prefix}{int(time.time() * 1000) % 10**8}x{next(_names)}"


class LogSink:
    """Every structlog event of the test, as dicts (structlog.testing.capture_logs)."""

    def __init__(self, entries: list[MutableMapping[str, Any]]) -> None:
        self.entries = entries

    def named(self, event: str, **fields: Any) -> list[MutableMapping[str, Any]]:
        return [
            e
            for e in self.entries
            if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
        ]

    def caught_up(self) -> tuple[int, int]:
        """(answered, skipped) by the catch-up of the last start: the rooms' reads back."""
        last = max(i for i, e in enumerate(self.entries) if e.get("event") == "sync.starting")
        reads = [e for e in self.entries[last:] if e.get("event") == "sync.catchup_read"]
        return sum(r["answered"] for r in reads), sum(r["skipped"] for r in reads)

    async def wait_for(
        self, event: str, timeout: float = TIMEOUT, count: int = 1, **fields: Any
    ) -> list[MutableMapping[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(found := self.named(event, **fields)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no {event} {fields} in logs: {[e.get('event') for e in self.entries][-30:]}"
                )
            await asyncio.sleep(0.05)
        return found


class BotRunner:
    """The bot in-process, started and stopped like a real process would be."""

    def __init__(self, config: Config, logs: LogSink, agent: Any = None) -> None:
        self.config = config
        self.logs = logs
        self.agent = agent  # None: the one config.agent names
        self._task: asyncio.Task | None = None
        self._stop: asyncio.Event | None = None

    @property
    def user_id(self) -> str:
        return self.config.user_id

    async def start(self, wait_ready: bool = True) -> None:
        ready_before = len(self.logs.named("bot.ready"))
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(run_bot(self.config, self._stop, self.agent))
        if wait_ready:
            await self.logs.wait_for("bot.ready", count=ready_before + 1)

    async def stop(self) -> int:
        assert self._task and self._stop
        self._stop.set()
        code = await asyncio.wait_for(self._task, TIMEOUT)
        self._task = None
        return code

    async def exit_code(self) -> int:
        """Wait for the bot to exit by itself (a refusal at start), without stopping it."""
        assert self._task
        code = await asyncio.wait_for(self._task, TIMEOUT)
        self._task = None
        return code

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def lose(self, kind: str) -> None:
        """Lose part of the local state while the bot is stopped: ``everything`` (DB and
        session), ``matrix_store`` (session), ``sync_token``, or every key of a kind."""
        db, session = self.config.db_path, self.config.store_path
        if kind in ("everything", "matrix_store"):
            shutil.rmtree(session)
        if kind == "everything" and is_postgres_url(self.config.db):
            conn = await asyncpg.connect(self.config.db)
            try:
                await drop_bot_tables(conn)
            finally:
                await conn.close()
        elif kind == "everything":
            for suffix in ("", "-wal", "-shm"):
                Path(f"{db}{suffix}").unlink(missing_ok=True)
        elif kind != "matrix_store":
            prefix = "sync_token" if kind == "sync_token" else f"{kind}:"
            store = await open_store(self.config.db)
            async with store.transaction() as tx:
                for key, _ in await store.scan(prefix):
                    tx.delete(key)
            await store.close()

    async def restart_losing(self, kind: str) -> None:
        await self.stop()
        await self.lose(kind)
        await self.start()

    async def server_room_count(self) -> int:
        """How many rooms the bot is joined to, asked of the homeserver on a fresh login."""
        client = AsyncClient(self.config.homeserver, self.config.user_id)
        await client.login(self.config.password)
        try:
            return len((await client.joined_rooms()).rooms)
        finally:
            await client.logout()
            await client.close()


class BotProcess:
    """The bot as a real process (``python -m adapter.matrix``), for SIGTERM and kill -9."""

    def __init__(self, config: Config, **env: str) -> None:
        self.env = {**os.environ, **config.to_env(), "LOG_FORMAT": "json", **env}
        self.lines: list[dict] = []
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "adapter.matrix",
            cwd=ROOT,
            env=self.env,
            stderr=asyncio.subprocess.PIPE,
        )

    async def wait_log(self, event: str, timeout: float = TIMEOUT) -> dict:
        """Read the process's JSON log until a line with ``event``; returns that line."""
        assert self.proc and self.proc.stderr
        deadline = time.monotonic() + timeout
        while True:
            raw = await asyncio.wait_for(
                self.proc.stderr.readline(), max(0.1, deadline - time.monotonic())
            )
            assert raw, f"the bot exited before logging {event}: {self.lines[-5:]}"
            self.lines.append(json.loads(raw))
            if self.lines[-1].get("event") == event:
                return self.lines[-1]

    async def kill(self) -> None:
        """kill -9: no cleanup of any kind runs."""
        assert self.proc
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def terminate(self) -> int:
        assert self.proc
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), TIMEOUT)


async def reset_tool(config: Config, *args: str, stdin: bytes = b"") -> tuple[int, str]:
    """Run ``tools/reset_local.py`` with the bot's environment: (exit code, output)."""
    env = {**os.environ, **config.to_env()}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "tools/reset_local.py",
        *args,
        cwd=ROOT,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate(stdin)
    assert proc.returncode is not None  # communicate() waited for the exit
    return proc.returncode, out.decode()


async def doctor_tool(config: Config, *args: str, **env: str) -> tuple[int, str, str]:
    """Run ``tools/doctor.py`` with the bot's environment (``env`` overrides a variable):
    (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "tools/doctor.py",
        *args,
        cwd=ROOT,
        env={**os.environ, **config.to_env(), **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None  # communicate() waited for the exit
    return proc.returncode, out.decode(), err.decode()


class TestUser:
    """A person with a Matrix client: sends, accepts invites, waits for the bot's answers."""

    __test__ = False

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self.user_id = client.user_id
        self.timeline: dict[str, list[dict]] = defaultdict(list)
        self.invites: set[str] = set()
        self.typing: dict[str, list[str]] = {}  # room -> who is typing, as last synced
        self.next_batch: str | None = None

    async def sync(self, timeout_ms: int = 300) -> None:
        resp = await self.client.sync(timeout=timeout_ms, since=self.next_batch)
        assert isinstance(resp, SyncResponse), resp
        for room_id, info in resp.rooms.join.items():
            self.timeline[room_id].extend(ev.source for ev in info.timeline.events)
            for ev in info.ephemeral:
                if isinstance(ev, TypingNoticeEvent):
                    self.typing[room_id] = ev.users
            self.invites.discard(room_id)
        self.invites.update(resp.rooms.invite)
        self.next_batch = resp.next_batch

    async def wait_for(self, check: Callable[[], Any], timeout: float = TIMEOUT) -> Any:
        deadline = time.monotonic() + timeout
        while not (result := check()):
            if time.monotonic() > deadline:
                raise AssertionError("condition not met in time")
            await self.sync()
        return result

    def bot_messages(self, room_id: str, bot_id: str) -> list[dict]:
        return [
            ev
            for ev in self.timeline[room_id]
            if ev.get("type") == "m.room.message" and ev.get("sender") == bot_id
        ]

    async def wait_reply(
        self, room_id: str, bot_id: str, contains: str, timeout: float = TIMEOUT
    ) -> dict:
        def find():
            return next(
                (
                    ev
                    for ev in self.bot_messages(room_id, bot_id)
                    if contains in ev["content"].get("body", "")
                ),
                None,
            )

        return await self.wait_for(find, timeout)

    async def send(self, room_id: str, body: str) -> str:
        return await self.send_content(room_id, {"msgtype": "m.text", "body": body})

    async def send_content(self, room_id: str, content: dict) -> str:
        resp = await self.client.room_send(room_id, "m.room.message", content)
        assert isinstance(resp, RoomSendResponse), resp
        return resp.event_id

    async def ask(self, room_id: str, bot_id: str, body: str, expect: str) -> dict:
        """Send ``body`` and wait for a bot answer after it containing ``expect``."""
        seen = len(self.bot_messages(room_id, bot_id))
        await self.send(room_id, body)

        def find():
            return next(
                (
                    ev
                    for ev in self.bot_messages(room_id, bot_id)[seen:]
                    if expect in ev["content"].get("body", "")
                ),
                None,
            )

        return await self.wait_for(find)

    async def join(self, room_id: str) -> None:
        resp = await self.client.join(room_id)
        assert not hasattr(resp, "status_code") or resp.status_code is None, resp

    async def open_lobby(self, bot_id: str) -> str:
        resp = await self.client.room_create(name="lobby", invite=[bot_id])
        assert isinstance(resp, RoomCreateResponse), resp
        return resp.room_id

    async def onboard(self, bot_id: str) -> tuple[str, str, str]:
        """Invite the bot, accept the Space and first chat. Returns (lobby, space, chat)."""
        lobby = await self.open_lobby(bot_id)
        welcome = await self.wait_reply(lobby, bot_id, "Space")
        await self.wait_for(lambda: len(self.invites) >= 2)
        rooms = sorted(self.invites)
        for room_id in rooms:
            await self.join(room_id)
        space, chat = linked_rooms(welcome["content"]["body"])[:2]
        return lobby, space, chat


@pytest.fixture
def logs(request: pytest.FixtureRequest):
    """A healthy run logs nothing at warning level (SPEC §6): a test that provokes a fault
    says so with ``@pytest.mark.warnings_expected(why)``."""
    with structlog.testing.capture_logs() as entries:
        yield LogSink(entries)
    if request.node.get_closest_marker("warnings_expected") is None:
        loud = [e for e in entries if e.get("log_level") in ("warning", "error", "critical")]
        assert not loud, f"a healthy run logged {len(loud)} warnings: {loud[:3]}"


BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture
def backend() -> str:
    """Where the bot keeps its records: a SQLite file. A test that matters for storage runs
    on both with ``@pytest.mark.parametrize("backend", BACKENDS)``."""
    return "sqlite"


@pytest.fixture
def bot_config(homeserver, tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> Config:
    account = homeserver.register(unique("bot"), "bot-password")
    return Config(
        db_url=request.getfixturevalue("pg_url") if backend == "postgresql" else None,
        homeserver=homeserver.url,
        user_id=account.user_id,
        password=account.password,
        access_token=None,
        db_path=tmp_path / "lambda_matrix.db",
        store_path=tmp_path / "matrix_store",
        log_format="json",
        log_level="debug",
    )


@pytest.fixture
async def bot(bot_config: Config, logs: LogSink):
    runner = BotRunner(bot_config, logs)
    await runner.start()
    yield runner
    if runner._task is not None:
        await runner.stop()


@pytest.fixture
async def make_user(homeserver):
    clients: list[AsyncClient] = []

    async def make(prefix: str = "user") -> TestUser:
        account = homeserver.register(unique(prefix), "user-password")
        client = AsyncClient(homeserver.url, account.user_id)
        resp = await client.login(account.password)
        assert isinstance(resp, LoginResponse), resp
        clients.append(client)
        user = TestUser(client)
        await user.sync(timeout_ms=0)
        return user

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
async def proxy(homeserver):
    fault_proxy = FaultProxy(homeserver.url)
    await fault_proxy.start()
    yield fault_proxy
    await fault_proxy.stop()


@pytest.fixture
async def proxied_bot(bot_config: Config, proxy: FaultProxy, logs: LogSink):
    """The bot talking to Synapse through the fault-injecting proxy."""
    from dataclasses import replace

    runner = BotRunner(replace(bot_config, homeserver=proxy.url), logs)
    await runner.start()
    yield runner
    if runner._task is not None:
        await runner.stop()


ACCOUNTS = 16  # bot accounts (registrations) in the appservice Synapse; one per test at most


class AppserviceHomeserver(LocalHomeserver):
    """A Synapse with ``ACCOUNTS`` registrations, handed out one per test."""

    def __init__(self, data_dir: Path) -> None:
        self.registrations = []
        for n in range(ACCOUNTS):
            data = registration(
                f"http://127.0.0.1:{free_port()}", f"@lambda{n}:localhost", f"lambda{n}"
            )
            path = data_dir / f"registration{n}.yaml"
            path.write_text(yaml.safe_dump(data))
            self.registrations.append(path)
        super().__init__(
            data_dir / "synapse",
            extra_config={"app_service_config_files": [str(p) for p in self.registrations]},
        )
        self._next = itertools.count()

    def take(self) -> Registration:
        return Registration.load(self.registrations[next(self._next)])


@pytest.fixture(scope="session")
def appservice_homeserver(tmp_path_factory: pytest.TempPathFactory):
    """A Synapse with appservice registrations, for the modules of appservice mode (each
    overrides ``homeserver`` with it, so their users are made on it too)."""
    hs = AppserviceHomeserver(tmp_path_factory.mktemp("appservice"))
    hs.start()
    yield hs
    hs.stop()
