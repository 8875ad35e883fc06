"""The doctor's comparison (pure), over plain records and hand-built room state: each room
is ok, missing_locally (with the cause its heal will log), stale_locally or mismatch; and
the two reports of it."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

from adapter.matrix.delivery.inbox import Entry
from adapter.matrix.ingest.update import Update, UpdateKind
from adapter.matrix.store.records import RoomMeta, UserMeta
from adapter.matrix.vocabulary.markers import ChatMarker, SpaceMarker
from core.chat import Chat, ChatStatus
from core.store import Birth

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

from doctor_tool.compare import ServerRooms, compare, parents_to_read
from doctor_tool.diagnosis import Diagnosis, inbox_summary
from doctor_tool.local import LocalRecords, records_from
from doctor_tool.report import as_json, as_text

BOT, ALICE, BOB = "@lambda:x", "@alice:x", "@bob:x"
SPACE, CHAT, LOBBY, SHARED = "!space:x", "!chat:x", "!lobby:x", "!shared:x"
MADE_MS = 1_000_000_000_000  # the rooms' m.room.create
BEFORE_THE_ROOMS, AFTER_THE_ROOMS = (
    Birth(900_000_000, "store_missing"),
    Birth(1_100_000_000, "local_reset"),
)


def ev(
    type_: str, content: dict, sender: str = BOT, state_key: str = "", event_id: str = ""
) -> dict:
    return {
        "type": type_,
        "state_key": state_key,
        "sender": sender,
        "content": content,
        "origin_server_ts": MADE_MS,
        "event_id": event_id or f"${type_}{state_key}",
    }


def member(user: str) -> dict:
    return ev("m.room.member", {"membership": "join"}, sender=user, state_key=user)


def space_state() -> list[dict]:
    return [
        ev("m.room.create", {"type": "m.space"}),
        member(BOT),
        member(ALICE),
        ev(SpaceMarker.TYPE, SpaceMarker(ALICE).content()),
        ev("m.space.child", {"via": ["x"]}, state_key=CHAT),
    ]


def chat_state(
    name: str = "Trip", status: ChatStatus = "active", name_by: str = BOT, name_id: str = "$name"
) -> list[dict]:
    return [
        ev("m.room.create", {}),
        member(BOT),
        member(ALICE),
        ev("m.room.name", {"name": name}, sender=name_by, event_id=name_id),
        ev("m.space.parent", {"via": ["x"]}, state_key=SPACE),
        ev(ChatMarker.TYPE, ChatMarker(ALICE, "c1", status).content()),
    ]


def lobby_state(*members: str) -> list[dict]:
    return [ev("m.room.create", {}, sender=ALICE), member(BOT), *[member(m) for m in members]]


HEALTHY = LocalRecords(
    birth=BEFORE_THE_ROOMS,
    users={ALICE: UserMeta(SPACE, LOBBY)},
    rooms={
        SPACE: RoomMeta("space", ALICE),
        LOBBY: RoomMeta("lobby", ALICE),
        CHAT: RoomMeta("chat", ALICE, "c1", SPACE),
    },
    chats={(ALICE, "c1"): Chat("c1", ALICE, "Trip", "active", 1.0)},
)
SERVER = ServerRooms(
    frozenset({SPACE, CHAT, LOBBY}),
    {SPACE: space_state(), CHAT: chat_state(), LOBBY: lobby_state(ALICE)},
)


def findings(local: LocalRecords = HEALTHY, server: ServerRooms = SERVER) -> dict:
    return {f.room_id: f for f in compare(local, server, BOT)}


def pending(kind: UpdateKind, room_id: str, event_id: str, ts: int = 0, seq: int = 0) -> Entry:
    return Entry(seq, Update(kind, room_id, ALICE, event_id, body="x", ts=ts))


def test_a_healthy_state_is_all_ok_and_consistent():
    found = findings()
    assert {rid: (f.kind, f.owner, f.state) for rid, f in found.items()} == {
        SPACE: ("space", ALICE, "ok"),
        LOBBY: ("lobby", ALICE, "ok"),
        CHAT: ("chat", ALICE, "ok"),
    }
    assert [f.room_id for f in compare(HEALTHY, SERVER, BOT)] == [SPACE, LOBBY, CHAT]
    diagnosis = Diagnosis(HEALTHY.birth, inbox_summary((), 0), tuple(found.values()))
    assert diagnosis.consistent and diagnosis.heals_by_itself


def test_rooms_older_than_the_db_that_it_lost_heal_with_its_birth_cause():
    lost = LocalRecords(birth=AFTER_THE_ROOMS, users={}, rooms={}, chats={})
    found = findings(lost)
    assert {f.state for f in found.values()} == {"missing_locally"}
    assert {f.cause for f in found.values()} == {"local_reset"}
    assert "no room record, no chat record" in found[CHAT].detail
    assert "cause=local_reset" in found[CHAT].detail
    assert f"no matrix_user record for {ALICE}" in found[SPACE].detail
    assert all(f.heals and not f.doubtful for f in found.values())


def test_a_room_the_db_partly_holds_heals_as_inconsistent():
    found = findings(replace(HEALTHY, chats={}))
    assert found[CHAT].state == "missing_locally" and found[CHAT].cause == "inconsistent"
    assert found[CHAT].heals and found[CHAT].doubtful
    assert found[SPACE].state == "ok"


def test_a_space_heals_when_its_owner_needs_it_or_on_an_event_in_it():
    no_user = findings(replace(HEALTHY, users={}))[SPACE]
    assert no_user.state == "missing_locally" and no_user.cause == "inconsistent"
    assert "when its owner next needs their Space" in no_user.detail
    no_room = findings(
        replace(HEALTHY, rooms={k: v for k, v in HEALTHY.rooms.items() if k != SPACE})
    )[SPACE]
    assert "no room record: the bot heals it on the next event in it" in no_room.detail


def test_a_room_younger_than_the_db_that_it_lacks_heals_as_inconsistent():
    found = findings(replace(HEALTHY, birth=BEFORE_THE_ROOMS, rooms={}, chats={}))
    assert found[CHAT].cause == "inconsistent" and found[CHAT].heals


def test_a_record_of_a_room_the_bot_left_is_stale_and_will_not_heal():
    found = findings(server=replace(SERVER, joined=frozenset({SPACE, CHAT})))
    assert found[LOBBY].state == "stale_locally" and not found[LOBBY].heals
    assert f"{ALICE}'s record, as their lobby" in found[LOBBY].detail


def test_a_chat_record_no_room_carries_is_stale():
    orphan = Chat("c9", ALICE, "Lost", "active", 1.0)
    found = findings(replace(HEALTHY, chats={**HEALTHY.chats, (ALICE, "c9"): orphan}))
    assert found[None].state == "stale_locally" and found[None].name == "Lost"


def test_a_title_or_status_changed_behind_the_bots_back_is_a_mismatch():
    forged = replace(HEALTHY, chats={(ALICE, "c1"): Chat("c1", ALICE, "Forged", "archived", 1.0)})
    found = findings(forged)[CHAT]
    assert found.state == "mismatch" and not found.heals
    assert "title: local “Forged”, server “Trip”" in found.detail
    assert "status: local archived, marker active" in found.detail


def test_an_owners_rename_the_bot_has_not_handled_yet_follows_by_itself():
    renamed = replace(SERVER, states={**SERVER.states, CHAT: chat_state("Beach", name_by=ALICE)})
    asked = findings(server=renamed)[CHAT]
    assert asked.state == "mismatch" and not asked.heals and asked.rename == "$name"
    after_sync = findings(server=replace(renamed, unsynced=frozenset({"$name"})))[CHAT]
    assert after_sync.heals and "follows on its next" in after_sync.detail
    waiting = replace(HEALTHY, inbox=(pending("room_name", CHAT, "$name"),))
    in_inbox = findings(waiting, renamed)[CHAT]
    assert in_inbox.heals and "waits in the inbox" in in_inbox.detail


def test_a_rename_to_an_invalid_title_does_not_follow():
    bad = replace(SERVER, states={**SERVER.states, CHAT: chat_state("x" * 300, name_by=ALICE)})
    found = findings(server=bad)[CHAT]
    assert not found.heals and found.rename is None and "no valid title" in found.detail


def test_a_record_naming_another_space_or_owner_is_a_mismatch():
    other = replace(
        HEALTHY,
        users={ALICE: UserMeta("!old:x", LOBBY)},
        rooms={**HEALTHY.rooms, LOBBY: RoomMeta("lobby", BOB)},
    )
    found = findings(other)
    assert (
        found[LOBBY].state == "mismatch"
        and "owner: local @bob:x, server @alice:x" in found[LOBBY].detail
    )
    assert found[SPACE].state == "mismatch" and "names the Space !old:x" in found[SPACE].detail
    assert found["!old:x"].state == "stale_locally"


def test_a_room_the_bot_refuses_is_ok_without_a_record_and_a_mismatch_with_one():
    server = replace(
        SERVER,
        joined=SERVER.joined | {SHARED},
        states={**SERVER.states, SHARED: lobby_state(ALICE, BOB)},
    )
    assert findings(server=server)[SHARED].state == "ok"
    trusted = replace(HEALTHY, rooms={**HEALTHY.rooms, SHARED: RoomMeta("lobby", ALICE)})
    found = findings(trusted, server)[SHARED]
    assert found.state == "mismatch" and "shared_room" in found.detail


def test_a_lobby_its_owner_left_is_stale():
    left = replace(SERVER, states={**SERVER.states, LOBBY: lobby_state()})
    assert findings(server=left)[LOBBY].state == "stale_locally"


def test_a_legacy_chat_needs_its_parent_read():
    legacy = [e for e in chat_state() if e["type"] != ChatMarker.TYPE]
    server = ServerRooms(frozenset({CHAT}), {CHAT: legacy})
    assert parents_to_read(server, BOT) == {SPACE}
    assert (
        parents_to_read(replace(server, states={CHAT: legacy, SPACE: space_state()}), BOT) == set()
    )


def test_the_inbox_summary_counts_and_ages_the_oldest_update():
    entries = (
        pending("message", CHAT, "$a", ts=10_000, seq=1),
        pending("invite", LOBBY, "$b", ts=0, seq=2),
        pending("message", CHAT, "$c", ts=4_000, seq=3),
    )
    summary = inbox_summary(entries, now=20.0)
    assert summary.pending == 3 and summary.oldest_s == 16.0
    assert inbox_summary((), now=20.0).oldest_s is None


def test_records_are_read_from_raw_rows():
    rows = {
        "birth": '{"at": 5.0, "cause": "local_reset"}',
        "sync_token": '"s1"',
        f"matrix_user:{ALICE}": f'{{"space_id": "{SPACE}", "lobby_room_id": null}}',
        f"matrix_room:{CHAT}": f'{{"kind": "chat", "owner": "{ALICE}", "chat_id": "c1"}}',
        f"chat:{ALICE}:c1": f'{{"chat_id": "c1", "user_id": "{ALICE}", "title": "T", '
        '"status": "active", "created_at": 1.0}',
        "inbox:000000000007": '{"update": {"kind": "message", "room_id": "!r", '
        '"sender": "@a:x", "event_id": "$e", "ts": 3}}',
        "pending:!r": "{}",
    }
    local = records_from(rows)
    assert local.birth == Birth(5.0, "local_reset") and local.sync_token == "s1"
    assert local.users[ALICE].space_id == SPACE and local.rooms[CHAT].chat_id == "c1"
    assert local.chats[(ALICE, "c1")].title == "T" and local.inbox[0].seq == 7


def test_the_reports_say_the_same_in_the_specs_json_shape_and_in_text():
    lost = replace(HEALTHY, rooms={k: v for k, v in HEALTHY.rooms.items() if k != CHAT})
    diagnosis = Diagnosis(lost.birth, inbox_summary((), 0), tuple(compare(lost, SERVER, BOT)))
    report = json.loads(as_json(diagnosis))
    assert set(report) == {"consistent", "birth", "inbox", "rooms"}
    assert report["consistent"] is False and report["birth"] == {
        "at": 9e8,
        "cause": "store_missing",
    }
    assert report["inbox"] == {"pending": 0, "oldest_s": None}
    assert {tuple(sorted(room)) for room in report["rooms"]} == {
        ("detail", "kind", "owner", "room_id", "state")
    }
    text = as_text(diagnosis, BOT, "http://hs", "/db", now=9e8 + 60)
    assert f"\n{ALICE}\n  ok               space  {SPACE}  Space" in text
    assert "missing_locally  chat   !chat:x  Trip" in text and "(exit 0)" in text
    assert "born 1998-07-09 16:00:00 UTC (1.0 min ago), cause store_missing" in text
