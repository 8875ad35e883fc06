"""Router, command parsing and the middleware chain's shape."""

from __future__ import annotations

import pytest
import structlog

from adapter.matrix.chain.command_table import COMMANDS, UNKNOWN, parse_command
from adapter.matrix.chain.dispatcher import CRASHED, Dispatcher, build_chain
from adapter.matrix.chain.router import ChatRoute, LobbyRoute, RoomRouter, SpaceRoute, Unregistered
from adapter.matrix.ingest.update import Update
from adapter.matrix.store.records import MatrixStore, RoomMeta


@pytest.fixture
def mstore(store):
    return MatrixStore(store)


async def test_router_resolves_each_kind_and_falls_back_to_unregistered(mstore):
    await mstore.set_room("!c:x", RoomMeta("chat", "@a:x", "c1", "!s:x"))
    await mstore.set_room("!l:x", RoomMeta("lobby", "@a:x"))
    await mstore.set_room("!s:x", RoomMeta("space", "@a:x"))
    router = RoomRouter(mstore)
    assert await router.resolve("!c:x") == ChatRoute("!c:x", RoomMeta("chat", "@a:x", "c1", "!s:x"))
    assert await router.resolve("!l:x") == LobbyRoute("!l:x", "@a:x")
    assert await router.resolve("!s:x") == SpaceRoute("!s:x", "@a:x")
    route = await router.resolve("!nope:x")
    assert route == Unregistered("!nope:x") and str(route) == "unregistered:!nope:x"


@pytest.mark.parametrize(
    "body,name,args",
    [
        ("!rename  New title ", "rename", "New title"),
        ("!NEW", "new", ""),
        ("  !chats", "chats", ""),
    ],
)
def test_parse_command(body, name, args):
    cmd = parse_command(body)
    assert (cmd.name, cmd.args, cmd.spec) == (name, args, COMMANDS[name])


def test_unknown_command_gets_the_unknown_spec():
    assert parse_command("!dance now").spec is UNKNOWN


def test_commands_needing_the_space_are_declared():
    assert {n for n, s in COMMANDS.items() if s.needs_space} == {"new", "chats"}
    assert {n for n, s in COMMANDS.items() if s.lists_space} == {"chats"}


async def test_chain_runs_middlewares_in_order_and_can_short_circuit():
    seen: list[str] = []

    def link(name, stop=False):
        async def middleware(handler, update, data):
            seen.append(name)
            if not stop:
                await handler(update, data)

        return middleware

    async def handler(update, data):
        seen.append("handler")

    update = Update("message", "!r:x", "@a:x", "$ev", "hello")
    await build_chain([link("a"), link("b")], handler)(update, {})
    assert seen == ["a", "b", "handler"]
    seen.clear()
    await build_chain([link("a", stop=True), link("b")], handler)(update, {})
    assert seen == ["a"]


class RecordingServices:
    """Only what the dispatcher touches when a handler crashes: the reply."""

    def __init__(self) -> None:
        self.replies: list[str] = []

    async def try_reply(self, update, body, **_):
        self.replies.append(body)


async def test_a_crashing_handler_is_logged_and_the_sender_told():
    async def broken(update, data):
        raise KeyError("bug")

    services = RecordingServices()
    # a duck-typed fake of Services: only try_reply
    dispatcher = Dispatcher([], broken, {"services": services})  # type: ignore[typeddict-item]
    update = Update("message", "!r:x", "@a:x", "$ev", "hello")
    with structlog.testing.capture_logs() as logs:
        await dispatcher.feed(update)
    assert [e["event"] for e in logs] == ["event.handler_crashed"]
    assert services.replies == [CRASHED]


def test_any_whitespace_ends_a_command_name():
    assert parse_command("!rename\tTrip").name == "rename"
    assert parse_command("!rename\nTrip").args == "Trip"
