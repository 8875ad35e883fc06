"""The reset tool's plan (pure, from facts) and its inspection of the disk, without a
homeserver."""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

from adapter.matrix.delivery.inbox import Inbox
from adapter.matrix.store.records import MatrixStore, RoomMeta, UserMeta
from core.chat import ChatManager
from core.store import SQLiteStore

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

from reset_tool.facts import (
    DbFacts,
    FileFact,
    LocalFacts,
    StoreEntry,
    StoreFacts,
    inspect_db,
    inspect_local,
)
from reset_tool.plan import Kept, plan_reset

DB = Path("/w/lambda_matrix.db")
STORE = Path("/w/matrix_store")
SESSION = StoreEntry(STORE / "session.json", 120, "file", session=True)


def bot_db(*suffixes: str) -> DbFacts:
    return DbFacts(DB, "bot", files=tuple(FileFact(Path(f"{DB}{s}"), 10) for s in ("", *suffixes)))


def store(*entries: StoreEntry, holds_db: bool = False) -> StoreFacts:
    return StoreFacts(STORE, "dir", entries, holds_db)


def removed(plan) -> set[Path]:
    return {r.path for r in plan.removals}


# --- the plan -------------------------------------------------------------------------------


def test_the_bots_db_and_session_are_removed_with_the_emptied_folder():
    plan = plan_reset(LocalFacts(bot_db("-wal", "-shm"), store(SESSION)))
    assert plan.refusal is None and plan.kept == ()
    assert removed(plan) == {DB, Path(f"{DB}-wal"), Path(f"{DB}-shm"), SESSION.path}
    assert plan.remove_store_dir == STORE
    assert {r.backup_name for r in plan.removals} >= {
        "lambda_matrix.db",
        "matrix_store/session.json",
    }


def test_foreign_entries_in_the_session_folder_are_left_and_keep_the_folder():
    foreign = StoreEntry(STORE / "homeserver.yaml", 50, "file")
    synapse = StoreEntry(STORE / "synapse", 0, "dir")
    fake = StoreEntry(STORE / "session.tmp", 3, "file", session=False)
    plan = plan_reset(LocalFacts(bot_db(), store(SESSION, foreign, synapse, fake)))
    assert removed(plan) == {DB, SESSION.path} and plan.remove_store_dir is None
    reasons = {k.path: k.reason for k in plan.kept}
    assert reasons[foreign.path] == reasons[synapse.path] == "not written by the bot"
    assert "does not hold one" in reasons[fake.path]
    assert "3 entries not the bot's" in reasons[STORE]


def test_a_left_over_temporary_session_is_the_bots():
    tmp = StoreEntry(STORE / "session.tmp", 120, "file", session=True)
    plan = plan_reset(LocalFacts(bot_db(), store(SESSION, tmp)))
    assert removed(plan) == {DB, SESSION.path, tmp.path} and plan.remove_store_dir == STORE


def test_a_folder_holding_the_db_is_kept_and_its_db_files_are_not_called_foreign():
    inside = DbFacts(STORE / "l.db", "bot", files=(FileFact(STORE / "l.db", 10),))
    entries = (
        StoreEntry(STORE / "l.db", 10, "file", db_file=True),
        StoreEntry(STORE / "l.db.lock", 3, "file", db_file=True),
        SESSION,
    )
    plan = plan_reset(LocalFacts(inside, store(*entries, holds_db=True)))
    assert removed(plan) == {STORE / "l.db", SESSION.path}
    assert [(k.path, k.reason) for k in plan.kept] == [(STORE, "the folder holds LAMBDA_MATRIX_DB")]


def test_a_session_path_that_is_a_file_is_left():
    plan = plan_reset(LocalFacts(bot_db(), StoreFacts(STORE, "not_dir")))
    assert removed(plan) == {DB} and "is not a folder" in plan.kept[0].reason


def test_a_foreign_sqlite_file_is_refused_unless_forced():
    foreign = DbFacts(DB, "foreign", "its tables are users", (FileFact(DB, 8192),))
    refused = plan_reset(LocalFacts(foreign, store(SESSION)))
    assert refused.refusal is not None
    assert "not the bot's: its tables are users" in refused.refusal
    assert "--force" in refused.refusal
    assert refused.removals == () and refused.remove_store_dir is None  # not even the session
    forced = plan_reset(LocalFacts(foreign, store(SESSION)), force=True)
    assert forced.refusal is None and removed(forced) == {DB, SESSION.path}
    assert forced.forced is not None and "its tables are users" in forced.forced


def test_a_file_too_damaged_to_judge_is_refused_with_the_store_unreadable_hint():
    for kind in ("not_sqlite", "unreadable"):
        plan = plan_reset(LocalFacts(DbFacts(DB, kind, "why", (FileFact(DB, 9),)), store()))
        assert plan.refusal is not None
        assert "store.unreadable" in plan.refusal and "--force" in plan.refusal
        assert removed(
            plan_reset(
                LocalFacts(DbFacts(DB, kind, "why", (FileFact(DB, 9),)), store()), force=True
            )
        ) == {DB}


def test_a_directory_at_the_db_path_is_refused_even_when_forced():
    plan = plan_reset(LocalFacts(DbFacts(DB, "directory"), store(SESSION)), force=True)
    assert plan.refusal is not None
    assert "never deletes a directory" in plan.refusal and plan.removals == ()


def test_left_over_sidecars_without_their_db_are_refused_unless_forced():
    orphan = DbFacts(DB, "missing", files=(FileFact(Path(f"{DB}-wal"), 100),))
    plan = plan_reset(LocalFacts(orphan, store()))
    assert plan.refusal is not None
    assert "lambda_matrix.db-wal is there without" in plan.refusal and "--force" in plan.refusal
    assert removed(plan_reset(LocalFacts(orphan, store()), force=True)) == {Path(f"{DB}-wal")}


def test_nothing_there_and_an_empty_file_need_no_force():
    assert (
        plan_reset(LocalFacts(DbFacts(DB, "missing"), StoreFacts(STORE, "missing"))).refusal is None
    )
    empty = plan_reset(LocalFacts(DbFacts(DB, "empty", files=(FileFact(DB, 0),)), store()))
    assert empty.refusal is None and removed(empty) == {DB}


# --- the inspection of the disk -------------------------------------------------------------


def listing(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


async def test_inspection_lists_counts_and_rooms_per_user_without_changing_anything(tmp_path):
    db = tmp_path / "l.db"
    store_ = await SQLiteStore.open(db)
    mstore, chats = MatrixStore(store_), ChatManager(store_)
    await mstore.set_user("@a:x", UserMeta("!s:x", "!l:x"))
    await mstore.set_room("!s:x", RoomMeta("space", "@a:x"))
    await mstore.set_room("!l:x", RoomMeta("lobby", "@a:x"))
    await mstore.set_room("!c:x", RoomMeta("chat", "@a:x", "c1", "!s:x"))
    await chats.get_or_create("@a:x", "c1", "Recipes")
    await (await Inbox.open(store_))[0].ingest([], "s1")
    (tmp_path / "session").mkdir()
    (tmp_path / "session" / "session.json").write_text("{}")
    await store_.close()
    before = listing(tmp_path)

    facts = inspect_local(db, tmp_path / "session")

    assert facts.db.kind == "bot" and facts.db.damaged is None
    assert facts.db.counts == {
        "matrix_user": 1,
        "matrix_room": 3,
        "chat": 1,
        "sync_token": 1,
        "birth": 1,
    }
    assert {(r.room_id, r.kind, r.name) for r in facts.db.rooms} == {
        ("!s:x", "space", "Lambda (Space)"),
        ("!l:x", "lobby", "lobby (not created by the bot)"),
        ("!c:x", "chat", "Recipes"),
    }
    assert facts.store.entries == (
        StoreEntry(tmp_path / "session" / "session.json", 2, "file", session=False),
    )
    assert listing(tmp_path) == before  # and no -wal/-shm appeared next to the DB


async def test_a_db_still_open_is_read_through_its_wal_and_left_as_it_was(tmp_path):
    db = tmp_path / "l.db"
    store_ = await SQLiteStore.open(db)
    await MatrixStore(store_).set_room("!s:x", RoomMeta("space", "@a:x"))
    before = listing(tmp_path)
    try:
        facts = inspect_db(db)
        after = listing(tmp_path)  # before close(), which checkpoints the WAL
    finally:
        await store_.close()
    assert facts.kind == "bot" and [r.room_id for r in facts.rooms] == ["!s:x"]
    assert {f.path.name for f in facts.files} == {"l.db", "l.db-wal", "l.db-shm"}
    assert after == before


def test_inspection_tells_foreign_sqlite_from_the_bots_schema(tmp_path):
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE users (id INTEGER)")
    lookalike = tmp_path / "kv.db"
    with sqlite3.connect(lookalike) as conn:
        conn.execute("CREATE TABLE kv (key TEXT PRIMARY KEY, value BLOB)")
    assert (inspect_db(other).kind, inspect_db(other).detail) == ("foreign", "its tables are users")
    assert inspect_db(lookalike).kind == "foreign"
    assert "other columns" in inspect_db(lookalike).detail


def test_inspection_of_random_bytes_an_empty_file_and_a_directory(tmp_path):
    garbage = tmp_path / "g.db"
    garbage.write_bytes(b"garbage" * 500)
    (tmp_path / "e.db").touch()
    (tmp_path / "d.db").mkdir()
    assert inspect_db(garbage).kind == "not_sqlite"
    assert inspect_db(garbage).files == (FileFact(garbage, 3500),)
    assert inspect_db(tmp_path / "e.db").kind == "empty"
    assert inspect_db(tmp_path / "d.db").kind == "directory"
    assert inspect_db(tmp_path / "none.db").kind == "missing"


async def test_a_bots_db_with_damaged_records_is_still_the_bots(tmp_path):
    db = tmp_path / "l.db"
    store_ = await SQLiteStore.open(db)
    await store_.set("matrix_room:!s:x", {"kind": "space", "owner": "@a:x"})
    await store_.close()
    with sqlite3.connect(db) as conn:  # a record that is not JSON: the bot would refuse it
        conn.execute("UPDATE kv SET value = '{not json' WHERE key = 'matrix_room:!s:x'")
    facts = inspect_db(db)
    assert facts.kind == "bot" and facts.damaged and facts.rooms == ()
    assert plan_reset(LocalFacts(facts, StoreFacts(tmp_path / "s", "missing"))).refusal is None


def test_the_plan_names_why_the_folder_stays_before_its_many_foreign_entries():
    many = [StoreEntry(STORE / f"f{i:02}", 1, "file") for i in range(40)]
    plan = plan_reset(LocalFacts(bot_db(), store(SESSION, *many)))
    assert plan.kept[0] == Kept(STORE, "the folder still holds 40 entries not the bot's")
    assert len(plan.kept) == 41
