"""What exists locally, read without changing anything (not even SQLite's WAL bookkeeping)."""

from __future__ import annotations

import json
import shutil
import sqlite3
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

from adapter.matrix.homeserver.session import Session
from core.store import lock_path

SQLITE_HEADER = b"SQLite format 3\x00"
# The bot's schema (core/store.py), as PRAGMA table_info reports it: (name, type, notnull, pk).
BOT_KV_COLUMNS = [("key", "TEXT", 0, 1), ("value", "TEXT", 1, 0)]
SESSION_FIELDS = frozenset(f.name for f in fields(Session))

# missing: no file. bot: the bot's schema. empty: a 0-byte file (nothing in it to lose).
# foreign: an SQLite database with another schema. not_sqlite: no SQLite header.
# unreadable: an SQLite header, but the schema cannot be read (damaged, or no permission).
# directory: a folder where the file should be.
DbKind = Literal["missing", "bot", "empty", "foreign", "not_sqlite", "unreadable", "directory"]


@dataclass(frozen=True)
class FileFact:
    path: Path
    size: int


@dataclass(frozen=True)
class KnownRoom:
    room_id: str
    kind: str
    owner: str
    name: str


@dataclass(frozen=True)
class DbFacts:
    """The SQLite file and its sidecars; ``kind`` says whose it is (see DbKind)."""

    path: Path
    kind: DbKind
    detail: str = ""  # why it is not the bot's, or why its records could not be read
    files: tuple[FileFact, ...] = ()  # the file, -wal and -shm that exist
    counts: Counter = field(default_factory=Counter)  # records per key prefix
    rooms: tuple[KnownRoom, ...] = ()
    damaged: str | None = None  # the bot's schema, but its records are unreadable


@dataclass(frozen=True)
class StoreEntry:
    """One top-level entry of MATRIX_STORE_PATH."""

    path: Path
    size: int
    kind: Literal["file", "dir", "other"]
    session: bool = False  # a regular file holding the bot's session format
    db_file: bool = False  # one of LAMBDA_MATRIX_DB's own files (the DB may live in here)


@dataclass(frozen=True)
class StoreFacts:
    path: Path
    kind: Literal["missing", "dir", "not_dir"]
    entries: tuple[StoreEntry, ...] = ()
    holds_db: bool = False  # LAMBDA_MATRIX_DB lies inside this folder


@dataclass(frozen=True)
class LocalFacts:
    db: DbFacts
    store: StoreFacts


def db_files(db_path: Path) -> list[Path]:
    """The SQLite file and its WAL-mode sidecars."""
    return [Path(f"{db_path}{suffix}") for suffix in ("", "-wal", "-shm")]


def inspect_local(db_path: Path, store_path: Path) -> LocalFacts:
    return LocalFacts(inspect_db(db_path), inspect_store(store_path, db_path))


def inspect_db(db_path: Path) -> DbFacts:
    files = tuple(FileFact(p, p.stat().st_size) for p in db_files(db_path) if p.is_file())
    if db_path.is_dir():
        return DbFacts(db_path, "directory", files=files)
    if not db_path.exists():
        return DbFacts(db_path, "missing", files=files)
    if db_path.stat().st_size == 0:
        return DbFacts(db_path, "empty", files=files)
    try:
        with db_path.open("rb") as fh:
            header = fh.read(len(SQLITE_HEADER))
    except OSError as err:
        return DbFacts(db_path, "unreadable", err.strerror or str(err), files)
    if header != SQLITE_HEADER:
        return DbFacts(db_path, "not_sqlite", "it does not start with an SQLite header", files)
    try:
        return _read_sqlite(db_path, files)
    except (sqlite3.Error, OSError) as err:
        return DbFacts(db_path, "unreadable", str(err), files)


@contextmanager
def read_only_copy(db_path: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection to a copy of the file and its WAL: even a read-only connection
    may create -wal/-shm next to the real file. For a file no process is writing."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "copy.db"
        for src in db_files(db_path)[:2]:
            if src.is_file():
                shutil.copyfile(src, str(copy) + src.name[len(db_path.name) :])
        conn = sqlite3.connect(f"file:{copy}?mode=ro", uri=True)
        try:
            yield conn
        finally:
            conn.close()


def schema_problem(conn: sqlite3.Connection) -> str | None:
    """Why the database is not the bot's, judged by its schema; None when it is."""
    tables = [
        name
        for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' "
            "AND name NOT LIKE 'sqlite_%' ORDER BY name"
        )
    ]
    columns = [
        (name, type_, notnull, pk)
        for _, name, type_, notnull, _, pk in conn.execute("PRAGMA table_info(kv)")
    ]
    if tables != ["kv"] or columns != BOT_KV_COLUMNS:
        return _schema_summary(tables)
    return None


def _read_sqlite(db_path: Path, files: tuple[FileFact, ...]) -> DbFacts:
    with read_only_copy(db_path) as conn:
        if problem := schema_problem(conn):
            return DbFacts(db_path, "foreign", problem, files)
        try:
            records = _read_records(conn)
        except (sqlite3.Error, ValueError) as err:
            return DbFacts(db_path, "bot", files=files, damaged=str(err))
    counts = Counter(key.split(":", 1)[0] for key in records)
    return DbFacts(db_path, "bot", files=files, counts=counts, rooms=known_rooms(records))


def _schema_summary(tables: list[str]) -> str:
    if not tables:
        return "it holds no tables"
    if tables == ["kv"]:
        return "its kv table has other columns than the bot's"
    return f"its tables are {', '.join(tables)}"


def _read_records(conn: sqlite3.Connection) -> dict[str, object]:
    (verdict,) = conn.execute("PRAGMA quick_check").fetchone() or ("?",)
    if verdict != "ok":
        raise sqlite3.DatabaseError(f"integrity check: {verdict}")
    return {key: json.loads(value) for key, value in conn.execute("SELECT key, value FROM kv")}


def known_rooms(records: dict[str, object]) -> tuple[KnownRoom, ...]:
    """The Spaces and rooms the records know, with a readable name, sorted per owner."""
    rooms = []
    for key, meta in records.items():
        if not key.startswith("matrix_room:") or not isinstance(meta, dict):
            continue
        room_id = key.removeprefix("matrix_room:")
        kind, owner = meta.get("kind", "?"), meta.get("owner", "?")
        chat = records.get(f"chat:{owner}:{meta.get('chat_id')}")
        name = {"space": "Lambda (Space)", "lobby": "lobby (not created by the bot)"}.get(
            kind, chat.get("title", "?") if isinstance(chat, dict) else "?"
        )
        rooms.append(KnownRoom(room_id, kind, owner, name))
    return tuple(sorted(rooms, key=lambda r: (r.owner, r.kind != "space", r.name)))


def inspect_store(store_path: Path, db_path: Path) -> StoreFacts:
    if not store_path.exists():
        return StoreFacts(store_path, "missing")
    if not store_path.is_dir():
        return StoreFacts(store_path, "not_dir")
    db_own = {p.resolve() for p in [*db_files(db_path), lock_path(db_path)]}
    entries = tuple(_store_entry(p, p.resolve() in db_own) for p in sorted(store_path.iterdir()))
    holds_db = db_path.resolve().is_relative_to(store_path.resolve())
    return StoreFacts(store_path, "dir", entries, holds_db)


def _store_entry(path: Path, db_file: bool) -> StoreEntry:
    if path.is_symlink() or not (path.is_file() or path.is_dir()):
        return StoreEntry(path, 0, "other", db_file=db_file)
    if path.is_dir():
        return StoreEntry(path, 0, "dir", db_file=db_file)
    return StoreEntry(path, path.stat().st_size, "file", _holds_session(path), db_file)


def _holds_session(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and set(data) == SESSION_FIELDS
