"""The healing I/O shell against a fake homeserver: concurrent heals of one room share one
state fetch (single-flight); and what the healer reads of sync, through ``Homeserver``: with
members loaded lazily, a Space's owner comes from the marker sync shows."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
import structlog
from nio import AsyncClient, MatrixRoom, SyncResponse

from adapter.matrix.healing.healer import Healer
from adapter.matrix.healing.room_state import HealRefused
from adapter.matrix.homeserver.client import Homeserver, SyncedRoom
from adapter.matrix.observe.metrics import Metrics
from adapter.matrix.store.records import MatrixStore, RoomMeta
from adapter.matrix.vocabulary.markers import ChatMarker, SpaceMarker
from core.chat import ChatManager

BOT, ALICE, BOB = "@lambda:x", "@alice:x", "@bob:x"
SPACE, ROOM, BOB_SPACE = "!space:x", "!room:x", "!bobspace:x"
CALLERS = 20


def ev(type_: str, content: dict, sender: str = BOT, state_key: str = "") -> dict:
    return {
        "type": type_,
        "state_key": state_key,
        "sender": sender,
        "content": content,
        "origin_server_ts": 1_000,
        "event_id": f"${type_}{state_key}",
    }


def chat_room_state() -> list[dict]:
    """A chat room the bot made, with its marker, in Alice's Space."""
    return [
        ev("m.room.create", {"room_version": "12"}),
        ev("m.room.member", {"membership": "join"}, state_key=BOT),
        ev("m.room.member", {"membership": "join"}, sender=ALICE, state_key=ALICE),
        ev("m.room.name", {"name": "Trip"}, sender=ALICE),
        ev("m.space.parent", {"via": ["x"]}, state_key=SPACE),
        ev(ChatMarker.TYPE, ChatMarker(ALICE, "c1", "active").content()),
    ]


class CountingHomeserver:
    """Only what the healer calls. A state fetch is counted, then held until ``release``."""

    bot_id = BOT

    def __init__(self, state: list[dict]) -> None:
        self.state = state
        self.fetches = 0
        self.fetched = asyncio.Event()
        self.release = asyncio.Event()

    async def get_state(self, room_id: str) -> list[dict]:
        self.fetches += 1
        self.fetched.set()
        await self.release.wait()
        return self.state


@dataclass(frozen=True)
class HealerServices:
    """The part of ``Services`` the healer uses."""

    hs: CountingHomeserver
    store: MatrixStore
    chats: ChatManager
    metrics: Metrics = field(default_factory=Metrics)

    @property
    def bot_id(self) -> str:
        return self.hs.bot_id


async def test_concurrent_heals_of_one_room_share_one_state_fetch(store):
    hs = CountingHomeserver(chat_room_state())
    healer = Healer(HealerServices(hs, MatrixStore(store), ChatManager(store)))  # type: ignore
    callers = [asyncio.create_task(healer.heal_room(ROOM)) for _ in range(CALLERS)]
    await asyncio.wait_for(hs.fetched.wait(), 5)
    hs.release.set()
    plans = await asyncio.gather(*callers)
    assert hs.fetches == 1
    assert len(plans) == CALLERS and all(plan == plans[0] for plan in plans)
    assert plans[0].room == RoomMeta("chat", ALICE, "c1", SPACE)
    assert await MatrixStore(store).get_room(ROOM) == plans[0].room
    assert (
        healer.svc.metrics.registry.get_sample_value(
            "lambda_heals_total", {"cause": "store_missing", "source": "marker"}
        )
        == 1
    )


def test_synced_room_tells_the_type_and_the_joined_or_invited_members():
    client = AsyncClient("http://x", BOT)
    room = MatrixRoom(SPACE, BOT)
    room.room_type = "m.space"
    room.add_member(BOT, None, None)
    room.add_member(ALICE, None, None, invited=True)
    client.rooms[SPACE] = room
    hs = Homeserver(client, "x")
    assert hs.synced_room(SPACE) == SyncedRoom("m.space", frozenset({BOT, ALICE}))
    assert hs.synced_room(ROOM) is None


def space_state(owner: str, sender: str = BOT) -> list[dict]:
    """A Space the bot made for ``owner``; its marker written by ``sender``."""
    return [
        ev("m.room.create", {"room_version": "12", "type": "m.space"}),
        ev("m.room.member", {"membership": "join"}, state_key=BOT),
        ev("m.room.member", {"membership": "join"}, sender=owner, state_key=owner),
        ev(SpaceMarker.TYPE, SpaceMarker(owner).content(), sender=sender),
    ]


def lazy_sync(state: dict[str, list[dict]], timeline: dict[str, list[dict]]) -> SyncResponse:
    """A sync round as members load lazily: no member events but the timeline senders'."""
    join = {
        room: {
            "state": {"events": [e for e in state.get(room, []) if e["type"] != "m.room.member"]},
            "timeline": {"events": timeline.get(room, []), "limited": True},
        }
        for room in set(state) | set(timeline)
    }
    return SyncResponse.from_dict(
        {"next_batch": "s1", "rooms": {"invite": {}, "leave": {}, "join": join}}
    )


def logged_in(client: AsyncClient) -> AsyncClient:
    client.user_id = BOT  # as a login sets it
    return client


def test_sync_shows_a_spaces_owner_only_by_a_marker_the_bot_wrote():
    hs = Homeserver(logged_in(AsyncClient("http://x", BOT)), "x")
    hs.client.rooms.update({rid: MatrixRoom(rid, BOT) for rid in (SPACE, BOB_SPACE, ROOM)})
    hs.note_sync(
        lazy_sync(
            {SPACE: space_state(ALICE), ROOM: space_state(ALICE, sender=ALICE)},
            {BOB_SPACE: space_state(BOB)[-1:]},
        )
    )

    def space_owner(room_id: str) -> str | None:
        room = hs.synced_room(room_id)
        assert room is not None
        return room.space_owner

    assert [space_owner(rid) for rid in (SPACE, BOB_SPACE, ROOM)] == [ALICE, BOB, None]
    hs.note_sync(lazy_sync({}, {SPACE: [ev(SpaceMarker.TYPE, {})]}))  # redacted: no owner
    assert space_owner(SPACE) is None


class SpacesHomeserver:
    """The bot's joined rooms, as a first sync with lazy members showed them; counts fetches."""

    bot_id = BOT

    def __init__(self, states: dict[str, list[dict]]) -> None:
        self.states = states
        self.fetched: list[str] = []
        self.hs = Homeserver(logged_in(AsyncClient("http://x", BOT)), "x")
        for room_id in states:
            room = MatrixRoom(room_id, BOT)
            room.room_type = "m.space"
            room.add_member(BOT, None, None)  # lazy members: the owner is not among them
            self.hs.client.rooms[room_id] = room
        self.hs.note_sync(lazy_sync(states, {}))

    def synced_room(self, room_id: str) -> SyncedRoom | None:
        return self.hs.synced_room(room_id)

    async def joined_rooms(self) -> list[str]:
        return list(self.states)

    async def get_state(self, room_id: str) -> list[dict]:
        self.fetched.append(room_id)
        return self.states[room_id]


async def test_after_a_total_loss_a_users_space_is_found_with_one_state_fetch(store):
    hs = SpacesHomeserver({BOB_SPACE: space_state(BOB), SPACE: space_state(ALICE)})
    healer = Healer(HealerServices(hs, MatrixStore(store), ChatManager(store)))  # type: ignore
    meta = await healer.user_space(ALICE)
    assert meta is not None and meta.space_id == SPACE
    assert hs.fetched == [SPACE]  # not Bob's Space first, though sync showed no owner member


async def test_a_chat_marker_forged_by_the_owner_is_refused_logged_and_remembered(store):
    state = [
        dict(ev, sender=ALICE) if ev["type"] == ChatMarker.TYPE else ev for ev in chat_room_state()
    ]
    hs = CountingHomeserver(state)
    hs.release.set()
    healer = Healer(HealerServices(hs, MatrixStore(store), ChatManager(store)))  # type: ignore
    with structlog.testing.capture_logs() as logs:
        for _ in range(2):
            with pytest.raises(HealRefused, match="forged_marker"):
                await healer.heal_room(ROOM)
    assert [e["event"] for e in logs] == ["state.heal_refused"]
    assert hs.fetches == 1  # the refusal is remembered: no fetch on the next message
    assert (
        healer.svc.metrics.registry.get_sample_value(
            "lambda_heal_refusals_total", {"reason": "forged_marker"}
        )
        == 1
    )  # counted as logged
    assert await MatrixStore(store).get_room(ROOM) is None


async def test_a_new_users_space_search_fetches_no_space_whose_marker_names_another(store):
    hs = SpacesHomeserver({BOB_SPACE: space_state(BOB), SPACE: space_state(ALICE)})
    healer = Healer(HealerServices(hs, MatrixStore(store), ChatManager(store)))  # type: ignore
    assert await healer.user_space("@carol:x") is None
    assert hs.fetched == []  # after a total loss, inviting the bot costs no walk over Spaces
