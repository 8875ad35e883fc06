"""Invite bootstrap against the real homeserver (SPEC §5)."""

from __future__ import annotations

from adapter.matrix.vocabulary.markers import ChatMarker, SpaceMarker


def state_of(events: list[dict], event_type: str, state_key: str = "") -> dict:
    found = next(
        (e for e in events if e["type"] == event_type and e["state_key"] == state_key), None
    )
    assert found is not None, f"no {event_type} {state_key!r} in the room's state"
    return found


async def test_invite_builds_space_and_first_chat_with_markers_and_links(bot, make_user):
    alice = await make_user("alice")
    lobby, space, chat = await alice.onboard(bot.user_id)

    space_state = (await alice.client.room_get_state(space)).events
    chat_state = (await alice.client.room_get_state(chat)).events
    create = state_of(space_state, "m.room.create")
    assert create["sender"] == bot.user_id and create["content"]["type"] == "m.space"
    marker = state_of(space_state, SpaceMarker.TYPE)
    assert marker["sender"] == bot.user_id and marker["content"] == {"owner": alice.user_id, "v": 1}
    assert state_of(space_state, "m.space.child", chat)["content"]["via"]
    assert state_of(chat_state, "m.space.parent", space)["sender"] == bot.user_id
    chat_marker = state_of(chat_state, ChatMarker.TYPE)
    assert chat_marker["sender"] == bot.user_id
    assert chat_marker["content"]["owner"] == alice.user_id
    assert chat_marker["content"]["status"] == "active"
    assert state_of(chat_state, "m.room.name")["content"]["name"] == "Chat 1"
    levels = state_of(chat_state, "m.room.power_levels")["content"]
    assert levels["users"] == {alice.user_id: 50}
    assert levels["events"][ChatMarker.TYPE] == 100 and levels["events"]["m.room.name"] == 50
    assert levels["state_default"] == 100


async def test_echo_reply_in_first_chat(bot, make_user):
    alice = await make_user("alice")
    _, _, chat = await alice.onboard(bot.user_id)
    reply = await alice.ask(chat, bot.user_id, "hello there, Lambda", "hello there, Lambda")
    assert reply["content"]["msgtype"] == "m.text"
