"""The bot on a homeserver whose default room version is 10 (SPEC §5, power levels): the bot
must be listed in ``users`` there, and the owner still cannot forge a marker."""

from __future__ import annotations

import pytest
from homeserver import LocalHomeserver  # tools/ is on sys.path (tests/conftest.py)
from nio import RoomPutStateError, RoomPutStateResponse

from adapter.matrix.handlers.chat_rooms import linked_rooms
from adapter.matrix.vocabulary.markers import ChatMarker, SpaceMarker

VERSION = "10"


@pytest.fixture(scope="module")
def homeserver(tmp_path_factory: pytest.TempPathFactory):
    """This module's own Synapse, creating rooms at version 10 unless told otherwise."""
    hs = LocalHomeserver(tmp_path_factory.mktemp("synapse-v10"), default_room_version=VERSION)
    hs.start()
    yield hs
    hs.stop()


async def state_content(user, room_id: str, event_type: str, state_key: str = "") -> dict:
    resp = await user.client.room_get_state_event(room_id, event_type, state_key)
    return resp.content


async def assert_bot_room(user, room_id: str, bot_id: str) -> None:
    """Created at the server's default version, with the bot listed at 100 and the owner at 50."""
    assert (await state_content(user, room_id, "m.room.create"))["room_version"] == VERSION
    levels = await state_content(user, room_id, "m.room.power_levels")
    assert levels["users"] == {bot_id: 100, user.user_id: 50}
    assert levels["state_default"] == 100 and levels["events"]["m.room.name"] == 50


async def test_onboarding_creates_space_and_chat_at_the_default_version_and_replies(bot, make_user):
    alice = await make_user("alice")
    lobby, space, chat = await alice.onboard(bot.user_id)
    assert (await state_content(alice, lobby, "m.room.create"))["room_version"] == VERSION
    for room_id in (space, chat):
        await assert_bot_room(alice, room_id, bot.user_id)
    assert (await state_content(alice, space, SpaceMarker.TYPE))["owner"] == alice.user_id
    assert (await state_content(alice, chat, ChatMarker.TYPE))["owner"] == alice.user_id
    await alice.ask(chat, bot.user_id, "hello on ten", "Echo: hello on ten")


async def new_chat(user, lobby: str, bot_id: str, title: str) -> str:
    """``!new title`` in the lobby; the new room, joined."""
    reply = await user.ask(lobby, bot_id, f"!new {title}", f"Created “{title}”")
    [room_id] = linked_rooms(reply["content"]["body"])
    await user.wait_for(lambda: room_id in user.invites)
    await user.join(room_id)
    return room_id


async def test_new_after_a_total_loss_heals_and_creates_the_room(bot, make_user):
    alice = await make_user("alice")
    lobby, space, chat = await alice.onboard(bot.user_id)
    await assert_bot_room(alice, await new_chat(alice, lobby, bot.user_id, "Before"), bot.user_id)

    await bot.restart_losing("everything")  # the restarted bot asks the version again
    await alice.ask(chat, bot.user_id, "still there?", "Echo: still there?")
    assert {h["cause"] for h in bot.logs.named("state.healed")} == {"store_missing"}
    after = await new_chat(alice, lobby, bot.user_id, "After")
    await assert_bot_room(alice, after, bot.user_id)
    assert (await state_content(alice, space, "m.space.child", after)).get("via")
    assert not bot.logs.named("space.created")[1:]


async def test_owner_renames_but_cannot_forge_a_marker_or_raise_herself(bot, make_user):
    alice = await make_user("alice")
    _, space, chat = await alice.onboard(bot.user_id)
    forged = {"owner": alice.user_id, "chat_id": "forged", "status": "active", "v": 1}
    levels = await state_content(alice, chat, "m.room.power_levels")
    attempts = [
        (chat, ChatMarker.TYPE, forged),
        (space, SpaceMarker.TYPE, {"owner": alice.user_id}),
        (chat, "m.room.power_levels", {**levels, "users": {alice.user_id: 100}}),
    ]
    for room_id, event_type, content in attempts:
        resp = await alice.client.room_put_state(room_id, event_type, content)
        assert isinstance(resp, RoomPutStateError) and resp.status_code == "M_FORBIDDEN", resp
    assert (await state_content(alice, chat, ChatMarker.TYPE))["chat_id"] != "forged"
    renamed = await alice.client.room_put_state(chat, "m.room.name", {"name": "Mine"})
    assert isinstance(renamed, RoomPutStateResponse), renamed


@pytest.mark.warnings_expected("homeserver faults")
async def test_failed_version_lookup_is_retried_and_onboarding_completes(
    proxied_bot, proxy, make_user
):
    bot = proxied_bot
    # Only now can the lookup fail: the bot started without asking for the version.
    proxy.fail(r"/capabilities$", 502, {"errcode": "M_UNKNOWN", "error": "bad gateway"}, times=1)
    alice = await make_user("alice")
    _, space, _ = await alice.onboard(bot.user_id)
    assert proxy.hits == ["/_matrix/client/v3/capabilities"]
    failed = bot.logs.named("handler.homeserver_error", kind="invite", will_retry=True)
    assert failed and "get capabilities" in failed[0]["error"]
    await assert_bot_room(alice, space, bot.user_id)
