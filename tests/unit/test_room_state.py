"""The healing decision over hand-built room state (room version 12: no ``creator`` field)."""

from __future__ import annotations

import pytest

from adapter.matrix.healing.room_state import (
    HealRefused,
    RoomSnapshot,
    assess_room,
    heal_cause,
    legacy_chat_id,
    parent_to_verify,
)
from adapter.matrix.vocabulary.markers import ChatMarker, SpaceMarker
from core.store import Birth

BOT, ALICE, BOB = "@lambda:localhost", "@alice:localhost", "@bob:localhost"
SPACE, ROOM = "!space:localhost", "!room:localhost"


def ev(type_: str, content: dict, sender: str = BOT, state_key: str = "") -> dict:
    return {
        "type": type_,
        "state_key": state_key,
        "sender": sender,
        "content": content,
        "origin_server_ts": 1_700_000_000_000,
    }


def member(user: str, membership: str = "join") -> dict:
    return ev("m.room.member", {"membership": membership}, sender=user, state_key=user)


def space_state(owner: str = ALICE, marker: bool = True, creator: str = BOT) -> RoomSnapshot:
    events = [
        ev("m.room.create", {"type": "m.space", "room_version": "12"}, sender=creator),
        member(BOT),
        member(owner, "invite"),
        ev("m.space.child", {"via": ["localhost"]}, state_key=ROOM),
    ]
    if marker:
        events.append(ev(SpaceMarker.TYPE, {"owner": owner, "v": 1}))
    return RoomSnapshot.from_events(SPACE, events)


def chat_events(
    owner: str = ALICE,
    marker: dict | None = None,
    marker_sender: str = BOT,
    creator: str = BOT,
    parents: tuple[str, ...] = (SPACE,),
) -> list[dict]:
    events = [
        ev("m.room.create", {"room_version": "12"}, sender=creator),
        member(BOT),
        member(owner),
        ev("m.room.name", {"name": "Trip"}, sender=owner),
    ]
    events += [ev("m.space.parent", {"via": ["localhost"]}, state_key=p) for p in parents]
    if marker is not None:
        events.append(ev(ChatMarker.TYPE, marker, sender=marker_sender))
    return events


def snap(events: list[dict]) -> RoomSnapshot:
    return RoomSnapshot.from_events(ROOM, events)


MARKER = {"owner": ALICE, "chat_id": "abc123def456", "status": "active", "v": 1}


def test_marker_room_is_restored_exactly():
    plan = assess_room(snap(chat_events(marker=MARKER)), BOT)
    assert plan.source == "marker"
    assert plan.room.kind == "chat" and plan.room.owner == ALICE
    assert plan.room.chat_id == "abc123def456" and plan.room.space_id == SPACE
    assert plan.chat is not None and plan.user is not None
    assert plan.chat.title == "Trip" and plan.chat.status == "active"
    assert plan.chat.created_at == 1_700_000_000
    assert plan.user.space_id == SPACE


def test_archived_marker_restores_archived_status():
    plan = assess_room(snap(chat_events(marker={**MARKER, "status": "archived"})), BOT)
    assert plan.chat is not None and plan.chat.status == "archived"


def test_marker_needs_no_parent_fetch():
    assert parent_to_verify(snap(chat_events(marker=MARKER)), BOT) is None


def test_legacy_room_heals_from_name_parent_and_member_with_stable_id():
    room = snap(chat_events())
    assert parent_to_verify(room, BOT) == SPACE
    plan = assess_room(room, BOT, space_state())
    assert plan.source == "legacy" and plan.chat is not None
    assert plan.room.owner == ALICE and plan.chat.title == "Trip"
    again = assess_room(room, BOT, space_state())
    assert plan.room.chat_id == legacy_chat_id(ROOM) == again.room.chat_id


def test_legacy_room_with_legacy_parent_space():
    plan = assess_room(snap(chat_events()), BOT, space_state(marker=False))
    assert plan.room.owner == ALICE


@pytest.mark.parametrize("content", [{}, None])
def test_redacted_or_empty_marker_falls_back_to_legacy(content):
    events = chat_events()
    events.append({"type": ChatMarker.TYPE, "state_key": "", "sender": BOT, "content": content})
    plan = assess_room(snap(events), BOT, space_state())
    assert plan.source == "legacy"


def test_marker_sent_by_someone_else_is_refused():
    with pytest.raises(HealRefused) as err:
        assess_room(snap(chat_events(marker=MARKER, marker_sender=ALICE)), BOT)
    assert err.value.reason == "forged_marker"


@pytest.mark.parametrize(
    "bad",
    [
        {"owner": "alice", "chat_id": "x", "status": "active"},
        {"owner": ALICE, "chat_id": "", "status": "active"},
        {"owner": ALICE, "chat_id": "x", "status": "deleted"},
    ],
)
def test_malformed_marker_is_refused(bad):
    with pytest.raises(HealRefused) as err:
        assess_room(snap(chat_events(marker=bad)), BOT)
    assert err.value.reason == "malformed_marker"


def test_marker_owner_contradicted_by_members_is_refused():
    events = chat_events(owner=BOB, marker=MARKER)
    with pytest.raises(HealRefused) as err:
        assess_room(snap(events), BOT)
    assert err.value.reason == "unexpected_members"


def test_room_made_by_someone_else_with_one_member_is_their_lobby_whatever_it_carries():
    events = chat_events(
        owner=BOB, creator=BOB, marker={**MARKER, "owner": ALICE}, marker_sender=BOB
    )
    plan = assess_room(snap(events), BOT)
    assert plan.room.kind == "lobby" and plan.room.owner == BOB
    assert plan.chat is None and plan.user is None


def test_room_made_by_someone_else_with_more_members_is_refused():
    events = chat_events(owner=BOB, creator=BOB) + [member(ALICE)]
    with pytest.raises(HealRefused) as err:
        assess_room(snap(events), BOT)
    assert err.value.reason == "shared_room"


def test_legacy_room_whose_parent_space_belongs_to_another_user_is_refused():
    with pytest.raises(HealRefused) as err:
        assess_room(snap(chat_events()), BOT, space_state(owner=BOB))
    assert err.value.reason == "foreign_parent"


def test_legacy_room_whose_parent_was_not_made_by_the_bot_is_refused():
    with pytest.raises(HealRefused) as err:
        assess_room(snap(chat_events()), BOT, space_state(creator=ALICE))
    assert err.value.reason == "foreign_parent"


def test_legacy_room_with_two_candidate_owners_is_refused():
    events = chat_events() + [member(BOB, "invite")]
    with pytest.raises(HealRefused) as err:
        assess_room(snap(events), BOT, space_state())
    assert err.value.reason == "no_single_owner"


def test_legacy_room_whose_owner_left_is_refused():
    events = chat_events() + [member(ALICE, "leave")]
    with pytest.raises(HealRefused) as err:
        assess_room(snap(events), BOT, space_state())
    assert err.value.reason == "no_single_owner"


def test_several_parents_are_refused_but_a_forged_extra_parent_is_ignored():
    with pytest.raises(HealRefused) as err:
        assess_room(snap(chat_events(marker=MARKER, parents=(SPACE, "!other:localhost"))), BOT)
    assert err.value.reason == "ambiguous_parent"
    events = chat_events(marker=MARKER) + [
        ev("m.space.parent", {"via": ["x"]}, sender=ALICE, state_key="!evil:localhost")
    ]
    assert assess_room(snap(events), BOT).room.space_id == SPACE


def test_legacy_room_without_parent_is_refused():
    with pytest.raises(HealRefused) as err:
        assess_room(snap(chat_events(parents=())), BOT)
    assert err.value.reason == "missing_parent"


def test_space_with_marker_heals_owner_and_user_record():
    plan = assess_room(space_state(), BOT)
    assert plan.room.kind == "space" and plan.room.owner == ALICE
    assert plan.user is not None
    assert plan.user.space_id == SPACE and plan.source == "marker"


def test_space_children_only_count_when_sent_by_the_bot_and_not_emptied():
    events = [
        ev("m.space.child", {"via": ["x"]}, state_key="!a:x"),
        ev("m.space.child", {}, state_key="!gone:x"),
        ev("m.space.child", {"via": ["x"]}, sender=ALICE, state_key="!forged:x"),
    ]
    assert RoomSnapshot.from_events(SPACE, events).children(BOT) == ["!a:x"]


def test_room_without_create_event_is_refused():
    with pytest.raises(HealRefused) as err:
        assess_room(snap([member(ALICE)]), BOT)
    assert err.value.reason == "unknown_room"


def test_every_refusal_has_a_user_message():
    assert "not created by me" in HealRefused("shared_room").user_message


def test_unreadable_parent_space_is_a_foreign_parent():
    with pytest.raises(HealRefused) as err:
        assess_room(snap(chat_events()), BOT, RoomSnapshot(SPACE))
    assert err.value.reason == "foreign_parent"


def test_the_cause_is_the_births_for_an_older_room_the_db_held_nothing_of():
    birth = Birth(at=2_000.0, cause="local_reset")
    assert heal_cause(birth, created_at=1_000.0) == "local_reset"
    assert heal_cause(birth) == "local_reset"  # state not read yet: taken as older
    assert heal_cause(birth, created_at=1_000.0, held=True) == "inconsistent"
    assert heal_cause(birth, created_at=3_000.0) == "inconsistent"
    assert heal_cause(None, created_at=1_000.0) == "inconsistent"
