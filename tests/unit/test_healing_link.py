"""The healing link decides when to heal (SPEC §6): an unknown room, a room record without
its chat, and the sender's Space for what needs it; the healer (a fake here) does the rest."""

from __future__ import annotations

import pytest

from adapter.matrix.chain.context import EventData, Services
from adapter.matrix.chain.dispatcher import build_chain
from adapter.matrix.chain.healing import FAILURE_NOTICE, HealingMiddleware
from adapter.matrix.chain.middlewares import resolve_route
from adapter.matrix.chain.router import ChatRoute
from adapter.matrix.healing.room_state import HealPlan, HealRefused
from adapter.matrix.homeserver.client import HomeserverError
from adapter.matrix.ingest.update import RetryLater, Update
from adapter.matrix.store.records import RoomMeta, UserMeta
from core.chat import Chat
from tests.unit.fakes import (
    ALICE,
    CHAT,
    LOBBY,
    MALLORY,
    SPACE,
    make_services,
    message,
    onboard,
)

NEW_ROOM = "!invited-into:x"


class FakeHealer:
    """Records what the link asks for. A room heals to the records in ``plans`` (what its
    state would imply); ``refuse`` and ``fail`` make a heal refuse or fail."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc
        self.asked: list[tuple[str, str]] = []
        self.plans: dict[str, HealPlan] = {}
        self.refuse: HealRefused | None = None
        self.fail: HomeserverError | None = None

    async def heal_room(self, room_id: str) -> HealPlan:
        self.asked.append(("heal_room", room_id))
        if self.fail is not None:
            raise self.fail
        if self.refuse is not None:
            raise self.refuse
        plan = self.plans[room_id]
        async with self.svc.store.transaction() as tx:
            await self.svc.store.set_room(room_id, plan.room, tx)
            if plan.chat is not None:
                self.svc.chats.restore(plan.chat, tx)
        return plan

    async def user_space(self, user_id: str) -> UserMeta | None:
        self.asked.append(("user_space", user_id))
        return await self.svc.store.get_user(user_id)

    async def heal_space_children(self, space_id: str) -> None:
        self.asked.append(("heal_space_children", space_id))


class Link:
    """``resolve_route``, then the healing link, in front of a handler that records its data."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc
        self.healer = FakeHealer(svc)
        self.handled: list[EventData] = []

        async def record(update: Update, data: EventData) -> None:
            self.handled.append(data)

        middleware = HealingMiddleware(self.healer)  # type: ignore[arg-type]
        self._chain = build_chain([resolve_route, middleware], record)

    async def feed(self, update: Update) -> None:
        await self._chain(update, EventData(services=self.svc))


@pytest.fixture
def svc(store):
    return make_services(store)


@pytest.fixture
def link(svc):
    return Link(svc)


def chat_plan(room_id: str = CHAT, chat_id: str = "c1") -> HealPlan:
    return HealPlan(
        room_id,
        RoomMeta("chat", ALICE, chat_id, SPACE),
        "marker",
        chat=Chat(chat_id, ALICE, "Chat 1", "active", 1_700_000_000.0),
    )


async def test_complete_records_are_not_healed(svc, link):
    chat = await onboard(svc)
    await link.feed(message(CHAT, "hi"))
    assert link.healer.asked == []
    [data] = link.handled
    assert data["chat"] == chat and isinstance(data["route"], ChatRoute)


async def test_an_unknown_room_is_healed_then_routed_again(svc, link):
    link.healer.plans[CHAT] = chat_plan()
    await link.feed(message(CHAT, "hi"))
    assert link.healer.asked == [("heal_room", CHAT)]
    [data] = link.handled
    assert data["route"] == ChatRoute(CHAT, chat_plan().room) and data["chat"].chat_id == "c1"


async def test_a_room_record_without_its_chat_heals_the_room(svc, link):
    await svc.store.set_room(CHAT, chat_plan().room)  # the chat record is lost
    link.healer.plans[CHAT] = chat_plan()
    await link.feed(message(CHAT, "hi"))
    assert link.healer.asked == [("heal_room", CHAT)]
    assert link.handled[0]["chat"] == chat_plan().chat


async def test_a_chat_record_the_server_does_not_confirm_refuses_the_room(svc, link):
    await svc.store.set_room(CHAT, chat_plan().room)
    link.healer.plans[CHAT] = HealPlan(CHAT, RoomMeta("chat", ALICE, "c1", SPACE), "marker")
    await link.feed(message(CHAT, "hi"))
    assert link.handled == []
    assert svc.hs.bodies == [HealRefused("unknown_room").user_message]


@pytest.mark.parametrize(
    "room,body,asked",
    [
        (CHAT, "hello", []),
        (CHAT, "!rename Trip", []),
        (CHAT, "!new", [("user_space", ALICE)]),
        (CHAT, "!chats", [("user_space", ALICE), ("heal_space_children", SPACE)]),
        (LOBBY, "!chats", [("user_space", ALICE), ("heal_space_children", SPACE)]),
        (LOBBY, "hello", [("user_space", ALICE)]),  # onboarded: its chats are known
    ],
)
async def test_the_space_is_healed_for_what_needs_it(svc, link, room, body, asked):
    await onboard(svc)
    await link.feed(message(room, body))
    assert link.healer.asked == asked
    assert link.handled[0].get("user") == (UserMeta(SPACE, LOBBY) if asked else None)


async def test_a_non_owners_command_heals_no_space(svc, link):
    await onboard(svc)
    await link.feed(message(CHAT, "!chats", MALLORY))
    assert link.healer.asked == []
    assert link.handled[0].get("user") is None  # the owner check drops it next


async def test_a_lobby_message_looks_for_the_chats_when_none_is_known(svc, link):
    await svc.store.set_room(LOBBY, RoomMeta("lobby", ALICE))
    await svc.store.set_user(ALICE, UserMeta(SPACE, LOBBY))  # onboarding cut short
    await link.feed(message(LOBBY, "hello"))
    assert link.healer.asked == [("user_space", ALICE), ("heal_space_children", SPACE)]


async def test_an_invite_heals_the_inviters_space_and_its_chats_never_the_room(svc, link):
    await svc.store.set_user(ALICE, UserMeta(SPACE, LOBBY))
    await link.feed(message(NEW_ROOM, "", kind="invite"))
    assert link.healer.asked == [("user_space", ALICE), ("heal_space_children", SPACE)]
    assert link.handled[0]["user"] == UserMeta(SPACE, LOBBY)


async def test_an_invite_from_someone_without_a_space_heals_nothing_more(svc, link):
    await link.feed(message(NEW_ROOM, "", kind="invite"))
    assert link.healer.asked == [("user_space", ALICE)]
    assert link.handled[0]["user"] is None


async def test_a_refused_room_stops_the_update_and_the_user_is_told_once(svc, link):
    link.healer.refuse = HealRefused("shared_room")
    await link.feed(message(CHAT, "hi", event_id="$1"))
    await link.feed(message(CHAT, "hi again", event_id="$2"))
    assert link.handled == []
    assert svc.hs.bodies == [HealRefused("shared_room").user_message]


async def test_a_homeserver_error_postpones_the_update_with_the_lookup_notice(svc, link):
    link.healer.fail = HomeserverError("get state", "unreachable", "")
    with pytest.raises(RetryLater):
        await link.feed(message(CHAT, "hi"))
    with pytest.raises(RetryLater):
        await link.feed(message(CHAT, "hi", attempt=1))
    assert link.handled == [] and svc.hs.bodies == [FAILURE_NOTICE]
