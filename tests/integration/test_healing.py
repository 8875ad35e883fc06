"""Lazy healing against the real homeserver: every loss x every action (SPEC §6)."""

from __future__ import annotations

import asyncio

import pytest
from nio import RoomCreateResponse

from adapter.matrix.handlers.chat_rooms import linked_rooms, matrix_to
from adapter.matrix.vocabulary.markers import ChatMarker
from tests.integration.conftest import BACKENDS

LOSSES = [
    "everything",
    "chat",
    "matrix_room",
    "matrix_user",
    "pending",
    "sync_token",
    "matrix_store",
]
ACTIONS = ["message", "rename", "archive", "chats", "new"]
# Besides losing everything or the room records, which any action needs:
NEEDS_HEAL = {
    ("chat", "message"),
    ("chat", "rename"),
    ("chat", "archive"),
    ("chat", "chats"),
    ("matrix_user", "chats"),
    ("matrix_user", "new"),
}


@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("loss", LOSSES)
async def test_after_loss_action_works_and_healing_creates_no_room(
    loss, action, bot, make_user, request
):
    heals = (loss, action) in NEEDS_HEAL or loss in ("everything", "matrix_room")
    if heals and loss != "everything":  # the DB held part of the room: inconsistent, a warning
        request.applymarker(pytest.mark.warnings_expected("partial records"))
    alice = await make_user("alice")
    lobby, space, chat = await alice.onboard(bot.user_id)
    await bot.stop()
    await bot.lose(loss)
    rooms_before = await bot.server_room_count()
    await bot.start()

    if action == "message":
        await alice.ask(chat, bot.user_id, "still there?", "Echo: still there?")
    elif action == "rename":
        await alice.ask(chat, bot.user_id, "!rename Healed", "Renamed to “Healed”")
        name = await alice.client.room_get_state_event(chat, "m.room.name", "")
        assert name.content["name"] == "Healed"
    elif action == "archive":
        await alice.ask(chat, bot.user_id, "!archive", "Send !confirm")
        await alice.ask(chat, bot.user_id, "!confirm", "Archived “Chat 1”")
        marker = await alice.client.room_get_state_event(chat, ChatMarker.TYPE, "")
        assert marker.content["status"] == "archived"
    elif action == "chats":
        listing = await alice.ask(lobby, bot.user_id, "!chats", "Your chats")
        assert f"Chat 1 — {matrix_to(chat, 'localhost')}" in listing["content"]["body"]
    elif action == "new":
        reply = await alice.ask(lobby, bot.user_id, "!new Fresh", "Created “Fresh”")
        [new_room] = linked_rooms(reply["content"]["body"])
        child = await alice.client.room_get_state_event(space, "m.space.child", new_room)
        assert child.content.get("via")

    expected_new = 1 if action == "new" else 0
    assert await bot.server_room_count() == rooms_before + expected_new
    assert not bot.logs.named("space.created")[1:], "healing made a second Space"
    healed = bot.logs.named("state.healed")
    if heals:
        cause = "store_missing" if loss == "everything" else "inconsistent"
        assert healed and {h["cause"] for h in healed} == {cause}
        assert all(h["hs_requests"] >= 1 and h["duration_ms"] >= 0 for h in healed)
    else:  # nothing this action needs was lost: healing stays lazy
        assert not healed


async def test_confirm_after_pending_loss_says_the_reset_cleared_it(bot, make_user):
    alice = await make_user("alice")
    _, _, chat = await alice.onboard(bot.user_id)
    await alice.ask(chat, bot.user_id, "!archive", "Send !confirm")
    await bot.restart_losing("pending")
    await alice.ask(chat, bot.user_id, "!confirm", "reset database clears them")


async def test_no_heal_between_start_and_first_event(bot, make_user):
    alice = await make_user("alice")
    _, _, chat = await alice.onboard(bot.user_id)
    await bot.restart_losing("everything")
    assert not bot.logs.named("state.healed")
    await alice.ask(chat, bot.user_id, "wake up", "Echo: wake up")
    assert bot.logs.named("state.healed", room_id=chat)


async def test_burst_into_unknown_room_heals_once_and_answers_every_message(bot, make_user):
    alice = await make_user("alice")
    _, _, chat = await alice.onboard(bot.user_id)
    await bot.restart_losing("everything")
    bodies = [f"burst {i}" for i in range(8)]
    await asyncio.gather(*(alice.send(chat, body) for body in bodies))
    for body in bodies:
        await alice.wait_reply(chat, bot.user_id, f"Echo: {body}")
    assert len(bot.logs.named("state.healed", room_id=chat)) == 1


@pytest.mark.warnings_expected("a refused heal is a warning")
async def test_forged_room_is_refused_once_and_leaks_nothing(bot, make_user):
    alice, mallory, carol = (
        await make_user("alice"),
        await make_user("mallory"),
        await make_user("carol"),
    )
    _, alice_space, alice_chat = await alice.onboard(bot.user_id)
    await alice.ask(alice_chat, bot.user_id, "!rename Secret plans", "Renamed")
    # Mallory builds a room that claims to be Alice's chat, inside Alice's Space.
    resp = await mallory.client.room_create(
        name="Secret plans",
        invite=[bot.user_id, carol.user_id],
        initial_state=[
            {
                "type": ChatMarker.TYPE,
                "state_key": "",
                "content": {"owner": alice.user_id, "chat_id": "abc", "status": "active", "v": 1},
            },
            {
                "type": "m.space.parent",
                "state_key": alice_space,
                "content": {"via": ["localhost"], "canonical": True},
            },
        ],
    )
    assert isinstance(resp, RoomCreateResponse)
    forged = resp.room_id
    await mallory.wait_reply(forged, bot.user_id, "Welcome to Lambda")  # bootstraps Mallory
    await carol.wait_for(lambda: forged in carol.invites)
    await carol.join(forged)
    await bot.restart_losing("everything")

    await mallory.send(forged, "!chats")
    refusal = await mallory.wait_reply(forged, bot.user_id, "not created by me")
    await mallory.send(forged, "!chats")
    await bot.logs.wait_for("event.ignored", room_id=forged, reason="shared_room")
    assert len(bot.logs.named("state.heal_refused", room_id=forged)) == 1
    texts = [ev["content"]["body"] for ev in mallory.bot_messages(forged, bot.user_id)]
    assert texts.count(refusal["content"]["body"]) == 1
    assert not any(alice_chat in linked_rooms(t) or "Secret plans —" in t for t in texts)


async def test_forged_lobby_only_shows_the_senders_own_space(bot, make_user):
    alice, mallory = await make_user("alice"), await make_user("mallory")
    _, alice_space, alice_chat = await alice.onboard(bot.user_id)
    m_lobby, m_space, m_chat = await mallory.onboard(bot.user_id)
    for event_type, key, content in [
        (ChatMarker.TYPE, "", {"owner": alice.user_id, "chat_id": "x", "status": "active"}),
        ("m.space.parent", alice_space, {"via": ["localhost"]}),
    ]:
        await mallory.client.room_put_state(m_lobby, event_type, content, key)
    await bot.restart_losing("everything")
    listing = await mallory.ask(m_lobby, bot.user_id, "!chats", "Your chats")
    assert m_chat in linked_rooms(listing["content"]["body"])
    assert alice_chat not in listing["content"]["body"]
    assert bot.logs.named("state.healed", room_id=m_lobby)[0]["source"] == "legacy"


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_heal_in_a_later_run_after_a_total_loss_still_says_store_missing(bot, make_user):
    """The cause is the DB's birth, not "this run created the file" (SPEC §6)."""
    alice = await make_user("alice")
    _, _, chat = await alice.onboard(bot.user_id)
    await bot.restart_losing("everything")
    await bot.restart()  # a later run: the DB was born in the one before
    await alice.ask(chat, bot.user_id, "a day later", "Echo: a day later")
    healed = bot.logs.named("state.healed", room_id=chat)
    assert [(h["cause"], h["log_level"]) for h in healed] == [("store_missing", "info")]


@pytest.mark.warnings_expected("a heal that the DB should not have needed")
async def test_a_room_created_after_the_db_was_born_heals_as_inconsistent(bot, make_user):
    alice = await make_user("alice")
    _, _, chat = await alice.onboard(bot.user_id)  # the DB was born before this chat
    await bot.stop()
    for kind in ("matrix_room", "chat"):  # every record of the chat room, nothing partial
        await bot.lose(kind)
    await bot.start()
    await alice.ask(chat, bot.user_id, "hello?", "Echo: hello?")
    healed = bot.logs.named("state.healed", room_id=chat)
    assert [(h["cause"], h["log_level"]) for h in healed] == [("inconsistent", "warning")]


async def test_chats_after_a_total_loss_counts_archived_chats_exactly(bot, make_user):
    """The Space keeps an emptied m.space.child for each former child; their markers say
    archived (SPEC §5 ``!chats``)."""
    alice = await make_user("alice")
    lobby, _, chat = await alice.onboard(bot.user_id)
    await alice.ask(lobby, bot.user_id, "!new Second", "Created “Second”")
    await alice.ask(chat, bot.user_id, "!archive", "Send !confirm")
    await alice.ask(chat, bot.user_id, "!confirm", "Archived “Chat 1”")
    await bot.restart_losing("everything")
    listing = (await alice.ask(lobby, bot.user_id, "!chats", "Your chats"))["content"]["body"]
    assert "Second" in listing and "Chat 1" not in listing and "1 archived." in listing
