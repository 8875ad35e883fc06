"""Who may use the bot, the chat cap and the creation throttle, on the real Synapse (SPEC §5)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from nio import RoomGetStateEventResponse

from tests.integration.conftest import BotRunner


@pytest.fixture
async def alice_only(bot_config, logs, make_user):
    """A bot that only alice (and users named like her) may use; returns (bot, alice)."""
    alice = await make_user("alice")
    runner = BotRunner(replace(bot_config, allowed_users=("@alice*:localhost",)), logs)
    await runner.start()
    yield runner, alice
    await runner.stop()


@pytest.mark.warnings_expected("invite.refused is a warning")
async def test_an_invite_from_a_user_not_allowed_is_rejected_and_creates_nothing(
    alice_only, make_user
):
    bot, _ = alice_only
    mallory = await make_user("mallory")
    rooms_before = await bot.server_room_count()
    lobby = await mallory.open_lobby(bot.user_id)
    [refused] = await bot.logs.wait_for("invite.refused", room_id=lobby)
    assert refused["sender"] == mallory.user_id

    async def bot_left() -> bool:
        member = await mallory.client.room_get_state_event(lobby, "m.room.member", bot.user_id)
        return (
            isinstance(member, RoomGetStateEventResponse)
            and member.content["membership"] == "leave"
        )

    for _ in range(50):
        if await bot_left():
            break
        await mallory.sync()
    assert await bot_left()  # the invite was rejected
    assert await bot.server_room_count() == rooms_before
    assert not bot.logs.named("space.created") and not bot.logs.named("state.healed")


async def test_messages_from_a_user_not_allowed_never_reach_the_bot(alice_only, make_user):
    bot, alice = alice_only
    lobby, _, _ = await alice.onboard(bot.user_id)
    mallory = await make_user("mallory")
    await alice.client.room_invite(lobby, mallory.user_id)
    await mallory.wait_for(lambda: lobby in mallory.invites)
    await mallory.join(lobby)
    await mallory.send(lobby, "!chats")
    await bot.logs.wait_for("event.ignored", room_id=lobby, reason="not_allowed")
    await alice.ask(lobby, bot.user_id, "!help", "Commands")  # the bot is alive, and after
    assert len(alice.bot_messages(lobby, bot.user_id)) == 2  # the welcome and !help only


async def test_the_chat_cap_and_the_creation_throttle_answer_clearly(bot_config, logs, make_user):
    alice = await make_user("alice")
    bot = BotRunner(replace(bot_config, max_chats=3), logs)
    await bot.start()
    try:
        lobby, _, _ = await alice.onboard(bot.user_id)  # Chat 1
        await alice.ask(lobby, bot.user_id, "!new", "Created “Chat 2”")
        await alice.ask(lobby, bot.user_id, "!new", "Created “Chat 3”")
        rooms = await bot.server_room_count()
        await alice.ask(lobby, bot.user_id, "!new", "You have 3 active chats")
        assert await bot.server_room_count() == rooms
    finally:
        await bot.stop()
    bot = BotRunner(replace(bot_config, max_chats=100), logs)
    await bot.start()
    try:
        for _ in range(5):  # the throttle: five a minute (the restart forgot the others)
            await alice.ask(lobby, bot.user_id, "!new", "Created")
        await alice.ask(lobby, bot.user_id, "!new", "faster than I can keep up")
    finally:
        await bot.stop()
