"""The command handlers over a healed context, against a homeserver that records its calls:
validation, write-through order, confirmation (and its expiry), titles and the listing."""

from __future__ import annotations

import time

import pytest

from adapter.matrix.chain.access import Access
from adapter.matrix.chain.command_table import COMMANDS, UNKNOWN
from adapter.matrix.handlers.chat_rooms import matrix_to
from adapter.matrix.handlers.commands import CONFIRM_TTL_S, NO_SPACE, RUNS, handle_command
from adapter.matrix.homeserver.client import HomeserverError
from adapter.matrix.store.records import Pending, RoomMeta
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

EXPIRED = "That confirmation has expired. Send !archive again."
REFUSED = HomeserverError("put state", "M_FORBIDDEN", "no", http_status=403)


@pytest.fixture
def hs():
    return FakeHomeserver()


@pytest.fixture
async def svc(store, hs):
    svc = make_services(store, hs)
    await onboard(svc)
    return svc


async def send(svc, room_id: str, body: str) -> str:
    """Run a command as the chain would, and return the one answer."""
    update = message(room_id, body, event_id=f"$ev{len(svc.hs.sent)}")
    before = len(svc.hs.sent)
    await handle_command(update, await healed_data(svc, update))
    [answer] = svc.hs.bodies[before:]
    return answer


def test_every_command_of_the_table_has_a_run():
    assert set(RUNS) == set(COMMANDS) | {UNKNOWN.name}


async def test_help_lists_every_command_and_an_unknown_one_gets_a_hint(svc):
    listing = await send(svc, LOBBY, "!help")
    assert all(spec.usage in listing for spec in COMMANDS.values())
    assert await send(svc, LOBBY, "!dance") == (
        "Unknown command !dance. Send !help to see what I can do."
    )


@pytest.mark.parametrize("command", ["rename x", "archive", "confirm"])
async def test_chat_commands_in_the_lobby_say_where_they_work(svc, command):
    name = command.split()[0]
    assert await send(svc, LOBBY, f"!{command}") == f"!{name} works in a chat room. Send it there."
    assert svc.hs.calls == []


@pytest.mark.parametrize(
    "args,reason",
    [
        ("", "The title cannot be empty."),
        ("   ", "The title cannot be empty."),
        ("x" * 256, "The title is too long (256 characters, the limit is 255)."),
        ("bad\u0007bell", "The title cannot contain control characters"),
    ],
)
async def test_rename_rejects_a_bad_title_and_touches_nothing(svc, args, reason):
    answer = await send(svc, CHAT, f"!rename {args}")
    assert answer.startswith(reason) and answer.endswith("Usage: !rename <title>")
    assert svc.hs.calls == []
    assert (await svc.chats.get(ALICE, "c1")).title == "Chat 1"


async def test_rename_writes_the_homeserver_first_then_the_chat(svc):
    assert await send(svc, CHAT, "!rename  Trip to Lisbon ") == "Renamed to “Trip to Lisbon”."
    assert svc.hs.calls == [
        ("set_name", CHAT, "Trip to Lisbon"),
        ("set_chat_marker", CHAT, ALICE, "c1", "active"),
    ]
    assert (await svc.chats.get(ALICE, "c1")).title == "Trip to Lisbon"


async def test_a_rename_the_homeserver_refuses_keeps_the_old_title(svc, hs):
    hs.fail["set_chat_marker"] = REFUSED
    with pytest.raises(HomeserverError):
        await send(svc, CHAT, "!rename Trip")
    assert (await svc.chats.get(ALICE, "c1")).title == "Chat 1"


async def test_archive_asks_for_confirmation_for_five_minutes(svc):
    before = time.time()
    answer = await send(svc, CHAT, "!archive")
    assert answer == "Archive “Chat 1”? Send !confirm within 5 minutes, or !cancel to keep it."
    pending = await svc.store.get_pending(CHAT)
    assert pending.action == "archive" and pending.chat_id == "c1"
    assert before + CONFIRM_TTL_S <= pending.expires_at <= time.time() + CONFIRM_TTL_S
    assert svc.hs.calls == [] and (await svc.chats.get(ALICE, "c1")).status == "active"


async def test_confirm_archives_on_the_homeserver_first_then_locally(svc):
    await send(svc, CHAT, "!archive")
    answer = await send(svc, CHAT, "!confirm")
    assert answer == "Archived “Chat 1”. Send !new to start a new chat."
    assert svc.hs.calls == [
        ("set_chat_marker", CHAT, ALICE, "c1", "archived"),
        ("unlink_child", SPACE, CHAT),
    ]
    assert (await svc.chats.get(ALICE, "c1")).status == "archived"
    assert await svc.store.get_pending(CHAT) is None
    assert await send(svc, CHAT, "!archive") == (
        "This chat is already archived. Send !new to start another."
    )


@pytest.mark.parametrize(
    "after_s,archived",
    [(CONFIRM_TTL_S - 1, True), (CONFIRM_TTL_S, False), (CONFIRM_TTL_S + 3600, False)],
)
async def test_a_confirmation_expires_after_five_minutes(svc, monkeypatch, after_s, archived):
    await send(svc, CHAT, "!archive")
    later = time.time() + after_s
    monkeypatch.setattr(time, "time", lambda: later)
    answer = await send(svc, CHAT, "!confirm")
    assert (await svc.chats.get(ALICE, "c1")).status == ("archived" if archived else "active")
    assert await svc.store.get_pending(CHAT) is None
    if not archived:
        assert answer == EXPIRED
        assert svc.hs.calls == []


async def test_a_confirmation_for_another_chat_of_the_room_counts_as_expired(svc):
    await svc.store.set_pending(CHAT, Pending("archive", "other", time.time() + 60))
    assert await send(svc, CHAT, "!confirm") == EXPIRED
    assert svc.hs.calls == [] and await svc.store.get_pending(CHAT) is None


async def test_confirm_with_nothing_pending_says_a_reset_clears_confirmations(svc):
    answer = await send(svc, CHAT, "!confirm")
    assert answer.startswith("There is nothing to confirm here.")
    assert "reset database clears them" in answer and svc.hs.calls == []


async def test_a_failed_confirm_stays_pending_so_it_can_be_sent_again(svc, hs):
    await send(svc, CHAT, "!archive")
    hs.fail["unlink_child"] = HomeserverError("put state", "unreachable", "")
    with pytest.raises(HomeserverError):
        await send(svc, CHAT, "!confirm")
    assert await svc.store.get_pending(CHAT) is not None
    assert (await svc.chats.get(ALICE, "c1")).status == "active"
    del hs.fail["unlink_child"]
    assert (await send(svc, CHAT, "!confirm")).startswith("Archived")


async def test_cancel_drops_the_pending_archive(svc):
    assert await send(svc, CHAT, "!cancel") == "There is nothing to cancel here."
    await send(svc, CHAT, "!archive")
    assert await send(svc, CHAT, "!cancel") == "Cancelled. The chat stays as it is."
    assert await svc.store.get_pending(CHAT) is None
    assert (await send(svc, CHAT, "!confirm")).startswith("There is nothing to confirm")
    assert (await svc.chats.get(ALICE, "c1")).status == "active"


async def test_new_titles_a_chat_after_how_many_there_were_archived_included(svc):
    await svc.chats.get_or_create(ALICE, "c2", "Old")
    await svc.chats.archive(ALICE, "c2")
    answer = await send(svc, LOBBY, "!new")
    [(name, owner, space, chat_id, title), link] = svc.hs.calls
    assert (name, owner, space, title) == ("create_chat_room", ALICE, SPACE, "Chat 3")
    assert link == ("link_child", SPACE, "!room1:x")
    assert answer == f"Created “Chat 3”: {matrix_to('!room1:x', 'x')}"
    assert (await svc.chats.get(ALICE, chat_id)).title == "Chat 3"
    assert await svc.store.get_room("!room1:x") == RoomMeta("chat", ALICE, chat_id, SPACE)


async def test_new_with_a_title_escapes_it_in_html(svc, hs):
    assert await send(svc, LOBBY, "!new Fish & <chips>") == (
        f"Created “Fish & <chips>”: {matrix_to('!room1:x', 'x')}"
    )
    assert hs.sent[-1].html == (
        f'Created <a href="{matrix_to("!room1:x", "x")}">Fish &amp; &lt;chips&gt;</a>.'
    )


async def test_new_rejects_a_bad_title_and_creates_nothing(svc):
    answer = await send(svc, LOBBY, "!new " + "x" * 256)
    assert answer.startswith("The title is too long") and answer.endswith("Usage: !new [title]")
    assert svc.hs.calls == []


async def test_new_without_a_space_says_so(store, hs):
    svc = make_services(store, hs)
    await svc.store.set_room(LOBBY, RoomMeta("lobby", ALICE))
    assert await send(svc, LOBBY, "!new") == NO_SPACE
    assert await send(svc, LOBBY, "!chats") == NO_SPACE
    assert hs.calls == []


async def test_new_over_the_chat_limit_is_refused_with_a_clear_message(store, hs):
    svc = make_services(store, hs, access=Access(("@*:x",), max_chats=1))
    await onboard(svc)
    assert (await send(svc, LOBBY, "!new")).startswith("You have 1 active chats, the most")
    assert hs.calls == []


async def test_chats_lists_active_chats_with_links_marks_this_one_and_counts_archived(svc, hs):
    await svc.chats.get_or_create(ALICE, "c2", "Fish & <chips>")
    await svc.store.set_room("!chat2:x", RoomMeta("chat", ALICE, "c2", SPACE))
    await svc.chats.get_or_create(ALICE, "c3", "Gone")
    await svc.chats.archive(ALICE, "c3")
    await svc.store.set_room("!chat3:x", RoomMeta("chat", ALICE, "c3", SPACE))
    await svc.chats.get_or_create(ALICE, "c4", "No room")  # no room record: not listed
    one, two = matrix_to(CHAT, "x"), matrix_to("!chat2:x", "x")
    assert one == "https://matrix.to/#/%21chat1%3Ax?via=x"
    assert await send(svc, CHAT, "!chats") == (
        f"Your chats:\n• Chat 1 — {one} (this chat)\n• Fish & <chips> — {two}\n1 archived."
    )
    assert hs.sent[-1].html == (
        f'<p>Your chats:</p><ul><li><a href="{one}">Chat 1</a> <b>(this chat)</b></li>'
        f'<li><a href="{two}">Fish &amp; &lt;chips&gt;</a></li></ul><p>1 archived.</p>'
    )
    assert "(this chat)" not in await send(svc, LOBBY, "!chats")


async def test_chats_with_no_active_chat_says_how_many_are_archived(svc):
    await svc.chats.archive(ALICE, "c1")
    assert await send(svc, LOBBY, "!chats") == (
        "You have no active chats (1 archived). Send !new to start one."
    )
