"""tools/reset_local.py against a real bot and homeserver (SPEC §7)."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

from nio import AsyncClient, RoomCreateResponse, WhoamiError

from core.store import SQLiteStore
from tests.integration.conftest import reset_tool


async def reset(bot, *args: str, stdin: bytes = b"") -> tuple[int, str]:
    return await reset_tool(bot.config, *args, stdin=stdin)


def snapshot(paths: list[Path]) -> dict[str, bytes]:
    files = {}
    for base in paths:
        for path in [base] if base.is_file() else base.rglob("*") if base.exists() else []:
            if path.is_file():
                files[str(path)] = path.read_bytes()
    return files


async def test_refuses_while_the_bot_runs_and_touches_nothing(bot, make_user):
    alice = await make_user("alice")
    await alice.onboard(bot.user_id)
    before = snapshot([bot.config.store_path])
    code, out = await reset(bot, "--yes")
    assert code == 1 and "Stop it first" in out and f"kill -TERM {os.getpid()}" in out
    assert bot.config.db_path.exists() and snapshot([bot.config.store_path]) == before


async def test_dry_run_prints_the_plan_and_changes_nothing(bot, make_user):
    alice = await make_user("alice")
    _, space, chat = await alice.onboard(bot.user_id)
    await bot.stop()
    before = snapshot([bot.config.db_path.parent])
    code, out = await reset(bot, "--dry-run")
    assert code == 0 and "Dry run: nothing was changed." in out
    assert space in out and chat in out and "Chat 1" in out and alice.user_id in out
    assert "matrix_room" in out and "leave these in your Matrix client" in out
    after = snapshot([bot.config.db_path.parent])
    assert {k: v for k, v in after.items() if not k.endswith(".lock")} == {
        k: v for k, v in before.items() if not k.endswith(".lock")
    }


async def test_reset_then_restart_heals_with_cause_local_reset_and_twice_in_a_row(bot, make_user):
    alice = await make_user("alice")
    _, _, chat = await alice.onboard(bot.user_id)
    await bot.stop()
    code, out = await reset(bot, "--yes")
    assert code == 0 and "cause=local_reset" in out
    assert not bot.config.store_path.exists()
    fresh = await SQLiteStore.open(bot.config.db_path)
    assert fresh.birth is not None and fresh.birth.cause == "local_reset"
    assert await fresh.get("reset_marker") is None
    await fresh.close()
    code, _ = await reset(bot, "--yes")
    assert code == 0
    await bot.start()
    await alice.ask(chat, bot.user_id, "after reset", "Echo: after reset")
    healed = bot.logs.named("state.healed", room_id=chat)
    assert healed and healed[0]["cause"] == "local_reset"


async def test_backup_moves_files_into_a_timestamped_folder(bot, tmp_path):
    await bot.stop()
    code, out = await reset(bot, "--yes", "--backup", str(tmp_path / "bk"))
    assert code == 0
    [folder] = list((tmp_path / "bk").iterdir())
    assert (folder / bot.config.db_path.name).exists()
    assert (folder / bot.config.store_path.name / "session.json").exists()


async def test_without_yes_a_no_answer_changes_nothing(bot):
    await bot.stop()
    code, out = await reset(bot, stdin=b"n\n")
    assert code == 1 and "Nothing changed." in out
    assert (bot.config.store_path / "session.json").exists()


async def test_a_foreign_db_is_refused_touching_nothing_and_force_resets_all(bot):
    await bot.stop()
    db, session = bot.config.db_path, bot.config.store_path / "session.json"
    for path in db.parent.glob(db.name + "*"):
        path.unlink()
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE notes (body TEXT)")
    conn.close()
    before = snapshot([db.parent])
    code, out = await reset(bot, "--yes")
    assert code == 1 and "not the bot's: its tables are notes" in out and "--force" in out
    assert snapshot([db.parent]) == before  # the DB, and the session beside it too
    code, out = await reset(bot, "--yes", "--force")
    assert code == 0, out
    assert not session.exists() and not bot.config.store_path.exists()
    fresh = await SQLiteStore.open(db)
    assert fresh.birth is not None
    assert fresh.birth.cause == "local_reset" and await fresh.scan("") == [
        ("birth", {"at": fresh.birth.at, "cause": "local_reset"})
    ]
    await fresh.close()


async def test_only_the_bots_files_leave_the_session_folder_and_the_plan_says_what_stays(bot):
    await bot.stop()
    store = bot.config.store_path
    (store / "homeserver.yaml").write_text("server_name: localhost\n")
    (store / "media_store").mkdir()
    (store / "media_store" / "a.png").write_bytes(b"png")
    code, out = await reset(bot, "--yes")
    assert code == 0, out
    assert sorted(p.name for p in store.iterdir()) == ["homeserver.yaml", "media_store"]
    assert (store / "media_store" / "a.png").read_bytes() == b"png"
    assert f"delete {store / 'session.json'}" in out
    assert f"leave  {store / 'homeserver.yaml'}: not written by the bot" in out
    assert f"leave  {store / 'media_store'}: not written by the bot" in out
    assert f"leave  {store}: the folder still holds 2 entries not the bot's" in out


async def test_server_mode_empties_every_room_the_bot_created_markers_or_not(bot, make_user):
    alice = await make_user("alice")
    lobby, space, chat = await alice.onboard(bot.user_id)
    await bot.stop()
    session = json.loads((bot.config.store_path / "session.json").read_text())
    legacy = await _room_made_by_the_bot_before_markers(bot, session, alice)
    code, out = await reset(bot, "--server", "--yes")
    assert code == 0, out
    assert "logged out device" in out and f"{lobby}: not created by the bot" in out
    for room_id in (space, chat, legacy):
        assert f"{room_id}: kick {alice.user_id}, leave, forget" in out
    await alice.sync()
    members = await alice.client.joined_members(chat)
    assert alice.user_id not in [m.user_id for m in getattr(members, "members", [])]
    old = AsyncClient(bot.config.homeserver, bot.config.user_id)
    old.restore_login(bot.config.user_id, session["device_id"], session["access_token"])
    assert isinstance(await old.whoami(), WhoamiError)
    await old.close()
    bot_client = AsyncClient(bot.config.homeserver, bot.config.user_id)
    await bot_client.login(bot.config.password)
    try:
        rooms = (await bot_client.joined_rooms()).rooms
        assert space not in rooms and chat not in rooms and legacy not in rooms
        assert lobby in rooms
    finally:
        await bot_client.close()
    assert legacy not in (await alice.client.joined_rooms()).rooms


async def _room_made_by_the_bot_before_markers(bot, session: dict, user) -> str:
    """A room created by the bot (with its saved session) that carries no io.lambda marker,
    joined by ``user``."""
    client = AsyncClient(bot.config.homeserver, bot.config.user_id)
    client.restore_login(bot.config.user_id, session["device_id"], session["access_token"])
    try:
        resp = await client.room_create(name="Old chat", invite=[user.user_id])
        assert isinstance(resp, RoomCreateResponse), resp
    finally:
        await client.close()
    await user.join(resp.room_id)
    return resp.room_id
