"""The bot's DB, read without changing it, also beside a running bot (SPEC §9)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from reset_tool.facts import db_files, read_only_copy, schema_problem

from adapter.matrix.delivery.inbox import PREFIX as INBOX_PREFIX
from adapter.matrix.delivery.inbox import Entry
from adapter.matrix.store.records import SYNC_TOKEN_KEY, RoomMeta, UserMeta
from core.chat import Chat
from core.store import Birth, StoreError, birth_from, redact_url, scrub
from core.store.postgres import all_rows, connect_tool, schema_version


class DbUnusable(Exception):
    """The DB cannot be compared: missing, not the bot's, or unreadable. The message says which."""


@dataclass(frozen=True)
class LocalRecords:
    """What the DB holds that the doctor compares; chats are keyed by (owner, chat id)."""

    birth: Birth | None
    users: dict[str, UserMeta]
    rooms: dict[str, RoomMeta]
    chats: dict[tuple[str, str], Chat]
    inbox: tuple[Entry, ...] = ()
    sync_token: str | None = None


def read_local(db_path: Path) -> LocalRecords:
    """Every record of the bot's DB; ``DbUnusable`` if there is none to read."""
    if db_path.is_dir() or not db_path.exists():
        raise DbUnusable(
            f"there is no database at LAMBDA_MATRIX_DB ({db_path}): check the "
            "variable (the bot creates it on its next start, and heals every room "
            "with cause=store_missing)"
        )
    try:
        with _read_only(db_path) as conn:
            if problem := schema_problem(conn):
                raise DbUnusable(
                    f"LAMBDA_MATRIX_DB ({db_path}) is not the bot's database: {problem}"
                )
            rows = dict(conn.execute("SELECT key, value FROM kv"))
    except sqlite3.Error as err:
        raise DbUnusable(f"cannot read LAMBDA_MATRIX_DB ({db_path}): {err}") from err
    try:
        return records_from(rows)
    except (ValueError, TypeError, KeyError) as err:
        raise DbUnusable(
            f"LAMBDA_MATRIX_DB ({db_path}) holds a record the bot does not write: {err}"
        ) from err


async def read_remote(url: str) -> LocalRecords:
    """Every record of the bot's tables in a PostgreSQL database, read in one read-only
    transaction (the connection cannot write at all); ``DbUnusable`` if there is none."""
    shown = redact_url(url)
    try:
        conn = await connect_tool(url, "lambda-matrix-doctor", default_transaction_read_only="on")
    except StoreError as err:
        raise DbUnusable(f"cannot read LAMBDA_MATRIX_DB: {err}") from err
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            if await schema_version(conn) is None:
                raise DbUnusable(
                    f"the database at LAMBDA_MATRIX_DB ({shown}) holds no tables of the bot: "
                    "check the variable (the bot creates them on its next start, and heals "
                    "every room with cause=store_missing)"
                )
            rows = await all_rows(conn)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as err:
        raise DbUnusable(f"cannot read LAMBDA_MATRIX_DB ({shown}): {scrub(str(err), url)}") from err
    finally:
        await conn.close()
    try:
        return records_from(rows)
    except (ValueError, TypeError, KeyError) as err:
        raise DbUnusable(
            f"LAMBDA_MATRIX_DB ({shown}) holds a record the bot does not write: {err}"
        ) from err


@contextmanager
def _read_only(db_path: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection to the file itself while a process has it open in WAL mode (its
    -wal and -shm exist: a copy could catch a checkpoint half-way); else one to a copy, since
    a read-only connection may create those files next to it."""
    _, wal, shm = db_files(db_path)
    if wal.exists() and shm.exists():
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.OperationalError:  # left by a crash: recovery needs a writer
            conn.close()
        else:
            try:
                yield conn
            finally:
                conn.close()
            return
    with read_only_copy(db_path) as conn:
        yield conn


def records_from(rows: dict[str, str]) -> LocalRecords:
    """The typed records among raw ``kv`` rows (key -> JSON text)."""
    users, rooms, chats, inbox = {}, {}, {}, []
    for key, raw in rows.items():
        prefix, _, rest = key.partition(":")
        if prefix == "matrix_user":
            users[rest] = UserMeta(**json.loads(raw))
        elif prefix == "matrix_room":
            rooms[rest] = RoomMeta(**json.loads(raw))
        elif prefix == "chat":
            chat = Chat.from_json(json.loads(raw))
            chats[(chat.user_id, chat.chat_id)] = chat
        elif key.startswith(INBOX_PREFIX):
            inbox.append(Entry.from_json(key, json.loads(raw)))
    token = json.loads(rows[SYNC_TOKEN_KEY]) if SYNC_TOKEN_KEY in rows else None
    return LocalRecords(
        birth_from(rows), users, rooms, chats, tuple(sorted(inbox, key=lambda e: e.seq)), token
    )
