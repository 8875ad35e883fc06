"""tools/doctor.py against a real bot and homeserver (SPEC §9): what it foretells of each
heal, what it flags as not healing by itself, and when it cannot run."""

from __future__ import annotations

import json
import socket
from dataclasses import replace
from pathlib import Path

import pytest
from nio import AsyncClient, RoomLeaveResponse

from adapter.matrix.config import Config
from adapter.matrix.handlers.chat_rooms import linked_rooms
from adapter.matrix.homeserver.session import Session, load_session, save_session
from adapter.matrix.store.records import MatrixStore
from core.chat import ChatManager
from core.store import SQLiteStore
from tests.integration.conftest import BACKENDS, doctor_tool, reset_tool


async def diagnose(config: Config) -> tuple[int, dict, dict[str | None, dict]]:
    """The doctor's exit code, its JSON report, and the report's rooms by room id."""
    code, out, err = await doctor_tool(config, "--json")
    assert code in (0, 1), err
    report = json.loads(out)
    return code, report, {room["room_id"]: room for room in report["rooms"]}


def states(rooms: dict[str | None, dict]) -> dict[str | None, tuple[str, str]]:
    return {room_id: (room["kind"], room["state"]) for room_id, room in rooms.items()}


async def ask_and_heal(bot, user, room_id: str, text: str) -> str:
    """Send a message in a room the DB lost; the cause its heal logged."""
    await user.ask(room_id, bot.user_id, text, f"Echo: {text}")
    return bot.logs.named("state.healed", room_id=room_id)[-1]["cause"]


@pytest.mark.warnings_expected("the heal after a partial loss logs cause=inconsistent")
@pytest.mark.parametrize("backend", BACKENDS)
async def test_the_doctor_foretells_each_heal_and_the_cause_it_logs(bot, make_user):
    alice = await make_user("alice")
    lobby, space, chat = await alice.onboard(bot.user_id)
    # While the bot runs, and holds the DB's lock.
    code, report, rooms = await diagnose(bot.config)
    assert code == 0 and report["consistent"], report
    assert states(rooms) == {space: ("space", "ok"), lobby: ("lobby", "ok"), chat: ("chat", "ok")}
    assert {r["owner"] for r in rooms.values()} == {alice.user_id}
    assert report["birth"]["cause"] == "store_missing"
    assert report["inbox"] == {"pending": 0, "oldest_s": None}

    await bot.restart_losing("chat")
    code, report, rooms = await diagnose(bot.config)
    assert code == 0 and not report["consistent"]
    assert rooms[chat]["state"] == "missing_locally"
    assert "no chat record" in rooms[chat]["detail"]
    assert "cause=inconsistent" in rooms[chat]["detail"]
    assert rooms[space]["state"] == rooms[lobby]["state"] == "ok"
    assert await ask_and_heal(bot, alice, chat, "after a partial loss") == "inconsistent"

    for loss, cause in (("everything", "store_missing"), ("reset", "local_reset")):
        if loss == "reset":
            await bot.stop()
            assert (await reset_tool(bot.config, "--yes"))[0] == 0
            await bot.start()
        else:
            await bot.restart_losing(loss)
        code, report, rooms = await diagnose(bot.config)
        assert code == 0 and report["birth"]["cause"] == cause, report
        assert states(rooms) == {
            space: ("space", "missing_locally"),
            lobby: ("lobby", "missing_locally"),
            chat: ("chat", "missing_locally"),
        }
        assert all(f"cause={cause}" in r["detail"] for r in rooms.values())
        assert await ask_and_heal(bot, alice, chat, f"after {loss}") == cause


async def test_the_doctor_flags_what_will_not_heal_but_not_a_rename_still_to_sync(bot, make_user):
    alice = await make_user("alice")
    lobby, space, chat = await alice.onboard(bot.user_id)
    created = await alice.ask(chat, bot.user_id, "!new Notes", "Created")
    [notes] = linked_rooms(created["content"]["body"])
    await alice.wait_for(lambda: notes in alice.invites)
    await alice.join(notes)
    await bot.stop()
    await _forge_title(bot.config, chat, alice.user_id, "Forged")
    await alice.client.room_put_state(notes, "m.room.name", {"name": "Renamed"})
    await _leave_behind_the_dbs_back(bot.config, lobby)

    code, report, rooms = await diagnose(bot.config)
    assert code == 1 and not report["consistent"]
    assert rooms[space]["state"] == "ok"
    assert rooms[chat]["state"] == "mismatch"
    assert "title: local “Forged”, server “Chat 1”" in rooms[chat]["detail"]
    assert rooms[lobby]["state"] == "stale_locally"
    assert rooms[notes]["state"] == "mismatch"
    assert "follows on its next" in rooms[notes]["detail"]

    await bot.start()
    await bot.logs.wait_for("chat.renamed", room_id=notes)
    code, report, rooms = await diagnose(bot.config)
    assert code == 1 and rooms[notes]["state"] == "ok"
    assert {rooms[chat]["state"], rooms[lobby]["state"]} == {"mismatch", "stale_locally"}


async def _forge_title(config: Config, room_id: str, owner: str, title: str) -> None:
    """Change a chat's title in the DB only, as a bug would."""
    store = await SQLiteStore.open(config.db_path)
    try:
        meta = await MatrixStore(store).get_room(room_id)
        assert meta is not None and meta.chat_id is not None
        await ChatManager(store).rename(owner, meta.chat_id, title)
    finally:
        await store.close()


async def _leave_behind_the_dbs_back(config: Config, room_id: str) -> None:
    """The bot leaves a room with its saved session (no login: no new device)."""
    session = load_session(config)
    assert session is not None
    client = AsyncClient(config.homeserver, config.user_id)
    client.restore_login(session.user_id, session.device_id, session.access_token)
    try:
        assert isinstance(await client.room_leave(room_id), RoomLeaveResponse)
    finally:
        await client.close()


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


async def test_the_doctor_cannot_run_without_its_environment_a_db_a_session_or_a_homeserver(
    bot_config: Config,
):
    code, _, err = await doctor_tool(bot_config, "--no-such-flag")
    assert code == 2
    code, _, err = await doctor_tool(bot_config, MATRIX_HOMESERVER="")
    assert code == 2 and "MATRIX_HOMESERVER is required" in err

    folder = bot_config.db_path.parent
    code, _, err = await doctor_tool(bot_config)
    assert code == 2 and "there is no database at LAMBDA_MATRIX_DB" in err
    assert not list(folder.glob(bot_config.db_path.name + "*"))  # it created nothing

    await (await SQLiteStore.open(bot_config.db_path)).close()
    before = files(folder)
    code, _, err = await doctor_tool(bot_config)
    assert code == 2 and "no saved bot session" in err and "never logs in" in err

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    nowhere = replace(bot_config, homeserver=closed)
    save_session(nowhere, Session(closed, nowhere.user_id, "DEV", "token"))
    code, _, err = await doctor_tool(nowhere)
    assert code == 2 and "the homeserver did not answer" in err
    assert files(folder) == before  # the DB read, nothing written beside it
