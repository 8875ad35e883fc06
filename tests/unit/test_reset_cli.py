"""tools/reset_local.py as a process on local files only (no homeserver): what it refuses,
what it deletes, and the fresh DB's birth record. What it leaves in a session folder shared
with foreign files is tested against a real bot session in tests/integration."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from core.store import SQLiteStore

ROOT = Path(__file__).resolve().parents[2]
SESSION_JSON = (
    '{"homeserver": "http://h", "user_id": "@b:h", "device_id": "D", "access_token": "t"}'
)


@pytest.fixture
def paths(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "lambda_matrix.db", tmp_path / "matrix_store"


def reset(paths: tuple[Path, Path], *args: str) -> tuple[int, str]:
    db, store = paths
    env = {**os.environ, "LAMBDA_MATRIX_DB": str(db), "MATRIX_STORE_PATH": str(store)}
    proc = subprocess.run(
        [sys.executable, "tools/reset_local.py", *args],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
    )
    return proc.returncode, proc.stdout


def birth_cause(db: Path) -> str | None:
    async def read() -> str | None:
        store = await SQLiteStore.open(db)
        try:
            return store.birth.cause if store.birth else None
        finally:
            await store.close()

    return asyncio.run(read())


def foreign_sqlite(path: Path) -> bytes:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE users (id INTEGER, name TEXT)")
        conn.execute("INSERT INTO users VALUES (1, 'ann')")
    conn.close()
    return path.read_bytes()


def test_a_foreign_sqlite_file_is_refused_untouched_and_force_removes_it(paths):
    db, _ = paths
    original = foreign_sqlite(db)
    code, out = reset(paths, "--yes")
    assert code == 1 and "not the bot's" in out and "--force" in out
    assert db.read_bytes() == original
    assert sorted(p.name for p in db.parent.iterdir()) == [db.name]  # not even a lock left

    code, out = reset(paths, "--yes", "--force")
    assert code == 0, out
    assert "--force: " in out and "deleted all the same" in out
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall() == [
            ("kv",)
        ]
    assert birth_cause(db) == "local_reset"


def test_random_bytes_are_refused_with_the_hint_for_a_damaged_bot_db(paths):
    db, _ = paths
    db.write_bytes(os.urandom(5000))
    before = db.read_bytes()
    code, out = reset(paths, "--yes")
    assert code == 1 and "not an SQLite database" in out
    assert "store.unreadable" in out and "--force" in out
    assert db.read_bytes() == before
    code, _ = reset(paths, "--dry-run")  # a dry run says the real run would refuse
    assert code == 1 and db.read_bytes() == before
    code, _ = reset(paths, "--yes", "--force")
    assert code == 0 and birth_cause(db) == "local_reset"


def test_a_directory_at_the_db_path_is_never_deleted(paths):
    db, _ = paths
    db.mkdir()
    (db / "keep.txt").write_text("mine")
    code, out = reset(paths, "--yes", "--force")
    assert code == 1 and "never deletes a directory" in out
    assert (db / "keep.txt").read_text() == "mine"


def test_a_reset_removes_the_bots_files_and_the_emptied_folder(paths, tmp_path):
    db, store = paths
    asyncio.run(_make_bot_db(db))
    store.mkdir()
    (store / "session.json").write_text(SESSION_JSON)
    (tmp_path / "notes.txt").write_text("next to the DB, not the bot's")
    code, out = reset(paths, "--yes")
    assert code == 0, out
    assert not store.exists() and (tmp_path / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [db.name, "notes.txt"]  # lock gone
    assert birth_cause(db) == "local_reset"


async def _make_bot_db(db: Path) -> None:
    store = await SQLiteStore.open(db)
    await store.set("matrix_room:!s:x", {"kind": "space", "owner": "@a:x"})
    await store.close()


def test_bad_usage_exits_2(paths):
    code, out = reset(paths, "--no-such-flag")
    assert code == 2 and "usage:" in out
