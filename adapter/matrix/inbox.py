"""The durable inbox (SPEC §5, Delivery): a sync round's updates are written together with
the round's sync token, in one transaction, before any of them is handled. An update leaves
the inbox only when its handling is finished, so a crash at any point loses nothing."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

from adapter.matrix.context import Update
from adapter.matrix.store import SYNC_TOKEN_KEY
from core.store import SQLiteStore

PREFIX = "inbox:"


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
        return cls(int(key.removeprefix(PREFIX)), Update(**data["update"]),
                   float(data.get("not_before", 0.0)))


class Inbox:
    """The updates not yet fully handled, in the SQLite file. Open it with ``Inbox.open``."""

    def __init__(self, db: SQLiteStore, next_seq: int) -> None:
        self._db = db
        self._next_seq = next_seq

    @classmethod
    async def open(cls, db: SQLiteStore) -> tuple[Inbox, list[Entry]]:
        """The inbox, and what it still holds from an earlier run, in order."""
        pending = [Entry.from_json(key, data) for key, data in await db.scan(PREFIX)]
        return cls(db, pending[-1].seq + 1 if pending else 0), pending

    async def ingest(self, updates: list[Update], sync_token: str) -> list[Entry]:
        """Record a round: its updates and the token that follows it, atomically."""
        entries = [Entry(self._next_seq + i, update) for i, update in enumerate(updates)]
        async with self._db.transaction() as tx:
            for entry in entries:
                tx.set(entry.key, entry.to_json())
            tx.set(SYNC_TOKEN_KEY, sync_token)
        self._next_seq += len(entries)
        return entries

    async def done(self, entry: Entry) -> None:
        await self._db.delete(entry.key)

    async def postpone(self, entry: Entry, delay_s: float) -> Entry:
        """Keep the entry for another attempt in ``delay_s`` seconds (survives a restart)."""
        later = Entry(entry.seq, replace(entry.update, attempt=entry.update.attempt + 1),
                      time.time() + delay_s)
        await self._db.set(later.key, later.to_json())
        return later
