"""The local cache (SPEC §4, §10): one contract (``contract``), two backends (``sqlite``, the
embedded default, and ``postgres``), and ``open_store``, which picks one from
``LAMBDA_MATRIX_DB``. The names the tree imports from ``core.store`` stay here."""

from __future__ import annotations

from pathlib import Path

from core.store.contract import (
    BIRTH_KEY,
    LEGACY_RESET_MARKER_KEY,
    RESET_HINT,
    Birth,
    BirthCause,
    Engine,
    Store,
    StoreError,
    StoreRefused,
    StoreUnreadable,
    Transaction,
    birth_from,
)
from core.store.location import is_postgres_url, redact_url, scrub
from core.store.postgres import PostgresStore, StoreMisconfigured, StoreUnreachable
from core.store.sqlite import (
    ProcessLock,
    SQLiteStore,
    StoreLocked,
    StoreUnwritable,
    lock_path,
    unwritable,
    write_remedy,
)

__all__ = [
    "BIRTH_KEY",
    "LEGACY_RESET_MARKER_KEY",
    "RESET_HINT",
    "Birth",
    "BirthCause",
    "Engine",
    "PostgresStore",
    "ProcessLock",
    "SQLiteStore",
    "Store",
    "StoreError",
    "StoreLocked",
    "StoreMisconfigured",
    "StoreRefused",
    "StoreUnreachable",
    "StoreUnreadable",
    "StoreUnwritable",
    "Transaction",
    "birth_from",
    "is_postgres_url",
    "lock_path",
    "open_store",
    "redact_url",
    "scrub",
    "unwritable",
    "write_remedy",
]


async def open_store(location: str | Path, birth_cause: BirthCause = "store_missing") -> Store:
    """The store at ``location``: a ``postgresql://`` URL, or else a SQLite file path."""
    if isinstance(location, str) and is_postgres_url(location):
        return await PostgresStore.open(location, birth_cause)
    return await SQLiteStore.open(location, birth_cause)
