"""The session outlives a revoked token: the pure rules (what is a refused token or sync
token, which device to log in on), and ``SessionClient`` against a small fake homeserver
that issues, revokes and checks tokens the way Synapse does."""

from __future__ import annotations

import asyncio
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from nio import ErrorResponse, JoinedRoomsResponse
from structlog.testing import capture_logs

from adapter.matrix.bot import client_config
from adapter.matrix.config import Config
from adapter.matrix.homeserver.session import (
    LoginFailed,
    SessionClient,
    TokenRefused,
    bot_device_id,
    log_in,
    session_file,
    token_refused,
)
from adapter.matrix.ingest.sync import sync_token_refused
from adapter.matrix.observe.metrics import Metrics

BOT, PASSWORD = "@lambda:fake", "secret"
DEVICE = web.RequestKey("device", str)


def test_only_m_unknown_token_is_a_refused_token():
    assert token_refused(ErrorResponse("Invalid access token passed.", "M_UNKNOWN_TOKEN"))
    assert token_refused(
        ErrorResponse("Access token has expired", "M_UNKNOWN_TOKEN", soft_logout=True)
    )
    assert not token_refused(ErrorResponse("Missing access token", "M_MISSING_TOKEN"))
    assert not token_refused(ErrorResponse("Too many requests", "M_LIMIT_EXCEEDED"))
    assert not token_refused(JoinedRoomsResponse([]))


def test_the_bots_device_is_the_known_one_else_derived_from_its_user_id_alone():
    assert bot_device_id("@lambda:example.org", "OLD") == "OLD"
    derived = bot_device_id("@lambda:example.org")
    assert (
        derived
        == bot_device_id("@lambda:example.org", None)
        == bot_device_id("@lambda:example.org", "")
    )
    assert derived.startswith("LAMBDA") and derived.isalnum() and len(derived) == 16
    assert bot_device_id("@other:example.org") != derived


def test_only_synapses_invalid_stream_token_answer_means_the_sync_token_is_refused():
    assert sync_token_refused(400, "M_UNKNOWN", "Invalid stream token")
    for transient in (
        (500, "M_UNKNOWN", "Internal server error"),
        (502, None, "Bad Gateway"),
        (None, None, "unreachable"),
        (429, "M_LIMIT_EXCEEDED", "Too Many Requests"),
        (504, "M_UNKNOWN", "Invalid stream token"),
    ):
        assert not sync_token_refused(*transient)
    for other_400 in (
        (400, "M_INVALID_PARAM", "Invalid stream token"),
        (400, "M_UNKNOWN", "'from' is not a valid query parameter"),
        (400, "M_NOT_JSON", "Invalid filter JSON"),
    ):
        assert not sync_token_refused(*other_400)


@dataclass
class FakeHomeserver:
    """Password login, whoami and joined_rooms, with tokens that can be revoked."""

    tokens: dict[str, str] = field(default_factory=dict)  # token -> device
    devices: set[str] = field(default_factory=set)
    expired: set[str] = field(default_factory=set)  # soft-logged-out tokens
    revoke_every_login: bool = False
    requests: int = 0
    together: int = 0  # joined_rooms answers none until this many are in at once
    url: str = ""  # set by the fake_hs fixture once it listens
    _arrived: list[asyncio.Event] = field(default_factory=list)
    _ids: itertools.count = field(default_factory=itertools.count)

    def issue(self, device: str | None = None) -> str:
        device = device or f"DEV{next(self._ids)}"
        token = f"tok{next(self._ids)}"
        self.devices.add(device)
        self.tokens[token] = device
        return token

    def revoke(self, token: str, soft: bool = False) -> None:
        device = self.tokens.pop(token)
        if soft:
            self.expired.add(token)
        elif device not in self.tokens.values():
            self.devices.discard(device)  # a logout deletes the device

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_post("/_matrix/client/v3/login", self._login)
        app.router.add_get("/_matrix/client/v3/account/whoami", self._whoami)
        app.router.add_get("/_matrix/client/v3/joined_rooms", self._joined_rooms)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        self.requests += 1
        if request.path.endswith("/login"):
            return await handler(request)
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if token not in self.tokens:
            return web.json_response(
                {
                    "errcode": "M_UNKNOWN_TOKEN",
                    "error": "Invalid token",
                    "soft_logout": token in self.expired,
                },
                status=401,
            )
        request[DEVICE] = self.tokens[token]
        return await handler(request)

    async def _login(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("password") != PASSWORD:
            return web.json_response(
                {"errcode": "M_FORBIDDEN", "error": "Invalid password"}, status=403
            )
        token = self.issue(body.get("device_id"))
        if self.revoke_every_login:
            self.revoke(token)
        return web.json_response(
            {"user_id": BOT, "access_token": token, "device_id": self.tokens.get(token, "gone")}
        )

    async def _whoami(self, request: web.Request) -> web.Response:
        return web.json_response({"user_id": BOT, "device_id": request[DEVICE]})

    async def _joined_rooms(self, request: web.Request) -> web.Response:
        await asyncio.sleep(0.01)  # concurrent requests overlap
        if self.together:
            self._arrived.append(asyncio.Event())
            if len(self._arrived) >= self.together:
                for arrived in self._arrived:
                    arrived.set()
            await self._arrived[-1].wait()
        return web.json_response({"joined_rooms": ["!a:fake"]})


@pytest.fixture
async def fake_hs():
    fake = FakeHomeserver()
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    fake.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield fake
    await runner.cleanup()


def config_for(
    fake: FakeHomeserver,
    tmp_path: Path,
    *,
    password: str | None = PASSWORD,
    access_token: str | None = None,
) -> Config:
    return Config(
        homeserver=fake.url,
        user_id=BOT,
        password=password,
        access_token=access_token,
        db_path=tmp_path / "db",
        store_path=tmp_path / "store",
        log_format="json",
        log_level="info",
    )


async def logged_in(config: Config) -> tuple[SessionClient, list[str]]:
    """A client logged in like the bot is, renewing; the list records each ``on_lost`` call."""
    client = SessionClient(config, client_config())
    await log_in(client, config)
    lost: list[str] = []
    client.renew_when_refused(on_lost=lambda: lost.append("lost"))
    return client, lost


async def test_concurrent_requests_meeting_a_revoked_token_share_one_login_on_the_same_device(
    fake_hs, tmp_path
):
    config = config_for(fake_hs, tmp_path)
    client, lost = await logged_in(config)
    old_device = client.device_id
    fake_hs.revoke(client.access_token)
    with capture_logs() as entries:
        answers = await asyncio.gather(*(client.joined_rooms() for _ in range(5)))
    assert all(isinstance(a, JoinedRoomsResponse) for a in answers)
    [relogin] = [e for e in entries if e["event"] == "session.relogin"]
    assert relogin["old_device_id"] == old_device and relogin["soft_logout"] is False
    assert fake_hs.devices == {relogin["device_id"]} == {old_device}
    saved = json.loads(session_file(config.store_path).read_text())
    assert saved["access_token"] == client.access_token in fake_hs.tokens
    assert lost == []
    await client.close()


async def test_a_renewal_is_counted_once_for_all_the_requests_that_met_the_revoked_token(
    fake_hs, tmp_path
):
    config = config_for(fake_hs, tmp_path)
    client = SessionClient(config, client_config())
    await log_in(client, config)
    metrics = Metrics()
    client.renew_when_refused(on_lost=lambda: None, on_renewed=metrics.session_renewals.inc)
    fake_hs.revoke(client.access_token)
    await asyncio.gather(*(client.joined_rooms() for _ in range(5)))
    assert metrics.registry.get_sample_value("lambda_session_renewals_total") == 1


async def test_a_burst_of_requests_past_a_hundred_is_not_held_back_in_the_bot(fake_hs, tmp_path):
    client, _ = await logged_in(config_for(fake_hs, tmp_path))
    fake_hs.together = 150  # answers of 150 agent calls, say, sent at the same moment
    answers = await asyncio.wait_for(
        asyncio.gather(*(client.joined_rooms() for _ in range(150))), 10
    )
    assert all(isinstance(a, JoinedRoomsResponse) for a in answers)
    await client.close()


async def test_a_soft_logout_logs_in_again_on_the_same_device(fake_hs, tmp_path):
    client, _ = await logged_in(config_for(fake_hs, tmp_path))
    device = client.device_id
    fake_hs.revoke(client.access_token, soft=True)
    with capture_logs() as entries:
        assert isinstance(await client.joined_rooms(), JoinedRoomsResponse)
    [relogin] = [e for e in entries if e["event"] == "session.relogin"]
    assert relogin["soft_logout"] is True and relogin["device_id"] == device
    assert fake_hs.devices == {device}
    await client.close()


async def test_token_only_session_is_lost_and_the_dead_token_never_sent_again(fake_hs, tmp_path):
    token = fake_hs.issue()
    client, lost = await logged_in(config_for(fake_hs, tmp_path, password=None, access_token=token))
    fake_hs.revoke(token)
    with pytest.raises(TokenRefused, match="MATRIX_PASSWORD is not set"):
        await client.joined_rooms()
    assert lost == ["lost"] and isinstance(client.lost, LoginFailed)
    sent = fake_hs.requests
    with pytest.raises(TokenRefused):
        await client.joined_rooms()
    assert fake_hs.requests == sent
    await client.close()


async def test_a_fresh_token_refused_at_once_loses_the_session(fake_hs, tmp_path):
    client, lost = await logged_in(config_for(fake_hs, tmp_path))
    fake_hs.revoke_every_login = True
    fake_hs.revoke(client.access_token)
    with pytest.raises(TokenRefused, match="just issued"):
        await client.joined_rooms()
    assert lost == ["lost"]
    assert len(fake_hs.devices) <= 1  # one login was tried, not one per request
    await client.close()


async def test_a_wrong_password_at_renewal_loses_the_session(fake_hs, tmp_path):
    config = config_for(fake_hs, tmp_path)
    client, lost = await logged_in(config)
    client.settings = config_for(fake_hs, tmp_path, password="changed")
    fake_hs.revoke(client.access_token)
    with pytest.raises(TokenRefused, match="M_FORBIDDEN"):
        await client.joined_rooms()
    assert lost == ["lost"] and "M_FORBIDDEN" in str(client.lost)
    await client.close()


@pytest.mark.parametrize("soft", [False, True])
async def test_a_saved_session_refused_at_start_logs_in_again_on_the_same_device(
    fake_hs, tmp_path, soft
):
    config = config_for(fake_hs, tmp_path)
    first, _ = await logged_in(config)
    fake_hs.revoke(first.access_token, soft=soft)
    await first.close()
    client = SessionClient(config, client_config())
    session = await log_in(client, config)
    assert session.device_id == first.device_id
    assert fake_hs.devices == {session.device_id}
    assert json.loads(session_file(config.store_path).read_text())["device_id"] == session.device_id
    await client.close()


async def test_a_login_after_the_session_is_lost_finds_the_same_device(fake_hs, tmp_path):
    config = config_for(fake_hs, tmp_path)
    devices = []
    for _ in range(3):  # each time, the session folder is gone
        client = SessionClient(config, client_config())
        devices.append((await log_in(client, config)).device_id)
        await client.close()
        session_file(config.store_path).unlink()
    assert devices == [bot_device_id(BOT)] * 3
    assert fake_hs.devices == {bot_device_id(BOT)}
