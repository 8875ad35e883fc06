"""Ingest: which raw events become updates, the catch-up rule, and the updates a whole sync
response gives (invites, a newly joined room, a limited timeline's backfill and its bound)."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import pytest
import structlog
from nio import SyncResponse

from adapter.matrix.ingest import events, sweep
from adapter.matrix.ingest.catchup import CatchUpReader, catch_up, deferred
from adapter.matrix.ingest.events import to_update
from adapter.matrix.ingest.sweep import Glimpse, Window, next_window, parse_window
from adapter.matrix.ingest.sync import Ingest, sync_token_refused
from adapter.matrix.ingest.update import Update

BOT, ALICE = "@lambda:x", "@alice:x"
NOW = 1_000_000_000


def text(event_id: str, body: str, sender: str = ALICE, ts: int = NOW, **content) -> dict:
    return {
        "type": "m.room.message",
        "event_id": event_id,
        "sender": sender,
        "origin_server_ts": ts,
        "room_id": "!r:x",
        "content": {"msgtype": "m.text", "body": body, **content},
    }


def reply(to: str | None, body: str = "Echo") -> dict:
    extra: dict[str, Any] = {"io.lambda.source": to} if to else {}
    return text(f"$re-{to}-{body}", body, sender=BOT, msgtype="m.notice", **extra)


def update_of(ev: dict, catchup: bool = False) -> Update:
    update = to_update(ev, BOT, catchup)
    assert update is not None
    return update


def test_to_update_keeps_text_renames_and_encrypted_but_never_the_bots_own():
    assert update_of(text("$1", "hi")).kind == "message"
    assert update_of(text("$1", "hi")).ts == NOW
    assert to_update(text("$2", "echo", sender=BOT), BOT) is None
    rename = {
        "type": "m.room.name",
        "state_key": "",
        "sender": ALICE,
        "event_id": "$3",
        "content": {"name": "New"},
    }
    assert update_of(rename).body == "New"
    assert (
        update_of(
            {"type": "m.room.encrypted", "sender": ALICE, "event_id": "$4", "content": {}}
        ).kind
        == "encrypted"
    )
    for odd in (
        {"type": "m.room.message", "sender": ALICE, "content": "x"},
        {"type": "m.room.message", "sender": ALICE, "content": {"msgtype": "m.image"}},
        {"type": "m.reaction", "sender": ALICE, "content": {}},
    ):
        assert to_update(odd, BOT) is None
    assert update_of(text("$5", "hi"), catchup=True).catchup


def test_catch_up_answers_only_unanswered_recent_messages_in_order():
    events = [
        text("$old", "too old", ts=NOW - 10),
        text("$a", "answered"),
        reply("$a"),
        text("$b", "unanswered 1"),
        text("$c", "unanswered 2"),
    ]
    found = catch_up(events, BOT, not_before_ms=NOW - 5)
    assert [ev["event_id"] for ev in found.answer] == ["$b", "$c"]
    assert found.skipped == 2 and found.complete  # the too old one ends it


def test_catch_up_counts_a_legacy_reply_without_source_as_answering_what_came_before():
    events = [
        text("$a", "before the upgrade"),
        reply(None, "old style answer"),
        text("$b", "after it"),
    ]
    found = catch_up(events, BOT, not_before_ms=0)
    assert [ev["event_id"] for ev in found.answer] == ["$b"] and found.complete


def test_catch_up_answers_a_message_whose_reply_names_another_event():
    events = [text("$a", "one"), text("$b", "two"), reply("$b")]
    found = catch_up(events, BOT, not_before_ms=0)
    assert [ev["event_id"] for ev in found.answer] == ["$a"] and not found.complete


# Ingest.updates: a sync response (built with nio's own parser) -> the updates to handle.


class PagedHomeserver:
    """``/messages`` backwards from a limited timeline: ``pages`` are served newest first."""

    bot_id = BOT

    def __init__(self, *pages: list[dict], since: list[dict] | None = None) -> None:
        self.pages = list(pages)
        self.since = since or []  # forwards from a sync token: the bot's messages after it
        self.asked: list[tuple] = []

    async def messages(self, room_id, start, end, limit, types, forward=False, senders=None):
        if forward:
            return self.since, None
        self.asked.append((room_id, start, end))
        page = self.pages.pop(0)
        return page, (f"t{len(self.pages)}" if self.pages else None)


def sync(
    *,
    join: dict[str, list[dict]] | None = None,
    invite: dict[str, list[dict]] | None = None,
    limited: bool = False,
) -> SyncResponse:
    timeline = {
        room: {"events": events, "limited": limited, "prev_batch": "p1"}
        for room, events in (join or {}).items()
    }
    return SyncResponse.from_dict(
        {
            "next_batch": "s2",
            "rooms": {
                "invite": {
                    room: {"invite_state": {"events": events}}
                    for room, events in (invite or {}).items()
                },
                "join": {
                    room: {"timeline": t, "state": {"events": []}} for room, t in timeline.items()
                },
                "leave": {},
            },
        }
    )


def member(user: str, membership: str, sender: str = ALICE, prev: str | None = None) -> dict:
    ev = {
        "type": "m.room.member",
        "state_key": user,
        "sender": sender,
        "event_id": f"$m-{user}",
        "origin_server_ts": NOW,
        "content": {"membership": membership},
    }
    if prev:
        ev["unsigned"] = {"prev_content": {"membership": prev}}
    return ev


def ingest(hs: PagedHomeserver, catchup_hours: float) -> Ingest:
    return Ingest(hs, catchup_hours)  # type: ignore[arg-type]  # a duck-typed fake of Homeserver


def ids(updates) -> list[str]:
    return [u.event_id for u in updates]


async def test_an_invite_of_the_bot_becomes_one_invite_update():
    resp = sync(
        invite={
            "!inv:x": [member("@someone:x", "invite"), member(BOT, "invite")],
            "!not-us:x": [member("@someone:x", "invite")],
        }
    )
    [update] = await ingest(PagedHomeserver(), 24).updates(resp, since="s1")
    assert (update.kind, update.room_id, update.sender) == ("invite", "!inv:x", ALICE)
    assert update.event_id == "invite|!inv:x|s1"


async def test_a_resumed_sync_hands_on_every_new_event_but_the_bots_own_in_order():
    rename = {
        "type": "m.room.name",
        "state_key": "",
        "sender": ALICE,
        "event_id": "$n",
        "content": {"name": "Trip"},
    }
    resp = sync(join={"!r:x": [text("$1", "one"), reply("$1"), rename, text("$2", "two")]})
    updates = await ingest(PagedHomeserver(), 24).updates(resp, since="s1")
    assert [(u.kind, u.event_id) for u in updates] == [
        ("message", "$1"),
        ("room_name", "$n"),
        ("message", "$2"),
    ]
    assert all(u.room_id == "!r:x" and not u.catchup for u in updates)


async def test_in_a_room_the_bot_just_joined_only_what_follows_its_join_is_its_to_answer():
    resp = sync(
        join={
            "!r:x": [
                text("$before", "not ours"),
                member(BOT, "join", BOT, "invite"),
                text("$after", "ours"),
                member(BOT, "join", BOT, prev="join"),
            ]
        }
    )  # a profile change
    assert ids(await ingest(PagedHomeserver(), 24).updates(resp, since="s1")) == ["$after"]


async def test_a_limited_timeline_is_backfilled_back_to_the_previous_token_first():
    hs = PagedHomeserver([text("$3", "c"), text("$2", "b")], [reply("$1"), text("$1", "a")])
    resp = sync(join={"!r:x": [text("$4", "d")]}, limited=True)
    with structlog.testing.capture_logs() as logs:
        updates = await ingest(hs, 24).updates(resp, since="s1")
    assert ids(updates) == ["$1", "$2", "$3", "$4"]
    assert hs.asked == [("!r:x", "p1", "s1"), ("!r:x", "t1", "s1")]
    assert [(e["event"], e["events"]) for e in logs] == [("sync.gap_backfilled", 3)]


async def test_backfill_stops_at_the_bots_own_join():
    hs = PagedHomeserver(
        [text("$2", "b"), member(BOT, "join", BOT, "invite"), text("$1", "a")],
        [text("$0", "never fetched")],
    )
    resp = sync(join={"!r:x": [text("$3", "c")]}, limited=True)
    assert ids(await ingest(hs, 24).updates(resp, since="s1")) == ["$2", "$3"]
    assert len(hs.asked) == 1


async def test_past_the_backfill_bound_the_owner_is_told_how_many_were_missed(monkeypatch):
    monkeypatch.setattr(events, "MAX_BACKFILL", 2)
    hs = PagedHomeserver([text(f"${i}", str(i)) for i in range(5, 0, -1)])
    resp = sync(join={"!r:x": [text("$6", "6")]}, limited=True)
    with structlog.testing.capture_logs() as logs:
        updates = await ingest(hs, 24).updates(resp, since="s1")
    missed, *rest = updates
    assert (missed.kind, missed.body, missed.sender) == ("missed", "3", ALICE)
    assert missed.event_id == "missed|!r:x|s1"
    assert ids(rest) == ["$4", "$5", "$6"]
    assert [e for e in logs if e["event"] == "sync.timeline_gap"][0]["unanswered"] == 3


def window(
    join: dict[str, list[dict]], limited: bool = True, types: dict[str, str] | None = None
) -> Window:
    return Window(
        [Glimpse(room, evs, limited, (types or {}).get(room), []) for room, evs in join.items()], []
    )


async def test_a_start_without_token_reads_back_only_rooms_with_unanswered_messages(monkeypatch):
    monkeypatch.setattr(time, "time", lambda: NOW / 1000 + 3600)
    hs = PagedHomeserver()
    reader = ingest(hs, catchup_hours=1)
    reader.start_without_token("s0")
    with structlog.testing.capture_logs() as logs:
        [later] = reader.sweep(
            window(
                {
                    "!busy:x": [
                        text("$old", "two hours ago", ts=NOW - 3_600_001),
                        text("$new", "unanswered"),
                        text("$done", "answered"),
                        reply("$done"),
                    ],
                    "!quiet:x": [text("$3", "answered"), reply("$3")],
                }
            )
        )
    assert (later.kind, later.room_id, later.body, later.catchup) == (
        "catchup",
        "!busy:x",
        "s0",
        True,
    )
    assert later.may_be_answered  # an earlier start's catch-up may be answering it
    assert hs.asked == []  # the sweep itself reads nothing: the room's lane does
    [log] = [e for e in logs if e["event"] == "sync.catchup"]
    assert (log["deferred"], log["rooms"]) == (1, 2)


def test_a_sweep_reads_back_a_room_whose_latest_events_cannot_tell_but_never_a_space():
    reactions = [
        {
            "type": "m.reaction",
            "sender": ALICE,
            "event_id": f"$r{i}",
            "origin_server_ts": NOW,
            "content": {},
        }
        for i in range(3)
    ]
    reader = ingest(PagedHomeserver(), catchup_hours=1)
    reader.start_without_token("s0")
    swept = reader.sweep(
        window(
            {
                "!reacted:x": reactions,
                "!space:x": [text("$1", "hi")],
                "!spoken:x": [*reactions, text("$2", "hi"), reply("$2")],
            },
            types={"!space:x": "m.space"},
        )
    )
    assert [u.room_id for u in swept] == ["!reacted:x"]
    # The whole room (not limited) with no message has nothing older: nothing to read.
    assert not reader.sweep(window({"!all:x": reactions}, limited=False))


def test_a_sliding_sync_window_gives_new_rooms_and_invites_but_not_rooms_sent_or_left():
    create = {
        "type": "m.room.create",
        "state_key": "",
        "sender": BOT,
        "content": {"type": "m.space"},
    }
    body = {
        "pos": "p1",
        "lists": {"recent": {"count": 4}},
        "rooms": {
            "!chat:x": {
                "initial": True,
                "limited": True,
                "timeline": [text("$1", "hi")],
                "required_state": [{**create, "content": {}}, member(BOT, "join", BOT)],
            },
            "!unseen:x": {"initial": True},  # its create event not shown: type unknown
            "!space:x": {"initial": True, "required_state": [create, member(BOT, "join", BOT)]},
            "!sent:x": {"timeline": [text("$2", "seen live")]},  # not initial: sent before
            "!left:x": {"initial": True, "required_state": [member(BOT, "leave", BOT)]},
            "!inv:x": {"initial": True, "invite_state": [member(BOT, "invite")]},
            "!inv-other:x": {"initial": True, "invite_state": [member("@someone:x", "invite")]},
        },
    }
    found = parse_window(body, BOT)
    assert [(g.room_id, g.room_type, g.limited) for g in found.rooms] == [
        ("!chat:x", "", True),
        ("!unseen:x", None, False),
        ("!space:x", "m.space", False),
    ]
    assert found.rooms[0].events[0]["room_id"] == "!chat:x"
    assert found.invites == [("!inv:x", ALICE)]


def test_a_sweeps_next_window_holds_as_many_rooms_as_its_cost_allows():
    cost = sweep.WINDOW_COST_S
    assert next_window(10, cost, users_waited=False) == 10  # as costly as allowed: the same
    assert next_window(48, cost * 4, users_waited=False) == 12  # four times too slow: a quarter
    assert next_window(10, cost / 10, users_waited=False) == 20  # cheap: at most twice as many
    assert next_window(40, cost / 10, users_waited=False) == sweep.WINDOW  # never past the cap
    assert next_window(10, cost * 100, users_waited=False) == sweep.LEAST_WINDOW  # still goes on
    assert next_window(40, cost, users_waited=True) == 20  # users active: half of what fits
    assert next_window(20, 0.0, users_waited=False) == 40  # too fast to measure: twice


class SlidingHomeserver:
    """A sliding sync connection over ``rooms`` (most recent first): each answer holds the
    rooms of the range not sent before on the connection, as Synapse's does."""

    bot_id = BOT

    def __init__(self, rooms: int) -> None:
        self.rooms = [f"!r{i}:x" for i in range(rooms)]
        self.sent: set[str] = set()
        self.ranges: list[int] = []

    async def sliding_sync(self, conn_id, lists, pos):
        [[start, end]] = lists["recent"]["ranges"]
        self.ranges.append(end)
        new = [r for r in self.rooms[start : end + 1] if r not in self.sent]
        self.sent.update(new)
        body = {"initial": True, "timeline": [text("$1", "hi")], "required_state": []}
        return {
            "pos": f"p{len(self.ranges)}",
            "lists": {"recent": {"count": len(self.rooms)}},
            "rooms": {room_id: body for room_id in new},
        }

    def note_room(self, room_id, room_type, state):
        pass


@pytest.mark.asyncio
async def test_a_sweep_walks_every_room_once_in_windows_sized_by_their_cost():
    hs = SlidingHomeserver(300)
    gave_way = 0

    async def give_way() -> bool:
        nonlocal gave_way
        gave_way += 1
        return False  # no user waited

    walk = sweep.Sweep(hs, first_sync=None)  # type: ignore[arg-type]
    seen = [g.room_id for w in [w async for w in walk.windows(give_way)] for g in w.rooms]
    assert seen == hs.rooms  # each once, most recent first
    steps = [b - a for a, b in zip([-1, *hs.ranges], hs.ranges, strict=False)]
    assert steps[0] == sweep.FIRST_WINDOW and max(steps) <= sweep.WINDOW
    assert gave_way == len(hs.ranges) - 1  # before every window but the first


@pytest.mark.parametrize(
    "status,errcode,message,refused",
    [
        (400, "M_UNKNOWN", "Invalid stream token", True),
        (400, "M_UNKNOWN", "Invalid stream token 's9'", True),
        (400, "M_UNKNOWN", "Something else", False),
        (500, "M_UNKNOWN", "Invalid stream token", False),
        (429, "M_LIMIT_EXCEEDED", None, False),
        (None, None, None, False),
    ],
)
def test_only_synapses_invalid_stream_token_means_the_token_is_refused(
    status, errcode, message, refused
):
    assert sync_token_refused(status, errcode, message) is refused


async def test_during_a_start_a_room_that_shows_up_first_reads_back_before_its_events(monkeypatch):
    monkeypatch.setattr(time, "time", lambda: NOW / 1000)
    reader = ingest(PagedHomeserver(), catchup_hours=1)
    reader.start_without_token("s0")
    first = await reader.updates(sync(join={"!r:x": [text("$1", "live")]}), since="s0")
    assert [(u.kind, u.event_id) for u in first] == [
        ("catchup", "catchup|!r:x|s0"),
        ("message", "$1"),
    ]
    again = await reader.updates(sync(join={"!r:x": [text("$2", "more")]}), since="s1")
    assert ids(again) == ["$2"]  # once a room
    swept = reader.sweep(
        window({"!r:x": [text("$2", "more")], "!other:x": [text("$3", "waiting")]})
    )
    assert [u.room_id for u in swept] == ["!other:x"]  # !r:x is decided already
    reader.swept()
    after = await reader.updates(sync(join={"!new:x": [text("$4", "hi")]}), since="s2")
    assert ids(after) == ["$4"]  # the start is over: nothing more reads back


async def test_a_catch_up_read_pages_back_to_what_was_handled_and_answers_in_order(monkeypatch):
    monkeypatch.setattr(time, "time", lambda: NOW / 1000)
    newest = [text("$4", "four"), text("$3", "three")]  # /messages: newest first
    older = [reply("$1"), text("$2", "two"), text("$1", "one", ts=NOW - 10_000_000)]
    hs = PagedHomeserver(newest, older)
    reader = CatchUpReader(hs, catchup_hours=1)  # type: ignore[arg-type]
    updates = await reader.expand(deferred("!r:x", "s2"))
    assert ids(updates) == ["$2", "$3", "$4"] and all(u.catchup for u in updates)
    assert [start for _, start, _ in hs.asked] == ["s2", "t1"]
    assert await reader.expand(text_update := updates[0]) == [text_update]


async def test_a_catch_up_that_ran_before_leaves_out_what_it_answered_then(monkeypatch):
    monkeypatch.setattr(time, "time", lambda: NOW / 1000)
    hs = PagedHomeserver(
        [text("$3", "three"), text("$2", "two")], since=[reply("$2")]
    )  # answered by the run a kill -9 ended
    updates = await CatchUpReader(hs, 1).expand(  # type: ignore[arg-type]
        replace(deferred("!r:x", "s2"), replayed=True)
    )
    assert ids(updates) == ["$3"] and not updates[0].may_be_answered  # asked once, above
