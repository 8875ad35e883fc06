"""Restarts: same device, missed messages answered exactly once, answered ones never again."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from nio import AsyncClient

from adapter.matrix.homeserver.session import session_file
from tests.integration.conftest import ROOT, BotProcess, BotRunner


async def test_restart_reuses_device_and_session_file_is_private(bot, make_user):
    first = json.loads(session_file(bot.config.store_path).read_text())
    mode = stat.S_IMODE(os.stat(session_file(bot.config.store_path)).st_mode)
    assert mode == 0o600
    await bot.restart()
    again = json.loads(session_file(bot.config.store_path).read_text())
    assert again["device_id"] == first["device_id"]
    assert bot.logs.named("session.restored", device_id=first["device_id"])


async def test_message_sent_while_down_is_answered_exactly_once(bot, make_user):
    alice = await make_user("alice")
    _, _, chat = await alice.onboard(bot.user_id)
    await alice.ask(chat, bot.user_id, "before", "Echo: before")
    await bot.stop()
    await alice.send(chat, "while you were away")
    await bot.start()
    await alice.wait_reply(chat, bot.user_id, "Echo: while you were away")
    await bot.restart()
    await alice.ask(chat, bot.user_id, "after", "Echo: after")
    bodies = [ev["content"]["body"] for ev in alice.bot_messages(chat, bot.user_id)]
    assert bodies.count("Echo: while you were away") == 1


async def test_start_after_total_loss_answers_unanswered_messages_and_handles_invites(
    bot, make_user
):
    alice, bob = await make_user("alice"), await make_user("bob")
    _, _, chat = await alice.onboard(bot.user_id)
    await alice.ask(chat, bot.user_id, "answered before", "Echo: answered before")
    await bot.stop()
    await alice.send(chat, "sent while away")
    bob_lobby = await bob.open_lobby(bot.user_id)  # an invite while the bot is down
    await bot.lose("everything")
    await bot.start()
    await bob.wait_reply(bob_lobby, bot.user_id, "Welcome to Lambda")
    await alice.wait_reply(chat, bot.user_id, "Echo: sent while away")
    await alice.ask(chat, bot.user_id, "new news", "Echo: new news")
    bodies = [ev["content"]["body"] for ev in alice.bot_messages(chat, bot.user_id)]
    assert bodies.count("Echo: answered before") == 1
    assert bodies.count("Echo: sent while away") == 1
    answered, skipped = bot.logs.caught_up()
    assert answered >= 1 and skipped >= 1


async def test_python_m_adapter_matrix_logs_json_and_stops_on_sigterm(bot_config, make_user):
    proc = BotProcess(bot_config)
    await proc.start()
    await proc.wait_log("bot.ready")
    assert all({"event", "level", "timestamp"} <= line.keys() for line in proc.lines)
    assert await proc.terminate() == 0


async def test_bad_configuration_exits_2_with_a_clear_json_error():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MATRIX_", "LOG_"))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "adapter.matrix", cwd=ROOT, env=env, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    assert proc.returncode == 2
    line = json.loads(err.decode().strip().splitlines()[-1])
    assert line["event"] == "config.invalid" and "MATRIX_HOMESERVER is required" in line["error"]


@pytest.mark.warnings_expected("a corrupt DB is an error")
async def test_corrupt_db_stops_the_bot_with_the_remedy_and_keeps_the_file(bot):
    await bot.stop()
    garbage = b"definitely not sqlite " * 200
    bot.config.db_path.write_bytes(garbage)
    for suffix in ("-wal", "-shm"):
        Path(f"{bot.config.db_path}{suffix}").unlink(missing_ok=True)
    await bot.start(wait_ready=False)
    assert await bot.exit_code() == 1
    [line] = bot.logs.named("store.unreadable")
    assert line["remedy"] == "python tools/reset_local.py" and "reset_local" in line["error"]
    assert bot.config.db_path.read_bytes() == garbage


@pytest.mark.warnings_expected("a second bot is refused")
async def test_second_bot_on_the_same_db_refuses_to_start(bot, logs):
    second = BotRunner(bot.config, logs)
    await second.start(wait_ready=False)
    assert await second.exit_code() == 1
    assert logs.named("store.locked")


async def test_access_token_login_without_password(bot_config, logs, make_user):
    client = AsyncClient(bot_config.homeserver, bot_config.user_id)
    await client.login(bot_config.password)
    config = replace(bot_config, password=None, access_token=client.access_token)
    await client.close()
    runner = BotRunner(config, logs)
    await runner.start()
    alice = await make_user("alice")
    await alice.onboard(runner.user_id)
    assert await runner.stop() == 0
    saved = json.loads(session_file(config.store_path).read_text())
    assert saved["device_id"] == logs.named("bot.logged_in")[0]["device_id"]


@pytest.mark.warnings_expected("a refused login is an error")
async def test_refused_password_exits_1_with_a_clear_log(bot_config, logs):
    runner = BotRunner(replace(bot_config, password="wrong"), logs)
    await runner.start(wait_ready=False)
    assert await runner.exit_code() == 1
    [line] = logs.named("login.failed")
    assert "M_FORBIDDEN" in line["error"]
