"""A homeserver that encrypts every room (Synapse's ``encryption_enabled_by_default_for_room_type:
all``): the bot, which does not do end-to-end encryption, tells the operator once per room and the
user the truth, builds no more rooms that it cannot read, and finishes onboarding once the admin
turns the setting off and restarts Synapse."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import pytest
from homeserver import LocalHomeserver  # tools/ is on sys.path (tests/conftest.py)
from nio import RoomGetStateEventError, RoomGetStateEventResponse, RoomSendResponse

from adapter.matrix.handlers.chat_rooms import linked_rooms
from adapter.matrix.healing.encryption import SETTING
from adapter.matrix.vocabulary.content import SOURCE_KEY
from tests.integration.conftest import BotRunner, TestUser, doctor_tool
from tests.integration.test_metrics import ANY_PORT, metrics_until, sample, url_of

# What a client with end-to-end encryption sends; the bot receives it as is.
CIPHERTEXT = {
    "algorithm": "m.megolm.v1.aes-sha2",
    "ciphertext": "AwgAEnACgAkLmt6qF84IK++J7UDH2Za1YVchHyprqTqsg2yyOwAtHaZTwyNg37afzg8f3r9IsN9r",
    "session_id": "X3lUlvLELLYxeTx4yOVu6UDpasGEVO0Jbu+QFnm0cKQ",
    "sender_key": "RF3s+E7RkTQTGF2d8Deol0FkQvgII2aJDf3/Jp5mxVU",
    "device_id": "RJYKSTBOIE",
}


@pytest.fixture(scope="module")
def homeserver(tmp_path_factory: pytest.TempPathFactory):
    """This module's own Synapse, which encrypts every room created on it (until a test turns
    that off)."""
    hs = LocalHomeserver(tmp_path_factory.mktemp("synapse-e2e"), extra_config={SETTING: "all"})
    hs.start()
    yield hs
    hs.stop()


async def send_encrypted(user: TestUser, room_id: str) -> str:
    resp = await user.client.room_send(room_id, "m.room.encrypted", CIPHERTEXT)
    assert isinstance(resp, RoomSendResponse), resp
    return resp.event_id


async def encrypted(user: TestUser, room_id: str) -> bool:
    resp = await user.client.room_get_state_event(room_id, "m.room.encryption")
    if isinstance(resp, RoomGetStateEventError):
        assert resp.status_code == "M_NOT_FOUND", resp
        return False
    assert isinstance(resp, RoomGetStateEventResponse), resp
    return bool(resp.content.get("algorithm"))


async def doctor_states(bot: BotRunner) -> tuple[int, dict, dict[str, str]]:
    code, out, err = await doctor_tool(bot.config, "--json")
    assert code in (0, 1), err
    report = json.loads(out)
    return code, report, {room["room_id"]: room["state"] for room in report["rooms"]}


@pytest.mark.warnings_expected("the homeserver encrypts the bot's rooms; Synapse restarts")
async def test_encrypting_homeserver_gets_the_truth_and_onboarding_completes_after_the_fix(
    homeserver, bot_config, make_user, logs
):
    bot = BotRunner(replace(bot_config, metrics_addr=ANY_PORT), logs)
    await bot.start()
    alice = await make_user("alice")

    # The invite: a Space, encrypted by the server, and no chat room after it.
    lobby = await alice.open_lobby(bot.user_id)
    told = await alice.wait_reply(lobby, bot.user_id, "encrypts every room I create")
    body = told["content"]["body"]
    assert "can't read encrypted rooms" in body and f"set {SETTING} to off" in body
    assert "not encrypted" not in body
    [space] = linked_rooms(body)
    [line] = await logs.wait_for("room.encrypted_by_server", room_id=space)
    assert line["log_level"] == "error" and line["owner"] == alice.user_id
    assert f"{SETTING}: off" in line["remedy"] and "end-to-end" in line["remedy"]
    assert not logs.named("chat.created")
    await alice.wait_for(lambda: space in alice.invites)
    await alice.join(space)
    assert await encrypted(alice, space)

    # A lobby message tries once more: its chat room comes back encrypted too, and is said so.
    told = await alice.ask(lobby, bot.user_id, "hello?", "the homeserver encrypted it")
    [chat] = linked_rooms(told["content"]["body"])
    await logs.wait_for("room.encrypted_by_server", room_id=chat)
    await alice.wait_for(lambda: chat in alice.invites)
    await alice.join(chat)
    assert await encrypted(alice, chat)

    # A message in the encrypted chat room: the truth, once.
    first = await send_encrypted(alice, chat)
    answer = await alice.wait_reply(chat, bot.user_id, "I can't read this room")
    assert answer["content"][SOURCE_KEY] == first
    assert "admin" in answer["content"]["body"]
    assert "not encrypted" not in answer["content"]["body"]
    second = await send_encrypted(alice, chat)
    await logs.wait_for("event.ignored", reason="encrypted_room", event_id=second)
    await alice.sync()
    assert [ev["content"][SOURCE_KEY] for ev in alice.bot_messages(chat, bot.user_id)] == [first]

    # The operator: one line per room, counted, and the doctor flags both rooms.
    samples = await metrics_until(
        url_of(logs), lambda s: sample(s, "lambda_encrypted_rooms_total", kind="chat") == 1
    )
    assert sample(samples, "lambda_encrypted_rooms_total", kind="space") == 1
    code, report, states = await doctor_states(bot)
    assert code == 1 and report["consistent"] is False
    assert states[space] == states[chat] == "encrypted"
    details = {room["room_id"]: room["detail"] for room in report["rooms"]}
    assert SETTING in details[chat]

    # A restart does not repeat what was said (the DB recorded it), to the operator or Alice.
    await bot.restart()
    third = await send_encrypted(alice, chat)
    await logs.wait_for("event.ignored", reason="encrypted_room", event_id=third)
    assert len(logs.named("room.encrypted_by_server")) == 2

    # The admin turns the setting off and restarts Synapse: the next lobby message finishes.
    homeserver.extra_config[SETTING] = "off"
    await asyncio.to_thread(homeserver.restart)
    welcome = await alice.ask(lobby, bot.user_id, "is it fixed?", "Start chatting in")
    rooms = linked_rooms(welcome["content"]["body"])
    assert rooms[0] == space and rooms[1] not in (space, chat)
    readable = rooms[1]
    await alice.wait_for(lambda: readable in alice.invites)
    await alice.join(readable)
    assert not await encrypted(alice, readable)
    await alice.ask(readable, bot.user_id, "can you read me now?", "Echo: can you read me now?")
    assert not logs.named("room.encrypted_by_server", room_id=readable)

    # The encrypted chat room stays unusable, and the doctor still says so; the Space is fine.
    code, _, states = await doctor_states(bot)
    assert code == 1
    assert (states[chat], states[space], states[readable]) == ("encrypted", "ok", "ok")
    await bot.stop()
