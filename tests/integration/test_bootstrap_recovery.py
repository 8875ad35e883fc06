"""Invite bootstrap after a crash or a total local loss: never a second Space (SPEC §5, §6)."""

from __future__ import annotations

from nio import AsyncClient

from adapter.matrix.homeserver import Homeserver


async def test_invite_after_total_loss_reuses_space_and_first_chat(bot, make_user):
    alice = await make_user("alice")
    _, space, chat = await alice.onboard(bot.user_id)
    await bot.stop()
    await bot.lose("everything")
    rooms_before = await bot.server_room_count()
    await bot.start()
    second_lobby = await alice.open_lobby(bot.user_id)
    welcome = await alice.wait_reply(second_lobby, bot.user_id, "Welcome back")
    assert space in welcome["content"]["body"] and chat in welcome["content"]["body"]
    assert await bot.server_room_count() == rooms_before + 1  # only the new lobby was joined
    assert len(bot.logs.named("space.created")) == 1  # the first onboarding's, no other


async def test_crash_after_creating_the_space_ends_with_one_space_and_one_first_chat(
        bot, make_user):
    alice = await make_user("alice")
    await bot.stop()
    # The crash: the Space exists on the server (marker, Alice invited), nothing else does.
    client = AsyncClient(bot.config.homeserver, bot.config.user_id)
    await client.login(bot.config.password)
    orphan_space = await Homeserver(client, "localhost").create_space(alice.user_id)
    await client.logout()
    await client.close()
    await bot.lose("everything")
    await bot.start()

    lobby = await alice.open_lobby(bot.user_id)
    welcome = await alice.wait_reply(lobby, bot.user_id, "Welcome back")
    assert orphan_space in welcome["content"]["body"]
    assert not bot.logs.named("space.created")
    assert len(bot.logs.named("chat.created")) == 1
    await bot.restart()
    again = await alice.open_lobby(bot.user_id)
    await alice.wait_reply(again, bot.user_id, "Welcome back")
    assert len(bot.logs.named("chat.created")) == 1 and not bot.logs.named("space.created")
