"""kill -9 at each step of onboarding, then a restart: one Space, one usable first chat, one
welcome (SPEC §5). The proxy holds the step's request, after Synapse has done it (or before,
for the welcome), and the bot process is killed while it waits for the answer."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from adapter.matrix.handlers.chat_rooms import linked_rooms
from tests.integration.conftest import TIMEOUT, BotProcess, BotRunner

pytestmark = pytest.mark.warnings_expected("rooms a crash kept from the DB heal as inconsistent")

# step -> (method, path, which matching request, whether Synapse gets it before the kill)
CRASH_POINTS = {
    "joined": ("POST", r"/join/", 1, True),
    "space_created": ("POST", r"/createRoom$", 1, True),  # the owner is invited by it
    "first_chat_created": ("POST", r"/createRoom$", 2, True),
    "link_written": ("PUT", r"/state/m\.space\.child/", 1, True),
    "records_written": ("PUT", r"/send/m\.room\.message/", 1, False),
    "welcomed": ("PUT", r"/send/m\.room\.message/", 1, True),
}


async def killed_mid_onboarding(step: str, user, bot_config, proxy, logs) -> tuple[str, BotRunner]:
    """Start the bot behind the proxy, let ``user`` invite it, kill -9 at ``step``. Returns
    the lobby and a (stopped) runner for the restart, behind the proxy too: a session is
    kept for one homeserver URL, and the welcome's dedupe needs the same device."""
    config = replace(bot_config, homeserver=proxy.url)
    method, path, nth, forward = CRASH_POINTS[step]
    reached = proxy.hold(method, path, nth, forward)
    bot = BotProcess(config)
    await bot.start()
    await bot.wait_log("bot.ready")
    lobby = await user.open_lobby(config.user_id)
    await asyncio.wait_for(reached.wait(), TIMEOUT)
    await bot.kill()
    proxy.heal()
    return lobby, BotRunner(config, logs)


async def assert_one_space_and_one_usable_chat(user, bot_id: str, lobby: str, runner: BotRunner):
    welcome = await user.wait_reply(lobby, bot_id, "Space")
    await user.wait_for(lambda: len(user.invites) >= 2)
    space, chat = linked_rooms(welcome["content"]["body"])[:2]
    assert user.invites == {space, chat}
    for room_id in sorted(user.invites):
        await user.join(room_id)
    await user.ask(chat, bot_id, "still there?", "still there?")
    assert len((await user.client.joined_rooms()).rooms) == 3
    assert await runner.server_room_count() == 3  # lobby, Space, chat: nothing orphaned
    await user.sync()
    bodies = [m["content"]["body"] for m in user.bot_messages(lobby, bot_id)]
    assert len([b for b in bodies if "Welcome" in b]) == 1, bodies


@pytest.mark.parametrize("step", CRASH_POINTS)
async def test_a_kill_at_any_step_of_onboarding_is_completed_by_the_restart(
    step, bot_config, proxy, make_user, logs
):
    alice = await make_user("alice")
    lobby, runner = await killed_mid_onboarding(step, alice, bot_config, proxy, logs)
    await runner.start()  # the invite is still in the inbox: onboarding resumes by itself
    try:
        await assert_one_space_and_one_usable_chat(alice, bot_config.user_id, lobby, runner)
    finally:
        await runner.stop()


@pytest.mark.parametrize("step", ["space_created", "first_chat_created"])
async def test_a_lobby_message_completes_an_onboarding_cut_short_by_a_crash_and_a_total_loss(
    step, bot_config, proxy, make_user, logs
):
    alice = await make_user("alice")
    lobby, runner = await killed_mid_onboarding(step, alice, bot_config, proxy, logs)
    await runner.lose("everything")  # the invite is lost with the inbox
    await runner.start()
    try:
        await alice.send(lobby, "hello?")
        await assert_one_space_and_one_usable_chat(alice, bot_config.user_id, lobby, runner)
        assert logs.named("onboarding.resumed")
        assert not [
            m
            for m in alice.bot_messages(lobby, bot_config.user_id)  # no hint to a
            if "your lobby" in m["content"]["body"]
        ]  # Space that was not there
    finally:
        await runner.stop()
