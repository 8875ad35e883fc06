"""The healing I/O shell against a fake homeserver: concurrent heals of one room share one
state fetch (single-flight); and what the healer reads of sync, through ``Homeserver``."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
import structlog
from nio import AsyncClient, MatrixRoom

from adapter.matrix.healing.healer import Healer
from adapter.matrix.transport.homeserver import Homeserver, SyncedRoom
from adapter.matrix.healing.markers import ChatMarker
from adapter.matrix.healing.room_state import HealRefused
from adapter.matrix.observe.metrics import Metrics
from adapter.matrix.store import MatrixStore, RoomMeta
from core.chat import ChatManager

BOT, ALICE = "@lambda:x", "@alice:x"
SPACE, ROOM = "!space:x", "!room:x"
CALLERS = 20


def chat_room_state() -> list[dict]:
    """A chat room the bot made, with its marker, in Alice's Space."""
    def ev(type_: str, content: dict, sender: str = BOT, state_key: str = "") -> dict:
        return {"type": type_, "state_key": state_key, "sender": sender, "content": content,
                "origin_server_ts": 1_000}
    return [ev("m.room.create", {"room_version": "12"}),
            ev("m.room.member", {"membership": "join"}, state_key=BOT),
            ev("m.room.member", {"membership": "join"}, sender=ALICE, state_key=ALICE),
            ev("m.room.name", {"name": "Trip"}, sender=ALICE),
            ev("m.space.parent", {"via": ["x"]}, state_key=SPACE),
            ev(ChatMarker.TYPE, ChatMarker(ALICE, "c1", "active").content())]


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
    assert healer.svc.metrics.registry.get_sample_value(
        "lambda_heals_total", {"cause": "store_missing", "source": "marker"}) == 1


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


async def test_a_chat_marker_forged_by_the_owner_is_refused_logged_and_remembered(store):
    state = [dict(ev, sender=ALICE) if ev["type"] == ChatMarker.TYPE else ev
             for ev in chat_room_state()]
    hs = CountingHomeserver(state)
    hs.release.set()
    healer = Healer(HealerServices(hs, MatrixStore(store), ChatManager(store)))  # type: ignore
    with structlog.testing.capture_logs() as logs:
        for _ in range(2):
            with pytest.raises(HealRefused, match="forged_marker"):
                await healer.heal_room(ROOM)
    assert [e["event"] for e in logs] == ["state.heal_refused"]
    assert hs.fetches == 1  # the refusal is remembered: no fetch on the next message
    assert healer.svc.metrics.registry.get_sample_value(
        "lambda_heal_refusals_total", {"reason": "forged_marker"}) == 1  # counted as logged
    assert await MatrixStore(store).get_room(ROOM) is None
