"""The durable inbox (SPEC §5, Delivery): a sync round's updates are written together with
the round's sync token, in one transaction, before any of them is handled. An update leaves
the inbox only when its handling is finished, so a crash at any point loses nothing.

A write the file refuses (disk full, read-only, locked) loses nothing either: a round that
cannot be recorded raises ``WriteFailed`` and its token is not kept, so the homeserver hands
the same events again; a finished entry that cannot be removed is removed with the next round.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import structlog

from adapter.matrix.ingest.update import Update
from adapter.matrix.observe.health import Health
from adapter.matrix.observe.metrics import Metrics
from adapter.matrix.store.records import SYNC_TOKEN_KEY
from core.store import SQLiteStore, StoreError

log = structlog.get_logger()

PREFIX = "inbox:"
# Appservice mode: the transactions and the events already recorded, so that a transaction
# or an event pushed again is recorded once (kept PUSHED_KEEP_S; the homeserver retries an
# unacknowledged transaction within minutes, or at the bot's next start).
PUSHED_TXN = "inbox_txn:"
PUSHED_EVENT = "inbox_event:"
PUSHED_KEEP_S = 2 * 86_400
PUSHED_PRUNE_EVERY_S = 3600


class WriteFailed(StoreError):
    """The SQLite file refused a write: a fault of the machine, not of the data. Nothing of
    that write was kept, and the same write may succeed later. ``remedy`` says what to fix."""

    def __init__(self, path: Path, err: sqlite3.OperationalError) -> None:
        super().__init__(str(err))
        self.remedy = write_remedy(str(err), path)


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


@dataclass(frozen=True)
class Entry:
    """An update waiting in the inbox. ``seq`` orders entries; ``not_before`` (epoch seconds)
    postpones a retry."""

    seq: int
    update: Update
    not_before: float = 0.0

    @property
    def key(self) -> str:
        return f"{PREFIX}{self.seq:012d}"

    def to_json(self) -> dict:
        return {"update": asdict(self.update), "not_before": self.not_before}

    @classmethod
    def from_json(cls, key: str, data: dict) -> Entry:
        return cls(
            int(key.removeprefix(PREFIX)),
            Update(**data["update"]),
            float(data.get("not_before", 0.0)),
        )


class Inbox:
    """The updates not yet fully handled, in the SQLite file. Open it with ``Inbox.open``.
    It counts its depth and the retries in ``metrics``, and tells ``health`` of refused writes."""

    def __init__(
        self,
        db: SQLiteStore,
        next_seq: int,
        depth: int = 0,
        metrics: Metrics | None = None,
        health: Health | None = None,
    ) -> None:
        self._db = db
        self._next_seq = next_seq
        self._finished: set[str] = set()  # keys of finished entries the file refused to drop
        self.depth = depth  # entries not finished yet (read when metrics are scraped)
        self._lock = asyncio.Lock()
        self._held = False  # see hold_token
        self._latest: str | None = None  # the token of the latest round recorded
        self._metrics = metrics or Metrics()
        self._metrics.inbox_depth.set_function(lambda: self.depth)
        self._health = health or Health()
        self._pruned_at = 0.0  # when the pushed marks were last pruned (see add_transaction)

    @classmethod
    async def open(
        cls, db: SQLiteStore, metrics: Metrics | None = None, health: Health | None = None
    ) -> tuple[Inbox, list[Entry]]:
        """The inbox, and what it still holds from an earlier run, in order."""
        pending = [Entry.from_json(key, data) for key, data in await db.scan(PREFIX)]
        return cls(
            db, pending[-1].seq + 1 if pending else 0, len(pending), metrics, health
        ), pending

    def hold_token(self) -> None:
        """A start without a token: record rounds but not their token until ``release``, so a
        crash before the start's catch-up is recorded starts without a token again."""
        self._held = True

    async def ingest(self, updates: list[Update], sync_token: str) -> list[Entry]:
        """Record a round: its updates and the token that follows it, atomically. Raises
        ``WriteFailed`` when the file refuses it; then nothing is recorded."""
        async with self._lock:  # a start's catch-up records its round beside the sync loop
            entries = await self._record(updates, None if self._held else sync_token)
            self._latest = sync_token
            return entries

    async def add(self, updates: list[Update]) -> list[Entry]:
        """Record updates of a start's catch-up (a window of its sweep); the token stays held."""
        async with self._lock:
            return await self._record(updates, None)

    async def release(self) -> None:
        """The start's catch-up is recorded: keep the latest round's token, and tokens again."""
        async with self._lock:
            await self._record([], self._latest)
            self._held = False

    async def add_transaction(self, txn_id: str, updates: list[Update]) -> list[Entry]:
        """Record a transaction the homeserver pushed (appservice mode), in one write: its
        updates but those of events already recorded, and its id, so that the same
        transaction again records nothing. Raises ``WriteFailed`` when the file refuses it:
        then nothing is recorded, and the homeserver pushes it again."""
        async with self._lock:
            try:
                if await self._db.get(PUSHED_TXN + txn_id) is not None:
                    return []
                fresh: dict[str, Update] = {}
                for update in updates:
                    if update.event_id not in fresh and (
                        await self._db.get(PUSHED_EVENT + update.event_id) is None
                    ):
                        fresh[update.event_id] = update
                now = time.time()
                marks = {PUSHED_TXN + txn_id: now, **{PUSHED_EVENT + e: now for e in fresh}}
                drop = await self._stale_marks(now)
            except sqlite3.OperationalError as err:
                raise WriteFailed(self._db.path, err) from err
            return await self._record(list(fresh.values()), None, marks, drop)

    async def _stale_marks(self, now: float) -> list[str]:
        """At most once an hour, the pushed marks older than ``PUSHED_KEEP_S``."""
        if now - self._pruned_at < PUSHED_PRUNE_EVERY_S:
            return []
        self._pruned_at = now
        return [
            key
            for prefix in (PUSHED_TXN, PUSHED_EVENT)
            for key, at in await self._db.scan(prefix)
            if not isinstance(at, int | float) or now - at > PUSHED_KEEP_S
        ]

    async def _record(
        self,
        updates: list[Update],
        sync_token: str | None,
        marks: dict[str, Any] | None = None,
        drop: list[str] | None = None,
    ) -> list[Entry]:
        entries = [Entry(self._next_seq + i, update) for i, update in enumerate(updates)]
        try:
            async with self._db.transaction() as tx:
                for key in [*self._finished, *(drop or ())]:
                    tx.delete(key)
                for entry in entries:
                    tx.set(entry.key, entry.to_json())
                for key, value in (marks or {}).items():
                    tx.set(key, value)
                if sync_token is not None:
                    tx.set(SYNC_TOKEN_KEY, sync_token)
        except sqlite3.OperationalError as err:
            raise WriteFailed(self._db.path, err) from err
        self._finished.clear()
        self._next_seq += len(entries)
        self.depth += len(entries)
        return entries

    async def done(self, entry: Entry) -> None:
        """The entry is finished. If the file refuses to drop it now, the next round drops it
        (a restart before then handles it again; its reply's transaction id dedups that)."""
        self.depth -= 1
        try:
            await self._db.delete(entry.key)
        except sqlite3.OperationalError as err:
            self._finished.add(entry.key)
            self._refused("done", entry, err)

    async def postpone(self, entry: Entry, delay_s: float) -> Entry:
        """Keep the entry for another attempt in ``delay_s`` seconds (survives a restart, unless
        the file refuses the write: then only this run remembers the attempt)."""
        self._metrics.retries_scheduled.inc()
        later = Entry(
            entry.seq,
            replace(entry.update, attempt=entry.update.attempt + 1),
            time.time() + delay_s,
        )
        try:
            await self._db.set(later.key, later.to_json())
        except sqlite3.OperationalError as err:
            self._refused("postpone", entry, err)
        return later

    def _refused(self, during: str, entry: Entry, err: sqlite3.OperationalError) -> None:
        fault = WriteFailed(self._db.path, err)
        self._health.store_refused(str(fault))
        log.error(
            "store.write_failed",
            during=during,
            room_id=entry.update.room_id,
            event_id=entry.update.event_id,
            error=str(fault),
            remedy=fault.remedy,
        )
