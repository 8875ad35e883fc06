"""The store contract (SPEC §4): what the rest of the tree may ask of the local cache, whatever
engine keeps it. A key/value map with JSON values: get, prefix scan, set, delete, and a
transaction for writes that go together; a birth record; typed errors. The backends beside
this module (``sqlite``, ``postgres``) keep it, and ``tests/unit/test_store_contract.py``
runs one suite over both."""

from __future__ import annotations

import calendar
import json
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

RESET_HINT = "run `python tools/reset_local.py` to start from a clean local state"
BIRTH_KEY = "birth"
LEGACY_RESET_MARKER_KEY = "reset_marker"  # what the reset tool wrote before birth records

BirthCause = Literal["store_missing", "local_reset"]
Engine = Literal["sqlite", "postgresql"]
_SURROGATES = range(0xD800, 0xE000)  # code points that UTF-8 (so neither engine's text) holds
T = TypeVar("T")


@dataclass(frozen=True)
class Birth:
    """When and why the DB was created (SPEC §4): by the bot because it was missing
    (``store_missing``), or by the reset tool (``local_reset``). ``at`` is Unix seconds."""

    at: float
    cause: BirthCause


class StoreError(Exception):
    """Base class of local-store errors."""


class StoreUnreadable(StoreError):
    """The store exists but cannot be used; the bot never deletes it itself. ``path`` names
    it: the SQLite file, or the PostgreSQL URL without its password."""

    def __init__(self, path: Any, detail: str) -> None:
        super().__init__(f"the local database {path} is unreadable ({detail}); {RESET_HINT}")
        self.path = path


class StoreRefused(StoreError):
    """The store refused a read or a write for now: a fault of the machine (a full disk, a
    read-only file, PostgreSQL down or restarting), not of the data. Nothing of that write was
    kept, and the same one may succeed later. ``remedy`` says what the operator can do."""

    def __init__(self, detail: str, remedy: str) -> None:
        super().__init__(detail)
        self.remedy = remedy


@dataclass(frozen=True)
class Lease:
    """A lease held by replica ``holder`` (SPEC §10, Replicas): ``term`` grows each time the
    lease is taken, so a write or a send fenced with it is refused once another took it."""

    name: str
    holder: str
    term: int


class LeaseLost(StoreError):
    """A fenced write or check found that the lease is no longer ours (another replica took
    it, or it expired): nothing was written, and the work it guarded belongs to another."""

    def __init__(self, lease: Lease) -> None:
        super().__init__(f"lease {lease.name} (term {lease.term}) is no longer held")
        self.lease = lease


class Transaction:
    """Buffered multi-key writes, applied atomically when the block exits. With ``fence`` set,
    they are applied only while that lease is still held (else ``LeaseLost``; a backend for
    one process holds every lease)."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, str | None]] = []
        self.fence: Lease | None = None

    def set(self, key: str, value: Any) -> None:
        self.writes.append((key, json.dumps(value, sort_keys=True)))

    def delete(self, key: str) -> None:
        self.writes.append((key, None))

    def final(self) -> dict[str, str | None]:
        """What the block leaves in each key it wrote: the JSON text, or None (deleted)."""
        return dict(self.writes)


class SerialTransaction(Transaction):
    """A transaction of ``Store.serialized``: it also reads, and what it reads is what the
    serialized transactions of its lock committed before it (not its own buffered writes)."""

    def __init__(self, read: Callable[[list[str]], Awaitable[dict[str, Any]]]) -> None:
        super().__init__()
        self._read = read

    async def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        """The values of those of ``keys`` that exist, in one read."""
        return await self._read(list(keys))


# What runs inside ``Store.serialized``: reads through its transaction, buffers writes in it,
# and returns what its caller needs. It may run twice (a connection that broke is retried),
# so it does nothing but read and buffer.
SerialWork = Callable[[SerialTransaction], Awaitable[T]]


class Store(Protocol):
    """The contract each backend keeps. ``where`` names the store in messages (the file, or
    the URL without its password); ``created`` tells if it was new at open; ``birth`` when
    and why it was created (None: older than birth records)."""

    engine: Engine
    where: str
    created: bool
    birth: Birth | None

    async def close(self) -> None: ...

    async def get(self, key: str) -> Any | None: ...

    async def scan(self, prefix: str) -> list[tuple[str, Any]]:
        """All (key, value) pairs whose key starts with ``prefix`` (case-sensitive, literal),
        in code-point order of the keys."""
        ...

    async def set(self, key: str, value: Any) -> None: ...

    async def delete(self, key: str) -> None: ...

    def transaction(self) -> AbstractAsyncContextManager[Transaction]:
        """Writes that go together: all of them are kept, or none (``StoreRefused``)."""
        ...

    async def serialized(self, lock: str, work: SerialWork[T]) -> T:
        """Read, then write, as one transaction that no other ``serialized`` of the same
        ``lock`` overlaps, in this process or any other on the same database: ``work`` reads
        what the one before it committed, and its buffered writes are applied atomically when
        it returns (fenced like ``transaction``'s). A read-modify-write that cannot race:
        numbers handed out once, a mark set only where it was absent."""
        ...


def prefix_end(prefix: str) -> str | None:
    """The least string above every string that starts with ``prefix`` (None: there is none,
    the prefix being empty or all U+10FFFF). Both engines compare keys as UTF-8 bytes (SQLite
    by default, PostgreSQL with the "C" collation), which orders them by code point."""
    stem = prefix.rstrip(chr(sys.maxunicode))
    if not stem:
        return None
    following = ord(stem[-1]) + 1
    if _SURROGATES.start <= following < _SURROGATES.stop:  # not encodable: skip past them
        following = _SURROGATES.stop
    return stem[:-1] + chr(following)


def birth_from(rows: Mapping[str, str]) -> Birth | None:
    """The birth record among raw ``kv`` rows (key -> JSON text), also from a file older than
    birth records that the reset tool marked; None if neither is there. ``ValueError`` if
    the record is damaged."""
    try:
        if BIRTH_KEY in rows:
            return Birth(**json.loads(rows[BIRTH_KEY]))
        if LEGACY_RESET_MARKER_KEY in rows:  # {"at": "2026-…Z", "by": "reset_local"}
            at = json.loads(rows[LEGACY_RESET_MARKER_KEY])["at"]
            return Birth(calendar.timegm(time.strptime(at, "%Y-%m-%dT%H:%M:%SZ")), "local_reset")
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(str(err)) from err
    return None
