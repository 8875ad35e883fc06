"""Planning of the reset tool, without a homeserver."""

from __future__ import annotations

import sys
from pathlib import Path

from adapter.matrix.inbox import Inbox
from adapter.matrix.store import MatrixStore, RoomMeta, UserMeta
from core.chat import ChatManager
from core.store import SQLiteStore

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

from reset_local import make_plan  # noqa: E402


async def test_plan_lists_files_counts_and_rooms_per_user_without_changing_them(tmp_path):
    db = tmp_path / "l.db"
    store = await SQLiteStore.open(db)
    mstore, chats = MatrixStore(store), ChatManager(store)
    await mstore.set_user("@a:x", UserMeta("!s:x", "!l:x"))
    await mstore.set_room("!s:x", RoomMeta("space", "@a:x"))
    await mstore.set_room("!l:x", RoomMeta("lobby", "@a:x"))
    await mstore.set_room("!c:x", RoomMeta("chat", "@a:x", "c1", "!s:x"))
    await chats.get_or_create("@a:x", "c1", "Recipes")
    await (await Inbox.open(store))[0].ingest([], "s1")
    (tmp_path / "session").mkdir()
    (tmp_path / "session" / "session.json").write_text("{}")
    await store.close()
    before = {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    plan = make_plan(db, tmp_path / "session")

    assert plan.counts == {"matrix_user": 1, "matrix_room": 3, "chat": 1, "sync_token": 1}
    assert {(r.room_id, r.kind, r.name) for r in plan.rooms} == {
        ("!s:x", "space", "Lambda (Space)"), ("!l:x", "lobby", "lobby (not created by the bot)"),
        ("!c:x", "chat", "Recipes")}
    assert any(path.name == "session" for path, _ in plan.files)
    assert {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_plan_of_an_unreadable_db_says_so(tmp_path):
    db = tmp_path / "l.db"
    db.write_bytes(b"garbage" * 500)
    plan = make_plan(db, tmp_path / "none")
    assert plan.unreadable and plan.files == [(db, 3500)]
