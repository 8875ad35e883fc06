"""Every command against the real homeserver, bad arguments included."""

from __future__ import annotations

from adapter.matrix.handlers.chat_rooms import linked_rooms, matrix_to
from adapter.matrix.vocabulary.content import SOURCE_KEY
from adapter.matrix.vocabulary.markers import ChatMarker


async def room_state(user, room_id: str, event_type: str, state_key: str = "") -> dict:
    resp = await user.client.room_get_state_event(room_id, event_type, state_key)
    return getattr(resp, "content", {})


async def test_help_and_unknown_command(bot, make_user):
    alice = await make_user("alice")
    lobby, _, chat = await alice.onboard(bot.user_id)
    await alice.ask(chat, bot.user_id, "!help", "!rename <title>")
    await alice.ask(lobby, bot.user_id, "!frobnicate", "Unknown command !frobnicate")


async def test_rename_updates_chat_room_name_and_marker(bot, make_user):
    alice = await make_user("alice")
    _, _, chat = await alice.onboard(bot.user_id)
    await alice.ask(chat, bot.user_id, "!rename Trip to Lisbon", "Renamed to “Trip to Lisbon”")
    assert (await room_state(alice, chat, "m.room.name"))["name"] == "Trip to Lisbon"
    assert (await room_state(alice, chat, ChatMarker.TYPE))["status"] == "active"
    await alice.ask(chat, bot.user_id, "!chats", "Trip to Lisbon")


async def test_rename_rejects_bad_titles_with_clear_messages(bot, make_user):
    alice = await make_user("alice")
    lobby, _, chat = await alice.onboard(bot.user_id)
    await alice.ask(chat, bot.user_id, "!rename", "cannot be empty")
    await alice.ask(chat, bot.user_id, "!rename " + "x" * 256, "too long")
    await alice.ask(chat, bot.user_id, "!rename bad\u0007bell", "control characters")
    await alice.ask(lobby, bot.user_id, "!rename Lobby", "works in a chat room")
    assert (await room_state(alice, chat, "m.room.name"))["name"] == "Chat 1"


async def test_new_creates_room_in_space_and_chats_lists_it(bot, make_user):
    alice = await make_user("alice")
    lobby, space, chat = await alice.onboard(bot.user_id)
    reply = await alice.ask(lobby, bot.user_id, "!new Recipes", "Created “Recipes”")
    [new_room] = linked_rooms(reply["content"]["body"])
    child = await room_state(alice, space, "m.space.child", new_room)
    assert child.get("via")
    await alice.wait_for(lambda: new_room in alice.invites)
    await alice.join(new_room)
    listing = await alice.ask(new_room, bot.user_id, "!chats", "Your chats")
    body, html = listing["content"]["body"], listing["content"]["formatted_body"]
    assert "Chat 1" in body and f"Recipes — {matrix_to(new_room, 'localhost')}" in body
    assert "(this chat)" in body and "0 archived" in body
    assert f'href="{matrix_to(chat, "localhost")}"' in html
    await alice.ask(lobby, bot.user_id, "!new", "Created “Chat 3”")


async def test_archive_confirm_cancel_and_expiry_messages(bot, make_user):
    alice = await make_user("alice")
    lobby, space, chat = await alice.onboard(bot.user_id)
    await alice.ask(chat, bot.user_id, "!confirm", "nothing to confirm")
    await alice.ask(chat, bot.user_id, "!archive", "Send !confirm within 5 minutes")
    await alice.ask(chat, bot.user_id, "!cancel", "Cancelled")
    await alice.ask(chat, bot.user_id, "!cancel", "nothing to cancel")
    await alice.ask(chat, bot.user_id, "!archive", "Send !confirm")
    await alice.ask(chat, bot.user_id, "!confirm", "Archived “Chat 1”")
    assert (await room_state(alice, chat, ChatMarker.TYPE))["status"] == "archived"
    assert await room_state(alice, space, "m.space.child", chat) == {}
    await alice.ask(chat, bot.user_id, "are you there?", "archived. Send !new")
    await alice.ask(chat, bot.user_id, "!archive", "already archived")
    await alice.ask(lobby, bot.user_id, "!chats", "no active chats (1 archived)")


async def test_client_rename_updates_chat_title(bot, make_user):
    alice = await make_user("alice")
    _, _, chat = await alice.onboard(bot.user_id)
    await alice.client.room_put_state(chat, "m.room.name", {"name": "Renamed in Element"})
    await bot.logs.wait_for("chat.renamed", room_id=chat)
    await alice.ask(chat, bot.user_id, "!chats", "Renamed in Element")


async def test_second_invite_makes_no_second_space(bot, make_user):
    alice = await make_user("alice")
    _, space, _ = await alice.onboard(bot.user_id)
    second = await alice.open_lobby(bot.user_id)
    welcome = await alice.wait_reply(second, bot.user_id, "Welcome back")
    assert space in linked_rooms(welcome["content"]["body"])
    assert len(bot.logs.named("space.created")) == 1


async def test_messages_from_non_owner_are_ignored(bot, make_user):
    alice, mallory = await make_user("alice"), await make_user("mallory")
    lobby, _, chat = await alice.onboard(bot.user_id)
    # Mallory cannot be invited into a chat room (invite needs 100), so use the lobby:
    await alice.client.room_invite(lobby, mallory.user_id)
    await mallory.wait_for(lambda: lobby in mallory.invites)
    await mallory.join(lobby)
    intruding = await mallory.send(lobby, "!chats")
    await bot.logs.wait_for("event.ignored", room_id=lobby, reason="not_owner")
    # A room's events are handled in order: once the owner's next message is answered, an
    # answer to Mallory's would already be in the timeline, right after her message.
    answer = await alice.ask(lobby, bot.user_id, "!help", "Commands:")
    timeline = alice.timeline[lobby]
    since_intrusion = timeline[[ev.get("event_id") for ev in timeline].index(intruding) :]
    assert [ev for ev in since_intrusion if ev.get("sender") == bot.user_id] == [answer]
    assert intruding not in [
        ev["content"].get(SOURCE_KEY) for ev in alice.bot_messages(lobby, bot.user_id)
    ]


async def test_encrypted_message_gets_a_clear_hint_not_silence(bot, make_user):
    alice = await make_user("alice")
    lobby, _, _ = await alice.onboard(bot.user_id)
    await alice.client.room_send(
        lobby,
        "m.room.encrypted",
        {
            "algorithm": "m.megolm.v1.aes-sha2",
            "ciphertext": "AwgAEnAC",
            "session_id": "s1",
            "sender_key": "k1",
            "device_id": "DEV",
        },
    )
    await alice.wait_reply(lobby, bot.user_id, "can't read encrypted messages")
