"""Session loss (issue #9.2, SPEC §5): a revoked access token is renewed with the password on
the bot's one device, or stops a token-only bot with exit 1; a sync token the server no longer
accepts is a start without a token. All against the real Synapse."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
from dataclasses import replace
from typing import Any

import pytest
from aiohttp import ClientSession
from nio import AsyncClient, LoginResponse

from adapter.matrix.config import Config
from adapter.matrix.homeserver.session import session_file
from adapter.matrix.store.records import SYNC_TOKEN_KEY
from core.store import SQLiteStore
from tests.integration.agents import GatedAgent
from tests.integration.conftest import TIMEOUT, BotProcess, BotRunner, unique

pytestmark = pytest.mark.warnings_expected("a lost session is logged at warning level")

CLIENT_API = "/_matrix/client/v3"


def saved_session(config: Config) -> dict:
    return json.loads(session_file(config.store_path).read_text())


async def client_api(
    config: Config, method: str, path: str, token: str, body: dict | None = None
) -> tuple[int, dict]:
    async with (
        ClientSession() as http,
        http.request(
            method,
            f"{config.homeserver}{CLIENT_API}{path}",
            json=body,
            headers={"Authorization": f"Bearer {token}"},
        ) as resp,
    ):
        return resp.status, await resp.json()


async def revoke(config: Config, token: str) -> None:
    """Sign the token's device out, as a user would from another client."""
    status, body = await client_api(config, "POST", "/logout", token, {})
    assert status == 200, body


async def devices(config: Config) -> list[str]:
    """The bot's devices, asked with its current saved session."""
    token = saved_session(config)["access_token"]
    status, body = await client_api(config, "GET", "/devices", token)
    assert status == 200, body
    return sorted(d["device_id"] for d in body["devices"])


async def keep_only_the_bots_device(config: Config) -> None:
    """Registering the account made a device too: delete it (user-interactive auth)."""
    session = saved_session(config)
    others = [d for d in await devices(config) if d != session["device_id"]]
    request: dict[str, Any] = {"devices": others}
    status, body = await client_api(
        config, "POST", "/delete_devices", session["access_token"], request
    )
    if status == 401:
        request["auth"] = {
            "type": "m.login.password",
            "session": body["session"],
            "identifier": {"type": "m.id.user", "user": config.user_id},
            "password": config.password,
        }
        status, body = await client_api(
            config, "POST", "/delete_devices", session["access_token"], request
        )
    assert status == 200, body
    assert await devices(config) == [session["device_id"]]


async def new_token(config: Config, password: str) -> str:
    """A token from a password login of the bot's account (a device of its own)."""
    client = AsyncClient(config.homeserver, config.user_id)
    resp = await client.login(password)
    await client.close()
    assert isinstance(resp, LoginResponse), resp
    return resp.access_token


async def test_revoked_token_logs_in_again_on_the_same_device_and_answers(bot, make_user):
    alice = await make_user("alice")
    _, _, chat = await alice.onboard(bot.user_id)
    await keep_only_the_bots_device(bot.config)
    old = saved_session(bot.config)
    await revoke(bot.config, old["access_token"])
    await alice.ask(chat, bot.user_id, "after the revocation", "Echo: after the revocation")
    [relogin] = bot.logs.named("session.relogin")
    new = saved_session(bot.config)
    assert relogin["old_device_id"] == old["device_id"] == new["device_id"]
    assert relogin["device_id"] == new["device_id"] and relogin["soft_logout"] is False
    assert await devices(bot.config) == [new["device_id"]]
    assert new["access_token"] != old["access_token"]
    assert stat.S_IMODE(os.stat(session_file(bot.config.store_path)).st_mode) == 0o600
    status, who = await client_api(bot.config, "GET", "/account/whoami", new["access_token"])
    assert status == 200 and who["device_id"] == new["device_id"]
    await bot.restart()  # the renewed session is the one reused
    assert bot.logs.named("session.restored", device_id=new["device_id"])
    await alice.ask(chat, bot.user_id, "after a restart", "Echo: after a restart")
    assert not [e for e in bot.logs.named("sync.failed") if "M_UNKNOWN_TOKEN" in e["error"]]


async def test_the_bot_keeps_one_device_across_three_total_losses(bot, make_user):
    alice = await make_user("alice")
    _, _, chat = await alice.onboard(bot.user_id)
    await keep_only_the_bots_device(bot.config)
    [device] = await devices(bot.config)
    for n in range(3):
        await bot.restart_losing("everything")
        assert await devices(bot.config) == [device]
        await alice.ask(chat, bot.user_id, f"after loss {n}", f"Echo: after loss {n}")


async def test_message_in_hand_when_the_token_is_revoked_is_answered_once(
    bot_config, logs, make_user
):
    agent = GatedAgent()
    runner = BotRunner(bot_config, logs, agent)
    await runner.start()
    alice = await make_user("alice")
    _, _, chat = await alice.onboard(runner.user_id)
    await alice.send(chat, "slow while revoked")
    await alice.wait_for(lambda: agent.holding)
    await revoke(bot_config, saved_session(bot_config)["access_token"])
    agent.release.set()  # its reply is among the first requests to meet the dead token
    await alice.wait_reply(chat, runner.user_id, "Echo: slow while revoked")
    await alice.ask(chat, runner.user_id, "then this", "Echo: then this")
    bodies = [ev["content"]["body"] for ev in alice.bot_messages(chat, runner.user_id)]
    assert bodies.count("Echo: slow while revoked") == 1
    assert not [b for b in bodies if b.startswith("Sorry")]
    assert len(logs.named("session.relogin")) == 1
    assert await runner.stop() == 0


async def test_token_only_bot_exits_1_with_login_failed_and_keeps_the_invite(bot_config, make_user):
    token = await new_token(bot_config, bot_config.password)
    config = replace(bot_config, password=None, access_token=token)
    proc = BotProcess(config)
    await proc.start()
    await proc.wait_log("bot.ready")
    await revoke(config, token)
    alice = await make_user("alice")
    lobby = await alice.open_lobby(config.user_id)  # wakes the bot's sync
    failed = await proc.wait_log("login.failed")
    assert "MATRIX_PASSWORD is not set" in failed["error"]
    assert proc.proc
    assert await asyncio.wait_for(proc.proc.wait(), TIMEOUT) == 1
    assert not [line for line in proc.lines if line["event"] == "session.relogin"]
    # A new token: the invite the dead session could not handle was kept, and is handled.
    again = BotProcess(replace(config, access_token=await new_token(config, bot_config.password)))
    await again.start()
    await again.wait_log("bot.ready")
    await alice.wait_reply(lobby, config.user_id, "Welcome to Lambda")
    assert await again.terminate() == 0


async def expiring_token(homeserver, config: Config, valid_for_s: float) -> tuple[str, float]:
    """A token of the bot's account that expires (Synapse's admin login API); then it is
    refused with ``soft_logout: true``. Returns it and its expiry (epoch seconds)."""
    admin = homeserver.register(unique("admin"), "admin-password", admin=True)
    admin_token = await new_token(replace(config, user_id=admin.user_id), admin.password)
    until = time.time() + valid_for_s
    async with (
        ClientSession() as http,
        http.post(
            f"{config.homeserver}/_synapse/admin/v1/users/{config.user_id}/login",
            json={"valid_until_ms": int(until * 1000)},
            headers={"Authorization": f"Bearer {admin_token}"},
        ) as resp,
    ):
        assert resp.status == 200, await resp.text()
        return (await resp.json())["access_token"], until


async def test_expired_token_soft_logout_logs_in_again_and_answers(
    homeserver, bot_config, logs, make_user
):
    token, expires_at = await expiring_token(homeserver, bot_config, valid_for_s=8)
    runner = BotRunner(replace(bot_config, access_token=token), logs)
    await runner.start()
    alice = await make_user("alice")
    _, _, chat = await alice.onboard(runner.user_id)
    await asyncio.sleep(max(0.0, expires_at + 0.5 - time.time()))  # the expiry itself
    await alice.ask(chat, runner.user_id, "after the expiry", "Echo: after the expiry")
    [relogin] = logs.named("session.relogin")
    assert relogin["soft_logout"] is True
    assert saved_session(bot_config)["device_id"] == relogin["device_id"]
    assert await runner.stop() == 0


async def write_sync_token(config: Config, token: str) -> None:
    store = await SQLiteStore.open(config.db_path)
    await store.set(SYNC_TOKEN_KEY, token)
    await store.close()


async def test_refused_sync_token_is_a_start_without_one(bot, make_user):
    alice = await make_user("alice")
    _, _, chat = await alice.onboard(bot.user_id)
    await alice.ask(chat, bot.user_id, "answered before", "Echo: answered before")
    await bot.stop()
    await alice.send(chat, "sent while away")
    await write_sync_token(bot.config, "not-a-synapse-token")
    await bot.start()
    [refused] = bot.logs.named("sync.token_refused")
    assert refused["since"] == "not-a-synapse-token"
    assert "M_UNKNOWN Invalid stream token" in refused["error"]
    await alice.wait_reply(chat, bot.user_id, "Echo: sent while away")
    await alice.ask(chat, bot.user_id, "and now", "Echo: and now")
    bodies = [ev["content"]["body"] for ev in alice.bot_messages(chat, bot.user_id)]
    assert bodies.count("Echo: answered before") == 1
    assert bodies.count("Echo: sent while away") == 1
    answered, skipped = bot.logs.caught_up()
    assert answered == 1 and skipped >= 1


async def test_a_failing_sync_is_retried_and_keeps_its_token(proxied_bot, proxy, make_user):
    alice = await make_user("alice")
    _, _, chat = await alice.onboard(proxied_bot.user_id)
    catchups = len(proxied_bot.logs.named("sync.catchup"))
    proxy.fail(r"/sync$", 500, {"errcode": "M_UNKNOWN", "error": "Invalid stream token"}, times=2)
    await alice.ask(chat, proxied_bot.user_id, "through the outage", "Echo: through the outage")
    assert len(proxied_bot.logs.named("sync.failed")) >= 2
    assert not proxied_bot.logs.named("sync.token_refused")
    assert len(proxied_bot.logs.named("sync.catchup")) == catchups
