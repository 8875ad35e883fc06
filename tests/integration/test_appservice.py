"""Appservice mode (SPEC §10, issue 22) against a Synapse of this module's own, configured with
registrations the harness writes (``app_service_config_files``): one bot account per test,
each with its own registration and listener port, so the tests do not see each other's rooms.
The listener's protocol (tokens, the same transaction twice, a refusing store) is driven
directly with aiohttp; the rest is users chatting."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from aiohttp import ClientSession
from appservice import registration
from homeserver import LocalHomeserver, free_port

from adapter.matrix.config import Config, Registration
from adapter.matrix.delivery.inbox import PUSHED_EVENT, PUSHED_TXN
from core.store import SQLiteStore
from tests.integration.conftest import (
    TIMEOUT,
    AppserviceHomeserver,
    BotProcess,
    BotRunner,
    doctor_tool,
    unique,
)
from tests.integration.test_db_faults import fill_disk, free_disk

API = "/_matrix/app/v1"


@pytest.fixture
def homeserver(appservice_homeserver: AppserviceHomeserver) -> AppserviceHomeserver:
    """Overrides the shared homeserver for this module: users are made on this one too."""
    return appservice_homeserver


def appservice_config(homeserver: LocalHomeserver, reg: Registration, tmp_path: Path) -> Config:
    return Config(
        homeserver=homeserver.url,
        user_id=f"@{reg.sender_localpart}:localhost",
        password=None,
        access_token=None,
        db_path=tmp_path / "lambda_matrix.db",
        store_path=tmp_path / "matrix_store",
        log_format="json",
        log_level="debug",
        appservice=reg,
        appservice_listen=reg.listen_addr(),
    )


@pytest.fixture
def bot_config(homeserver: AppserviceHomeserver, tmp_path: Path) -> Config:
    return appservice_config(homeserver, homeserver.take(), tmp_path)


async def push(
    config: Config, txn_id: str, events: list[dict], token: str | None = "", query: bool = False
) -> tuple[int, dict]:
    """PUT a transaction to the bot's listener, as the homeserver would (``token`` None: none
    given; "": the registration's)."""
    assert config.appservice and config.appservice_listen
    token = config.appservice.hs_token if token == "" else token
    headers, params = {}, {}
    if token is not None:
        if query:
            params["access_token"] = token
        else:
            headers["Authorization"] = f"Bearer {token}"
    url = f"http://{config.appservice_listen}{API}/transactions/{txn_id}"
    async with (
        ClientSession() as http,
        http.put(url, json={"events": events}, headers=headers, params=params) as resp,
    ):
        return resp.status, await resp.json()


def message(room_id: str, sender: str, body: str) -> dict:
    """A message event as the homeserver pushes it (its id made up here)."""
    return {
        "type": "m.room.message",
        "room_id": room_id,
        "sender": sender,
        "event_id": f"${unique('pushed')}",
        "origin_server_ts": int(time.time() * 1000),
        "content": {"msgtype": "m.text", "body": body},
    }


def echoes(user, room_id: str, bot_id: str) -> list[str]:
    return [
        ev["content"]["body"].removeprefix("Echo: ")
        for ev in user.bot_messages(room_id, bot_id)
        if ev["content"].get("body", "").startswith("Echo: ")
    ]


async def bot_devices(config: Config) -> list:
    assert config.appservice
    async with (
        ClientSession() as http,
        http.get(
            f"{config.homeserver}/_matrix/client/v3/devices",
            headers={"Authorization": f"Bearer {config.appservice.as_token}"},
        ) as resp,
    ):
        assert resp.status == 200, await resp.text()
        return (await resp.json())["devices"]


async def test_onboarding_chat_new_and_chats_without_login_or_device(bot, make_user):
    alice = await make_user("alice")
    lobby, _, chat = await alice.onboard(bot.user_id)
    await alice.ask(chat, bot.user_id, "hello pushed", "Echo: hello pushed")
    await alice.ask(chat, bot.user_id, "!new Second", "Second")
    listing = await alice.ask(lobby, bot.user_id, "!chats", "Second")
    assert "Chat 1" in listing["content"]["body"]
    assert await bot_devices(bot.config) == []
    assert not bot.config.store_path.exists()  # no session file
    assert not bot.logs.named("sync.starting") and bot.logs.named("appservice.ping")
    code, out, err = await doctor_tool(bot.config, "--json")  # it acts with the as_token too
    assert code == 0 and json.loads(out)["consistent"] is True, (out, err)


@pytest.mark.warnings_expected("refused requests are logged at warning level")
async def test_missing_or_wrong_hs_token_is_refused_and_changes_nothing(bot, make_user):
    alice = await make_user("alice")
    _, _, chat = await alice.onboard(bot.user_id)
    ev = message(chat, alice.user_id, "forged")
    assert await push(bot.config, "forged-1", [ev], token=None) == (
        401,
        {"errcode": "M_UNAUTHORIZED", "error": "no hs_token given"},
    )
    status, body = await push(bot.config, "forged-2", [ev], token="wrong")
    assert (status, body["errcode"]) == (403, "M_FORBIDDEN")
    status, body = await push(bot.config, "forged-3", [ev], token="wrong", query=True)
    assert (status, body["errcode"]) == (403, "M_FORBIDDEN")
    refused = bot.logs.named("appservice.unauthorized")
    assert [r["reason"] for r in refused] == ["missing", "wrong", "wrong"]
    listen, hs_token = bot.config.appservice_listen, bot.config.appservice.hs_token
    async with ClientSession() as http:
        async with http.post(f"http://{listen}{API}/ping", json={"transaction_id": "t"}) as resp:
            assert resp.status == 401
        auth = {"Authorization": f"Bearer {hs_token}"}
        async with http.post(f"http://{listen}{API}/ping", json={}, headers=auth) as resp:
            assert (resp.status, await resp.json()) == (200, {})
        async with http.get(f"http://{listen}{API}/users/@x:localhost", headers=auth) as resp:
            assert (resp.status, (await resp.json())["errcode"]) == (404, "M_UNRECOGNIZED")
    await alice.ask(chat, bot.user_id, "real", "Echo: real")
    assert echoes(alice, chat, bot.user_id) == ["real"]  # the forged message was never handled
    store = await SQLiteStore.open(bot.config.db_path)
    try:
        assert not [
            k for k, _ in await store.scan(PUSHED_TXN) if k.startswith(PUSHED_TXN + "forged")
        ]
    finally:
        await store.close()


async def test_the_same_transaction_twice_and_an_event_pushed_again_are_recorded_once(
    bot, make_user
):
    alice = await make_user("alice")
    _, _, chat = await alice.onboard(bot.user_id)
    ev = message(chat, alice.user_id, "pushed twice")
    assert await push(bot.config, "again-1", [ev]) == (200, {})
    assert await push(bot.config, "again-1", [ev]) == (200, {})
    assert await push(bot.config, "again-2", [ev]) == (200, {})
    await alice.wait_reply(chat, bot.user_id, "Echo: pushed twice")
    await alice.ask(chat, bot.user_id, "then", "Echo: then")
    assert echoes(alice, chat, bot.user_id) == ["pushed twice", "then"]
    store = await SQLiteStore.open(bot.config.db_path)
    try:
        assert await store.get(PUSHED_EVENT + ev["event_id"]) is not None
        assert await store.get(PUSHED_TXN + "again-2") is not None
    finally:
        await store.close()


async def test_down_while_users_write_then_everything_answered_once_in_order(bot, make_user):
    alice = await make_user("alice")
    _, _, chat = await alice.onboard(bot.user_id)
    await alice.ask(chat, bot.user_id, "before", "Echo: before")
    catchups = len(bot.logs.named("sync.swept"))
    await bot.stop()
    sent = [f"while down {n}" for n in range(5)]
    for body in sent:
        await alice.send(chat, body)
    await bot.start()  # its ping has the homeserver push what it holds at once
    await alice.wait_for(lambda: len(echoes(alice, chat, bot.user_id)) == 1 + len(sent))
    await alice.ask(chat, bot.user_id, "after", "Echo: after")
    assert echoes(alice, chat, bot.user_id) == ["before", *sent, "after"]
    assert len(bot.logs.named("sync.swept")) == catchups  # the DB was kept: no catch-up


async def test_a_total_loss_answers_what_was_not_answered_once(bot, make_user):
    alice = await make_user("alice")
    _, _, chat = await alice.onboard(bot.user_id)
    await alice.ask(chat, bot.user_id, "answered before", "Echo: answered before")
    await bot.stop()
    await alice.send(chat, "sent while lost")
    bot.config.store_path.mkdir()  # there is no session folder to lose in this mode
    await bot.lose("everything")
    await bot.start()
    await alice.wait_reply(chat, bot.user_id, "Echo: sent while lost")
    await alice.ask(chat, bot.user_id, "and now", "Echo: and now")
    assert echoes(alice, chat, bot.user_id) == ["answered before", "sent while lost", "and now"]
    await bot.logs.wait_for("sync.swept", via="messages", count=2)  # the first start's too
    await bot.restart()  # caught up once: the next start does not again
    assert len(bot.logs.named("sync.swept")) == 2


async def test_kill_9_mid_burst_answers_each_message_once_in_order(
    bot_config, logs, make_user, monkeypatch
):
    monkeypatch.setenv("TEST_AGENT_DELAY_S", "0.3")
    config = replace(bot_config, agent="tests.integration.agents:SlowAgent")
    runner = BotRunner(config, logs)
    await runner.start()
    alice = await make_user("alice")
    _, _, chat = await alice.onboard(runner.user_id)
    await runner.stop()
    proc = BotProcess(config, LOG_LEVEL="info")
    await proc.start()
    await proc.wait_log("bot.ready")
    sent = [f"burst {n}" for n in range(6)]
    for body in sent:
        await alice.send(chat, body)
    await alice.wait_for(lambda: len(echoes(alice, chat, runner.user_id)) >= 2)
    await proc.kill()
    await runner.start()
    # The homeserver pushes again what the killed bot did not acknowledge on its own backoff
    # (2 s, 4 s, 8 s...; the start's ping cuts it short only once it is in recovery): two runs
    # of the full suite in ten missed the 30 s wait here. Cause not found yet; see the note.
    await alice.wait_for(lambda: len(echoes(alice, chat, runner.user_id)) >= len(sent), 90)
    await alice.ask(chat, runner.user_id, "after", "Echo: after")
    assert echoes(alice, chat, runner.user_id) == [*sent, "after"]
    await runner.stop()


@pytest.mark.warnings_expected("the refused writes are logged at error level")
async def test_a_transaction_the_store_refuses_gets_a_5xx_then_is_recorded_once(bot, make_user):
    alice = await make_user("alice")
    _, _, chat = await alice.onboard(bot.user_id)
    await bot.stop()
    proc = BotProcess(bot.config, LOG_LEVEL="info")
    await proc.start()
    await proc.wait_log("bot.ready")
    ev = message(chat, alice.user_id, "refused then recorded")
    fill_disk(proc)
    status, body = await push(bot.config, "full-1", [ev])
    assert status == 500 and body["errcode"] == "M_UNKNOWN"
    free_disk(proc)
    assert await push(bot.config, "full-1", [ev]) == (200, {})
    await alice.wait_reply(chat, bot.user_id, "Echo: refused then recorded")
    await alice.ask(chat, bot.user_id, "next", "Echo: next")
    assert echoes(alice, chat, bot.user_id) == ["refused then recorded", "next"]
    assert await proc.terminate() == 0


async def test_an_account_that_synced_moves_to_appservice_mode_with_its_rooms(
    tmp_path: Path, logs, make_user
):
    # A Synapse of its own: the registration is added to it, and it is restarted, as an
    # operator would.
    data = registration(f"http://127.0.0.1:{free_port()}", "@mover:localhost", "mover")
    reg_path = tmp_path / "registration.yaml"
    reg_path.write_text(yaml.safe_dump(data))
    hs = LocalHomeserver(tmp_path / "synapse")
    hs.start()
    try:
        account = hs.register("mover", "mover-password")
        synced = Config(
            homeserver=hs.url,
            user_id=account.user_id,
            password=account.password,
            access_token=None,
            db_path=tmp_path / "lambda_matrix.db",
            store_path=tmp_path / "matrix_store",
            log_format="json",
            log_level="debug",
        )
        bot = BotRunner(synced, logs)
        await bot.start()
        alice = await make_user_on(hs, "alice")
        lobby, _, chat = await alice.onboard(bot.user_id)
        await alice.ask(chat, bot.user_id, "synced", "Echo: synced")
        await bot.stop()
        await alice.send(chat, "while moving")
        hs.stop()
        hs.extra_config["app_service_config_files"] = [str(reg_path)]
        hs.start()
        reg = Registration.load(reg_path)
        moved = replace(synced, password=None, appservice=reg, appservice_listen=reg.listen_addr())
        bot = BotRunner(moved, logs)
        await bot.start()
        await alice.wait_reply(chat, bot.user_id, "Echo: while moving")
        await alice.ask(chat, bot.user_id, "pushed", "Echo: pushed")
        await alice.ask(chat, bot.user_id, "!new Moved", "Moved")
        listing = await alice.ask(lobby, bot.user_id, "!chats", "Moved")
        assert "Chat 1" in listing["content"]["body"]
        assert echoes(alice, chat, bot.user_id) == ["synced", "while moving", "pushed"]
        await bot.stop()
        await alice.client.close()
    finally:
        hs.stop()


async def make_user_on(hs: LocalHomeserver, prefix: str):
    from nio import AsyncClient

    from tests.integration.conftest import TestUser

    account = hs.register(unique(prefix), "user-password")
    client = AsyncClient(hs.url, account.user_id)
    await client.login(account.password)
    user = TestUser(client)
    await user.sync(timeout_ms=0)
    return user


@pytest.mark.warnings_expected("config.invalid is an error")
async def test_listener_port_in_use_exits_2(bot_config, logs):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        runner = BotRunner(
            replace(bot_config, appservice_listen=replace(bot_config.appservice_listen, port=port)),
            logs,
        )
        await runner.start(wait_ready=False)
        assert await asyncio.wait_for(runner.exit_code(), TIMEOUT) == 2


@pytest.mark.warnings_expected("login.failed is an error")
async def test_a_registration_the_homeserver_does_not_know_exits_1(homeserver, tmp_path, logs):
    path = tmp_path / "unknown.yaml"
    path.write_text(
        yaml.safe_dump(registration(f"http://127.0.0.1:{free_port()}", "@ghost:localhost", "g"))
    )
    runner = BotRunner(appservice_config(homeserver, Registration.load(path), tmp_path), logs)
    await runner.start(wait_ready=False)
    assert await runner.exit_code() == 1
    [failed] = logs.named("login.failed")
    assert "app_service_config_files" in failed["error"]
