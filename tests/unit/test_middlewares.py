"""The plain links of the chain, one by one: each passes the update on or stops it."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest
import structlog

from adapter.matrix.chain.command_table import COMMANDS
from adapter.matrix.chain.context import EventData
from adapter.matrix.chain.middlewares import (
    allowed_users_only,
    answered_once,
    catchup_in_chats_only,
    owner_only,
    resolve_route,
    store_faults,
)
from adapter.matrix.chain.notices import STORE_DOWN
from adapter.matrix.chain.router import ChatRoute, LobbyRoute, Route, SpaceRoute, Unregistered
from adapter.matrix.homeserver.client import HomeserverError
from adapter.matrix.ingest.update import RetryLater, Update
from adapter.matrix.store.records import RoomMeta
from core.store.sqlite import refusals
from tests.unit.fakes import (
    ALICE,
    CHAT,
    LOBBY,
    MALLORY,
    SPACE,
    FakeHomeserver,
    make_services,
    message,
    onboard,
)

FOREIGN = "@eve:elsewhere"
CHAT_ROUTE = ChatRoute(CHAT, RoomMeta("chat", ALICE, "c1", SPACE))


class Next:
    """The rest of the chain: records what reached it."""

    def __init__(self) -> None:
        self.seen: list[tuple[Update, EventData]] = []

    async def __call__(self, update: Update, data: EventData) -> None:
        self.seen.append((update, data))


@pytest.fixture
def svc(store):
    return make_services(store)


async def test_allowed_users_pass(svc):
    rest = Next()
    await allowed_users_only(rest, message(CHAT, "hi"), EventData(services=svc))
    assert len(rest.seen) == 1


async def test_a_foreign_message_is_dropped_unread(svc):
    rest = Next()
    with structlog.testing.capture_logs() as logs:
        await allowed_users_only(rest, message(CHAT, "hi", FOREIGN), EventData(services=svc))
    assert rest.seen == [] and svc.hs.calls == [] and svc.hs.sent == []
    assert [(e["event"], e["reason"]) for e in logs] == [("event.ignored", "not_allowed")]


async def test_a_foreign_invite_is_rejected_before_anything_is_created(svc):
    rest = Next()
    with structlog.testing.capture_logs() as logs:
        await allowed_users_only(
            rest, message("!new:x", "", FOREIGN, kind="invite"), EventData(services=svc)
        )
    assert rest.seen == [] and svc.hs.calls == [("leave", "!new:x")]
    assert [e["event"] for e in logs] == ["invite.refused"]


async def test_rejecting_a_foreign_invite_is_retried_only_when_the_failure_is_transient(store):
    hs = FakeHomeserver()
    svc = make_services(store, hs)
    invite = message("!new:x", "", FOREIGN, kind="invite")
    hs.fail["leave"] = HomeserverError("leave", "unreachable", "")
    with pytest.raises(RetryLater):
        await allowed_users_only(Next(), invite, EventData(services=svc))
    hs.fail["leave"] = HomeserverError("leave", "M_FORBIDDEN", "no", http_status=403)
    with structlog.testing.capture_logs() as logs:
        await allowed_users_only(Next(), invite, EventData(services=svc))
    assert "invite.reject_failed" in [e["event"] for e in logs]


async def test_resolve_route_sets_the_route_and_parses_commands_only(svc):
    await onboard(svc)
    rest = Next()
    await resolve_route(rest, message(CHAT, "!Rename  Trip "), EventData(services=svc))
    await resolve_route(rest, message(LOBBY, "just text"), EventData(services=svc))
    await resolve_route(rest, message("!unknown:x", "!help"), EventData(services=svc))
    (_, in_chat), (_, in_lobby), (_, unknown) = rest.seen
    assert in_chat["route"] == CHAT_ROUTE
    command = in_chat["command"]
    assert command is not None
    assert (command.name, command.args) == ("rename", "Trip")
    assert command.spec is COMMANDS["rename"]
    assert in_lobby["route"] == LobbyRoute(LOBBY, ALICE) and in_lobby["command"] is None
    assert unknown["route"] == Unregistered("!unknown:x")


@pytest.mark.parametrize(
    "route,sender,kind,passes",
    [
        (CHAT_ROUTE, ALICE, "message", True),
        (CHAT_ROUTE, MALLORY, "message", False),
        (CHAT_ROUTE, MALLORY, "room_name", False),
        (LobbyRoute(LOBBY, ALICE), ALICE, "message", True),
        (LobbyRoute(LOBBY, ALICE), MALLORY, "message", False),
        (SpaceRoute(SPACE, ALICE), ALICE, "message", False),
        (SpaceRoute(SPACE, ALICE), ALICE, "invite", True),
        (CHAT_ROUTE, MALLORY, "invite", True),  # an invite is judged by who sent it, later
        (Unregistered("!r:x"), MALLORY, "message", True),  # unhealable: refused by healing
    ],
)
async def test_owner_only(svc, route: Route, sender, kind, passes):
    rest = Next()
    with structlog.testing.capture_logs() as logs:
        await owner_only(
            rest,
            message(route.room_id, "hi", sender, kind=kind),
            EventData(services=svc, route=route),
        )
    assert bool(rest.seen) is passes
    if not passes:
        assert [e["event"] for e in logs] == ["event.ignored"]
        assert logs[0]["reason"] in ("not_owner", "space_room")


@pytest.mark.parametrize(
    "route,catchup,passes",
    [
        (CHAT_ROUTE, True, True),
        (CHAT_ROUTE, False, True),
        (LobbyRoute(LOBBY, ALICE), True, False),
        (LobbyRoute(LOBBY, ALICE), False, True),
    ],
)
async def test_catchup_is_answered_in_chat_rooms_only(svc, route, catchup, passes):
    rest = Next()
    await catchup_in_chats_only(
        rest, message(route.room_id, "hi", catchup=catchup), EventData(services=svc, route=route)
    )
    assert bool(rest.seen) is passes


async def test_a_write_the_db_refuses_is_retried_and_makes_the_bot_unhealthy(svc):
    async def refused(update: Update, data: EventData) -> None:
        with refusals(Path("t.db")):
            raise sqlite3.OperationalError("database or disk is full")

    await onboard(svc)
    svc.health.synced()
    update = message(CHAT, "hi")
    with structlog.testing.capture_logs() as logs, pytest.raises(RetryLater):
        await store_faults(refused, update, EventData(services=svc, route=CHAT_ROUTE))
    assert [e["event"] for e in logs] == ["store.write_failed"]
    assert svc.hs.bodies == [STORE_DOWN]  # the owner is told
    [problem] = svc.health.report().problems
    assert problem.reason == "store_refuses_writes" and "disk is full" in problem.detail


async def test_a_replayed_message_the_room_shows_answered_is_done_without_running_again(svc):
    replayed = replace(message(CHAT, "hi", event_id="$q"), replayed=True)
    await svc.reply(replayed, "Echo: hi", notice=False)  # a run that a kill -9 then ended
    rest = Next()
    with structlog.testing.capture_logs() as logs:
        await answered_once(rest, replayed, EventData(services=svc))
    assert rest.seen == [] and [e["event"] for e in logs] == ["event.already_answered"]


async def test_a_promise_to_answer_is_no_answer_and_a_first_attempt_is_not_looked_up(svc):
    retried = message(CHAT, "hi", event_id="$q", attempt=1)
    await svc.try_reply(retried, "I'll retry", part="retry-notice", provisional=True)
    rest = Next()
    await answered_once(rest, retried, EventData(services=svc))
    fresh = message(CHAT, "new", event_id="$n")
    await answered_once(rest, fresh, EventData(services=svc))
    assert [u.event_id for u, _ in rest.seen] == ["$q", "$n"]
    assert [c for c in svc.hs.calls if c[0] == "messages_after"] == [
        ("messages_after", CHAT, "$q")
    ]  # only the retried one asked the room


async def test_a_room_that_cannot_be_asked_now_retries_the_update_later(svc):
    svc.hs.fail["messages_after"] = HomeserverError("read", "M_UNKNOWN", "down", None, 502)
    with pytest.raises(RetryLater):
        await answered_once(
            Next(), replace(message(CHAT, "hi"), replayed=True), EventData(services=svc)
        )
