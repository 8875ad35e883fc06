"""The embedded default (SPEC §4): one SQLite file, a key/value table with JSON values, on
aiosqlite, held by one process (its lock file). Keeps the contract of ``core.store.contract``."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from core.store.contract import (
    BIRTH_KEY,
    LEGACY_RESET_MARKER_KEY,
    Birth,
    BirthCause,
    Engine,
    SerialTransaction,
    SerialWork,
    StoreError,
    StoreRefused,
    StoreUnreadable,
    Transaction,
    birth_from,
    prefix_end,
)

T = TypeVar("T")


class StoreUnwritable(StoreError):
    """The SQLite file does not exist and cannot be created (disk full, read-only folder).
    Nothing is wrong with any data, so the remedy is the disk, never the reset tool."""

    def __init__(self, path: Path, detail: str) -> None:
        super().__init__(
            f"cannot create the local database {path} ({detail}): free disk "
            "space, or make its folder writable, or set LAMBDA_MATRIX_DB elsewhere"
        )
        self.path = path


class StoreLocked(StoreError):
    """Another process (a running bot or the reset tool) holds the database."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"{path} is in use by another process (is the bot running?)")
        self.path = path


def lock_path(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + ".lock")


class ProcessLock:
    """An exclusive advisory lock held for a process's lifetime (released by the OS on exit)."""

    def __init__(self, db_path: Path) -> None:
        self.path = lock_path(db_path)
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLocked(self.path) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def holder_pid(self) -> str:
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"


def unwritable(db_path: Path) -> Path | None:
    """The file or folder that keeps the DB from taking writes, if any. SQLite writes beside
    the file too (-wal, -shm), so the folder must be writable as well."""
    for path in (db_path, Path(f"{db_path}-wal"), Path(f"{db_path}-shm"), lock_path(db_path)):
        if path.exists() and not os.access(path, os.R_OK | os.W_OK):
            return path
    folder = db_path.parent
    while not folder.exists():  # what is missing is created, from the first that exists
        folder = folder.parent
    return None if os.access(folder, os.W_OK | os.X_OK) else folder


def write_remedy(error: str, db: Path) -> str:
    """What the operator should do about a refused write, from SQLite's message."""
    retries = "the bot keeps its place and retries by itself"
    if "full" in error:
        return f"free disk space on the filesystem holding {db}; {retries}"
    if "readonly" in error or "read-only" in error:
        return f"make {db} and its folder writable by the bot's user; {retries}"
    if "locked" in error:
        return f"another process holds {db} (an open sqlite3 shell?): close it; {retries}"
    return f"check the disk holding {db} (full, read-only or failing); {retries}"


@contextmanager
def refusals(path: Path) -> Iterator[None]:
    """SQLite's operational errors (disk full, read-only, locked) as ``StoreRefused``."""
    try:
        yield
    except sqlite3.OperationalError as err:
        raise StoreRefused(str(err), write_remedy(str(err), path)) from err


class SQLiteStore:
    """Key/value store with JSON values in one file. ``created`` tells if the file was new at
    open; ``birth`` when and why it was created (None for a file older than birth records)."""

    engine: Engine = "sqlite"

    def __init__(
        self, path: Path, conn: aiosqlite.Connection, created: bool, birth: Birth | None
    ) -> None:
        self.path = path
        self.where = str(path)
        self.created = created
        self.birth = birth
        self._conn = conn
        self._write_lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: str | Path, birth_cause: BirthCause = "store_missing") -> SQLiteStore:
        """Open the file, creating it (with its birth record, ``birth_cause``) if missing."""
        path = Path(path)
        created = not path.exists()
        if not created and not os.access(path, os.R_OK | os.W_OK):
            raise StoreUnreadable(path, "no read/write permission")
        path.parent.mkdir(parents=True, exist_ok=True)
        refused = StoreUnwritable if created else StoreUnreadable
        try:
            conn = await aiosqlite.connect(path, isolation_level=None)
        except sqlite3.Error as err:
            raise refused(path, str(err)) from err
        try:
            await conn.execute("PRAGMA journal_mode=WAL")
            await conn.execute("PRAGMA synchronous=NORMAL")
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
            )
            async with conn.execute("PRAGMA quick_check") as cur:
                verdict = (await cur.fetchone() or ("?",))[0]
            if verdict != "ok":
                raise StoreUnreadable(path, f"integrity check: {verdict}")
            if created:
                await conn.execute(
                    "INSERT OR IGNORE INTO kv (key, value) VALUES (?, ?)",
                    (BIRTH_KEY, json.dumps(asdict(Birth(time.time(), birth_cause)))),
                )
            birth = await _read_birth(conn)
        except sqlite3.Error as err:
            await conn.close()
            if created:  # a half-made file holds nothing: the next start makes it anew
                for leftover in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
                    leftover.unlink(missing_ok=True)
            raise refused(path, str(err)) from err
        except StoreUnreadable:
            await conn.close()
            raise
        return cls(path, conn, created, birth)

    async def close(self) -> None:
        await self._conn.close()

    async def get(self, key: str) -> Any | None:
        with refusals(self.path):
            async with self._conn.execute("SELECT value FROM kv WHERE key = ?", (key,)) as cur:
                row = await cur.fetchone()
        return None if row is None else self._decode(key, row[0])

    async def scan(self, prefix: str) -> list[tuple[str, Any]]:
        """All (key, value) pairs whose key starts with ``prefix`` (case-sensitive), in key
        order."""
        # A key range, not LIKE: LIKE folds ASCII case and cannot use the key's index.
        query, args = "SELECT key, value FROM kv WHERE key >= ?", [prefix]
        if (end := prefix_end(prefix)) is not None:
            query += " AND key < ?"
            args.append(end)
        with refusals(self.path):
            async with self._conn.execute(query + " ORDER BY key", args) as cur:
                rows = await cur.fetchall()
        return [(k, self._decode(k, v)) for k, v in rows]

    async def set(self, key: str, value: Any) -> None:
        async with self.transaction() as tx:
            tx.set(key, value)

    async def delete(self, key: str) -> None:
        async with self.transaction() as tx:
            tx.delete(key)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        tx = Transaction()
        yield tx
        if not tx.writes:
            return
        async with self._write_lock, self._begun():
            await self._apply(tx)

    async def serialized(self, lock: str, work: SerialWork[T]) -> T:
        """One process holds the file: every write already waits for the one before it, so
        ``lock`` needs no name here, and a fence always holds."""
        async with self._write_lock, self._begun():
            tx = SerialTransaction(self._get_many)
            result = await work(tx)
            await self._apply(tx)
        return result

    @asynccontextmanager
    async def _begun(self) -> AsyncIterator[None]:
        """A write transaction on the file (the caller holds ``_write_lock``): committed when
        the block ends, rolled back if it raises."""
        with refusals(self.path):
            await self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield
                await self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:  # SQLite may have rolled back by itself
                    try:
                        await self._conn.execute("ROLLBACK")
                    except sqlite3.OperationalError as err:
                        # A task cancelled while its COMMIT ran (a stop) finds it ended since:
                        # nothing to roll back, and the cancellation goes on as it came.
                        if "no transaction is active" not in str(err):
                            raise
                raise

    async def _apply(self, tx: Transaction) -> None:
        for key, value in tx.writes:
            if value is None:
                await self._conn.execute("DELETE FROM kv WHERE key = ?", (key,))
            else:
                await self._conn.execute(
                    "INSERT INTO kv (key, value) VALUES (?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (key, value),
                )

    async def _get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for start in range(0, len(keys), 500):  # SQLite's bound on a statement's parameters
            chunk = list(keys[start : start + 500])
            marks = ", ".join("?" * len(chunk))
            query = f"SELECT key, value FROM kv WHERE key IN ({marks})"
            async with self._conn.execute(query, chunk) as cur:
                found.update((k, self._decode(k, v)) for k, v in await cur.fetchall())
        return found

    def _decode(self, key: str, raw: str) -> Any:
        try:
            return json.loads(raw)
        except json.JSONDecodeError as err:
            raise StoreUnreadable(self.path, f"record {key!r} is not JSON") from err


async def _read_birth(conn: aiosqlite.Connection) -> Birth | None:
    async with conn.execute(
        "SELECT key, value FROM kv WHERE key IN (?, ?)", (BIRTH_KEY, LEGACY_RESET_MARKER_KEY)
    ) as cur:
        rows = {key: value for key, value in await cur.fetchall()}
    try:
        return birth_from(rows)
    except ValueError as err:
        raise sqlite3.DatabaseError(f"unreadable birth record: {err}") from err
