"""Rooms the homeserver encrypted (issue 24), without a homeserver: the state decision, the
hold on building more rooms, the handlers' answers, the doctor's verdict and the metric."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import cast

import pytest
from doctor_tool.compare import ServerRooms
from doctor_tool.diagnosis import Diagnosis, InboxSummary
from doctor_tool.report import as_json, as_text
from structlog.testing import capture_logs

from adapter.matrix.chain.context import EventData
from adapter.matrix.handlers import handle_update
from adapter.matrix.handlers.chat_rooms import linked_rooms, matrix_to
from adapter.matrix.handlers.commands import handle_command
from adapter.matrix.handlers.messages import handle_encrypted
from adapter.matrix.healing.encryption import (
    NEW_HELD,
    SETTING,
    announce,
    holding_room,
    readable_active_chats,
    retries,
)
from adapter.matrix.healing.healer import Healer
from adapter.matrix.healing.room_state import (
    RoomSnapshot,
    assess_room,
    encryption_hold,
    unreadable_room,
)
from adapter.matrix.ingest.update import Update, UpdateKind
from adapter.matrix.observe.metrics import Metrics
from adapter.matrix.store.records import EncryptedRoom, RoomMeta
from adapter.matrix.vocabulary.markers import SpaceMarker
from tests.unit import test_doctor_compare as doctor
from tests.unit import test_room_state as state
from tests.unit.fakes import (
    ALICE,
    CHAT,
    LOBBY,
    SPACE,
    FakeHomeserver,
    healed_data,
    make_services,
    message,
    onboard,
)

ENCRYPTION = {"algorithm": "m.megolm.v1.aes-sha2"}
MADE_S = 1_700_000_000  # state.ev's origin_server_ts, in seconds


def encrypted(events: list[dict], content: dict | None = None) -> list[dict]:
    return [*events, state.ev("m.room.encryption", ENCRYPTION if content is None else content)]


# The state decision


@pytest.mark.parametrize(
    ("content", "expected"), [(ENCRYPTION, True), ({}, False), ({"algorithm": ""}, False)]
)
def test_a_room_is_encrypted_when_its_encryption_event_names_an_algorithm(content, expected):
    room = state.snap(encrypted(state.chat_events(marker=state.MARKER), content))
    assert room.encrypted is expected
    assert not state.snap(state.chat_events(marker=state.MARKER)).encrypted


def test_a_chat_or_space_the_bot_made_that_is_encrypted_is_unreadable_and_a_lobby_is_not():
    chat = assess_room(state.snap(encrypted(state.chat_events(marker=state.MARKER))), state.BOT)
    assert chat.unreadable == EncryptedRoom(state.ALICE, "chat", MADE_S)
    legacy = assess_room(state.snap(encrypted(state.chat_events())), state.BOT, state.space_state())
    assert legacy.unreadable == EncryptedRoom(state.ALICE, "chat", MADE_S)
    space_events = [
        state.ev("m.room.create", {"type": "m.space", "room_version": "12"}),
        state.member(state.BOT),
        state.member(state.ALICE, "invite"),
        state.ev(SpaceMarker.TYPE, {"owner": state.ALICE, "v": 1}),
    ]
    space = RoomSnapshot.from_events(state.SPACE, encrypted(space_events))
    assert assess_room(space, state.BOT).unreadable == EncryptedRoom(state.ALICE, "space", MADE_S)
    lobby_events = encrypted([state.ev("m.room.create", {}, sender=state.ALICE)])
    lobby = state.snap([*lobby_events, state.member(state.BOT), state.member(state.ALICE)])
    assert lobby.encrypted and assess_room(lobby, state.BOT).unreadable is None
    assert (
        assess_room(state.snap(state.chat_events(marker=state.MARKER)), state.BOT).unreadable
        is None
    )


def test_unreadable_room_is_dated_by_the_rooms_creation():
    room = state.snap(encrypted(state.chat_events()))
    assert unreadable_room(room, "chat", state.ALICE) == EncryptedRoom(state.ALICE, "chat", MADE_S)
    assert unreadable_room(state.snap(state.chat_events()), "chat", state.ALICE) is None


# The hold: no more rooms after one came back encrypted, until one comes back readable


SPACE_AT_10 = ("!space", EncryptedRoom(ALICE, "space", 10.0))
CHAT_AT_20 = ("!chat", EncryptedRoom(ALICE, "chat", 20.0))


@pytest.mark.parametrize(
    ("encrypted_rooms", "readable_made_at", "held_by"),
    [
        ([], [], None),
        ([], [5.0], None),
        ([SPACE_AT_10], [], SPACE_AT_10),
        ([SPACE_AT_10], [5.0], SPACE_AT_10),  # onboarded before the setting, then a new Space?
        ([SPACE_AT_10, CHAT_AT_20], [15.0], CHAT_AT_20),  # !new came back encrypted
        ([SPACE_AT_10, CHAT_AT_20], [30.0], None),  # the admin fixed it: a readable one since
    ],
)
def test_an_owner_is_held_by_their_latest_room_until_a_readable_chat_follows_it(
    encrypted_rooms, readable_made_at, held_by
):
    assert encryption_hold(encrypted_rooms, readable_made_at) == held_by


def update(kind: str = "message", ts: int = 0, **changes) -> Update:
    return replace(Update(kind, LOBBY, ALICE, "$ev", ts=ts), **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("trigger", "expected"),
    [
        (update("invite"), True),  # a new invite (it has no timestamp)
        (update("message", ts=20_001), True),  # written after the room that holds them
        (update("message", ts=20_000), False),  # ... not before it: that update made it
        (update("message", ts=30_000, replayed=True), False),  # a replay may have made it
        (update("invite", attempt=1), False),  # so may an earlier attempt
    ],
)
def test_an_invite_or_lobby_message_after_the_hold_tries_once_more(trigger, expected):
    assert retries(CHAT_AT_20, trigger) is expected


# The handlers, over the real stores


@pytest.fixture
def hs():
    return FakeHomeserver()


@pytest.fixture
async def svc(store, hs):
    svc = make_services(store, hs)
    await onboard(svc)
    return svc


async def answer(svc, room_id: str, body: str = "", kind: UpdateKind = "message", **data) -> str:
    """Run an update through its handler, as the chain would; the one answer."""
    event = message(room_id, body, event_id=f"$ev{len(svc.hs.sent)}", kind=kind)
    before = len(svc.hs.sent)
    healed = cast(EventData, {**await healed_data(svc, event), **data})
    await (handle_encrypted if kind == "encrypted" else handle_command)(event, healed)
    [said] = svc.hs.bodies[before:]
    return said


async def test_new_that_comes_back_encrypted_is_recorded_told_and_holds_the_next(svc, hs):
    hs.encrypts = True
    with capture_logs() as logs:
        created = await answer(svc, LOBBY, "!new")
    [room_id] = [e["room_id"] for e in logs if e["event"] == "room.encrypted_by_server"]
    assert [e["encrypted"] for e in logs if e["event"] == "chat.created"] == [True]
    assert created.startswith(f"I made you a chat room, “Chat 2”: {matrix_to(room_id, 'x')}")
    assert "the homeserver encrypted it" in created and "write to me here" in created
    record = await svc.store.get_encrypted(room_id)
    assert record is not None and (record.owner, record.kind) == (ALICE, "chat")
    assert await holding_room(svc.store, svc.chats, ALICE) == (room_id, record)
    assert room_id not in (await readable_active_chats(svc.store, svc.chats, ALICE)).values()
    made = len([c for c in hs.calls if c[0] == "create_chat_room"])
    refused = await answer(svc, CHAT, "!new")
    assert refused.startswith(NEW_HELD) and "write to me in your lobby" in refused
    assert len([c for c in hs.calls if c[0] == "create_chat_room"]) == made


async def test_an_encrypted_chat_room_tells_its_owner_once(svc):
    record = EncryptedRoom(ALICE, "chat", MADE_S)
    await svc.store.set_encrypted(CHAT, record)
    told = await answer(svc, CHAT, kind="encrypted", unreadable=record)
    assert "I can't read this room" in told and f"set {SETTING} to off" in told
    assert "not encrypted" not in told
    assert (await svc.store.get_encrypted(CHAT)).user_told
    before = len(svc.hs.sent)
    event = message(CHAT, "", event_id="$again", kind="encrypted")
    data = {**await healed_data(svc, event), "unreadable": await svc.store.get_encrypted(CHAT)}
    await handle_encrypted(event, data)  # type: ignore[arg-type]
    assert len(svc.hs.sent) == before


async def test_an_encrypted_lobby_message_points_to_a_chat_the_bot_can_read_or_to_none(svc):
    hint = await answer(svc, LOBBY, kind="encrypted")
    assert "can't read encrypted messages" in hint
    assert f"“Chat 1”: {matrix_to(CHAT, 'x')}" in hint and "not encrypted" not in hint
    await svc.store.set_encrypted(CHAT, EncryptedRoom(ALICE, "chat", MADE_S))
    hint = await answer(svc, LOBBY, kind="encrypted")
    assert CHAT not in hint and "room without encryption" in hint


# The operator: one error line and the metric; the doctor's verdict


def test_announce_logs_the_cause_and_remedy_at_error_and_counts_the_room():
    metrics = Metrics()
    with capture_logs() as logs:
        announce(SPACE, EncryptedRoom(ALICE, "space", 1.0), metrics)
    [line] = logs
    assert (line["event"], line["log_level"], line["room_id"]) == (
        "room.encrypted_by_server",
        "error",
        SPACE,
    )
    assert f"{SETTING}: off" in line["remedy"] and "end-to-end encryption" in line["remedy"]
    assert "private_chat" in line["remedy"] and "`invite` and `all`" in line["remedy"]
    assert b'lambda_encrypted_rooms_total{kind="space"} 1.0' in metrics.exposition()


def test_the_doctor_flags_an_encrypted_chat_and_the_space_of_an_owner_with_no_readable_chat():
    server = ServerRooms(
        doctor.SERVER.joined,
        {
            **doctor.SERVER.states,
            doctor.SPACE: [*doctor.space_state(), doctor.ev("m.room.encryption", ENCRYPTION)],
            doctor.CHAT: [*doctor.chat_state(), doctor.ev("m.room.encryption", ENCRYPTION)],
        },
    )
    found = doctor.findings(server=server)
    assert {rid: (f.state, f.heals) for rid, f in found.items()} == {
        doctor.SPACE: ("encrypted", False),
        doctor.LOBBY: ("ok", True),
        doctor.CHAT: ("encrypted", False),
    }
    assert SETTING in found[doctor.CHAT].detail
    diagnosis = Diagnosis(None, InboxSummary(0, None), tuple(found.values()))
    assert not diagnosis.consistent and not diagnosis.heals_by_itself
    assert '"state": "encrypted"' in as_json(diagnosis)
    text = as_text(diagnosis, doctor.BOT, "http://hs", "db")
    assert "2 encrypted" in text and "2 rooms the bot made are encrypted" in text
    assert "will not heal by itself: suspect a bug" not in text


def test_the_doctor_leaves_an_encrypted_space_alone_once_its_owner_has_a_readable_chat():
    server = replace(
        doctor.SERVER,
        states={
            **doctor.SERVER.states,
            doctor.SPACE: [*doctor.space_state(), doctor.ev("m.room.encryption", ENCRYPTION)],
        },
    )
    assert doctor.findings(server=server)[doctor.SPACE].state == "ok"


def test_the_doctor_reads_records_of_encrypted_rooms_as_unknown_keys():
    local = doctor.records_from({"encrypted_room:!x": '{"owner": "@a:x"}'})
    assert not local.rooms and not local.chats


# Onboarding on a homeserver that encrypts: no chat after an encrypted Space, one try per
# later invite or lobby message, within the creation throttle


@pytest.fixture
async def fresh(store, hs):
    """Services with no user onboarded, on a homeserver that encrypts every room it makes."""
    hs.encrypts = True
    return make_services(store, hs)


async def run(svc, update: Update) -> list[str]:
    """``update`` through the handlers, as the chain would; what the bot said."""
    before = len(svc.hs.sent)
    data = await healed_data(svc, update)
    await handle_update(update, data)
    return svc.hs.bodies[before:]


def lobby_message(svc, body: str = "hello?", **changes) -> Update:
    later = int(time.time() * 1000) + 1000  # written after the rooms made so far
    event = message(LOBBY, body, event_id=f"$m{len(svc.hs.sent)}")
    return replace(event, **{"ts": later, **changes})


def made(hs: FakeHomeserver, kind: str = "create_chat_room") -> int:
    return sum(1 for call in hs.calls if call[0] == kind)


async def test_an_invite_whose_space_comes_back_encrypted_makes_no_chat_and_says_why(fresh, hs):
    with capture_logs() as logs:
        [said] = await run(fresh, Update("invite", LOBBY, ALICE, "invite|lobby"))
    [space] = [e["room_id"] for e in logs if e["event"] == "room.encrypted_by_server"]
    assert (made(hs, "create_space"), made(hs)) == (1, 0)
    assert said.startswith(
        f"Welcome to Lambda! I made you a Space, “Lambda”: {matrix_to(space, 'x')}"
    )
    assert "encrypts every room I create" in said and "write to me here" in said
    assert (await fresh.store.get_encrypted(space)).kind == "space"
    # The same invite again (a replay after a crash) builds nothing more.
    replayed = Update("invite", LOBBY, ALICE, "invite|lobby", replayed=True)
    assert (await run(fresh, replayed))[0].startswith("Welcome to Lambda! I made you a Space")
    assert (made(hs, "create_space"), made(hs)) == (1, 0)


async def test_a_lobby_message_tries_once_more_and_finishes_once_the_admin_fixed_it(fresh, hs):
    await run(fresh, Update("invite", LOBBY, ALICE, "invite|lobby"))
    [said] = await run(fresh, lobby_message(fresh))
    assert made(hs) == 1 and said.startswith("I made you a chat room, “Chat 1”")
    before_it = lobby_message(fresh, ts=int(time.time() * 1000) - 60_000)
    await run(fresh, before_it)  # written before that room was made: no new try
    assert made(hs) == 1

    hs.encrypts = False  # the admin turned the setting off and restarted Synapse
    [welcome] = await run(fresh, lobby_message(fresh, "fixed?"))
    assert made(hs) == 2 and welcome.startswith("Welcome! Your Space is")
    [_, readable] = linked_rooms(welcome)
    assert await fresh.store.get_encrypted(readable) is None
    assert await holding_room(fresh.store, fresh.chats, ALICE) is None
    [hint] = await run(fresh, lobby_message(fresh, "and now?"))
    assert hint.startswith("This is your lobby") and made(hs) == 2


async def test_a_user_writing_again_and_again_while_held_makes_a_few_rooms_a_minute_at_most(
    fresh, hs
):
    await run(fresh, Update("invite", LOBBY, ALICE, "invite|lobby"))
    for i in range(fresh.access.creations_per_window + 3):
        await run(fresh, lobby_message(fresh, f"hello {i}?"))
    assert made(hs) == fresh.access.creations_per_window


# Healing learns it too: after a loss of the DB, and for a room recorded before the bot looked


class StateServer(FakeHomeserver):
    """Answers ``get_state`` from fixed room states, and counts the reads."""

    def __init__(self, states: dict[str, list[dict]]) -> None:
        super().__init__()
        self.states = states
        self.reads = 0

    async def get_state(self, room_id: str) -> list[dict]:
        self.reads += 1
        return self.states.get(room_id, [])


ENCRYPTED_CHAT = [*doctor.chat_state(), doctor.ev("m.room.encryption", ENCRYPTION)]


async def test_a_heal_records_an_encrypted_chat_and_tells_the_operator_once(store):
    svc = make_services(store, StateServer({doctor.CHAT: ENCRYPTED_CHAT}))
    healer = Healer(svc)
    with capture_logs() as logs:
        plan = await healer.heal_room(doctor.CHAT)
        await healer.heal_room(doctor.CHAT)  # idempotent: nothing told twice
    assert plan.unreadable == EncryptedRoom(doctor.ALICE, "chat", doctor.MADE_MS / 1000)
    assert await svc.store.get_encrypted(doctor.CHAT) == plan.unreadable
    assert [e["room_id"] for e in logs if e["event"] == "room.encrypted_by_server"] == [doctor.CHAT]
    [first, _] = [e for e in logs if e["event"] == "state.healed"]
    assert "encrypted_room" in first["restored"]


async def test_a_chat_recorded_before_the_bot_looked_is_read_once_when_an_encrypted_event_comes(
    store,
):
    hs = StateServer({doctor.CHAT: ENCRYPTED_CHAT, CHAT: doctor.chat_state()})
    svc = make_services(store, hs)
    await svc.store.set_room(doctor.CHAT, RoomMeta("chat", doctor.ALICE, "c1", doctor.SPACE))
    await svc.store.set_room(CHAT, RoomMeta("chat", doctor.ALICE, "c2", doctor.SPACE))
    healer = Healer(svc)
    with capture_logs() as logs:
        found = await healer.unreadable(doctor.CHAT)
        assert await healer.unreadable(doctor.CHAT) == found  # from the DB: no second read
    assert found == EncryptedRoom(doctor.ALICE, "chat", doctor.MADE_MS / 1000)
    assert hs.reads == 1 and len(logs) == 1
    assert await healer.unreadable(CHAT) is None  # readable: nothing recorded
    assert await svc.store.get_encrypted(CHAT) is None
