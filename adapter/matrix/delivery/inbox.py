"""The durable inbox (SPEC §5, Delivery): a sync round's updates are written together with
the round's sync token, in one transaction, before any of them is handled. An update leaves
the inbox only when its handling is finished, so a crash at any point loses nothing.

A write the store refuses (a full or read-only disk, a locked file, PostgreSQL down) loses
nothing either: a round that cannot be recorded raises ``WriteFailed`` and its token is not
kept, so the homeserver hands the same events again; a finished entry that cannot be removed
is removed with the next round.

Recording is idempotent: an update already waiting in the inbox (the same room and event id,
from a sync round fetched again, say) is not recorded a second time.

Entries are numbered by the store, not by a process: each recording reads the next number
(``NEXT_SEQ_KEY``) and advances it in the transaction that writes the entries, serialized
across processes (``Store.serialized``). With replicas in appservice mode every replica
records the transactions pushed to it, so numbers never collide, and an entry numbered
after another was committed after it: a room's entries come out of the inbox in the order
they were recorded. The marks of pushed transactions and events are read in that same
transaction, so a transaction pushed again to another replica is recorded once.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import structlog

from adapter.matrix.ingest.update import Update
from adapter.matrix.observe.health import Health
from adapter.matrix.observe.metrics import Metrics
from adapter.matrix.store.records import SYNC_TOKEN_KEY
from core.store import Store, StoreRefused, write_remedy
from core.store.contract import Lease, SerialTransaction

log = structlog.get_logger()

PREFIX = "inbox:"
# Appservice mode: the transactions and the events already recorded, so that a transaction
# or an event pushed again is recorded once (kept PUSHED_KEEP_S; the homeserver retries an
# unacknowledged transaction within minutes, or at the bot's next start).
PUSHED_TXN = "inbox_txn:"
PUSHED_EVENT = "inbox_event:"
PUSHED_KEEP_S = 2 * 86_400
PUSHED_PRUNE_EVERY_S = 3600


# The next entry's number, read and advanced by each recording under the lock INBOX_LOCK
# (``Store.serialized``): whichever process records, no number is used twice, and numbers
# follow the order in which recordings were committed.
NEXT_SEQ_KEY = "inbox_next_seq"
INBOX_LOCK = "inbox"
# The store refused a write: a fault of the machine, not of the data (``core.store``).
WriteFailed = StoreRefused
__all__ = ["PREFIX", "Entry", "Inbox", "WriteFailed", "write_remedy"]


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
    """The updates not yet fully handled, in the store. Open it with ``Inbox.open``.
    It counts its depth and the retries in ``metrics``, and tells ``health`` of refused writes."""

    def __init__(
        self,
        db: Store,
        next_seq: int,
        pending: list[Entry] | None = None,
        metrics: Metrics | None = None,
        health: Health | None = None,
    ) -> None:
        self._db = db
        # No number below this one is given (entries recorded before NEXT_SEQ_KEY was kept
        # on a SQLite file); the store's counter decides above it.
        self._next_seq = next_seq
        self._finished: set[str] = set()  # keys of finished entries the store refused to drop
        # (room id, event id) of each entry not finished yet: what is not recorded twice
        self._waiting = {_identity(e.update): e.key for e in pending or ()}
        self.depth = len(pending or ())  # entries not finished yet (read when scraped)
        self._lock = asyncio.Lock()
        self._held = False  # see hold_token
        self._latest: str | None = None  # the token of the latest round recorded
        self._metrics = metrics or Metrics()
        self._metrics.inbox_depth.set_function(lambda: self.depth)
        self._health = health or Health()
        self._pruned_at = 0.0  # when the pushed marks were last pruned (see add_transaction)
        self._fence: Lease | None = None  # with replicas: the sync lease a round is fenced with

    async def lead(self, fence: Lease) -> None:
        """This replica syncs now, under ``fence``: rounds (and a start's catch-up) are
        recorded only while it holds the lease; what the inbox holds now is not recorded
        twice."""
        await self.pending()
        self._fence = fence
        self._held = False

    async def pending(self) -> list[Entry]:
        """What the inbox holds now, in order (with replicas, it is what all of them share);
        also what this replica counts as waiting, so the syncing one records nothing twice."""
        async with self._lock:  # not between a round's write and its bookkeeping
            entries = [Entry.from_json(key, data) for key, data in await self._db.scan(PREFIX)]
            self._waiting = {_identity(e.update): e.key for e in entries}
            self.depth = len(entries)
        return entries

    @classmethod
    async def open(
        cls, db: Store, metrics: Metrics | None = None, health: Health | None = None
    ) -> tuple[Inbox, list[Entry]]:
        """The inbox, and what it still holds from an earlier run, in order. An update held
        twice (its round recorded by a write whose success went unheard, then recorded again)
        is kept once, its first entry."""
        stored = [Entry.from_json(key, data) for key, data in await db.scan(PREFIX)]
        pending, seen, twice = [], set(), []
        for entry in stored:
            if (identity := _identity(entry.update)) in seen:
                twice.append(entry.key)
            else:
                seen.add(identity)
                pending.append(entry)
        if twice:
            async with db.transaction() as tx:
                for key in twice:
                    tx.delete(key)
            log.info("inbox.duplicates_dropped", entries=len(twice))
        next_seq = stored[-1].seq + 1 if stored else 0
        return cls(db, next_seq, pending, metrics, health), pending

    def hold_token(self) -> None:
        """A start without a token: record rounds but not their token until ``release``, so a
        crash before the start's catch-up is recorded starts without a token again."""
        self._held = True

    async def ingest(self, updates: list[Update], sync_token: str) -> list[Entry]:
        """Record a round: its updates and the token that follows it, atomically. Raises
        ``WriteFailed`` when the file refuses it; then nothing is recorded."""
        async with self._lock:  # a start's catch-up records its round beside the sync loop
            token = None if self._held else sync_token
            entries = await self._record(updates, token, self._fence)
            self._latest = sync_token
            return entries

    async def add(self, updates: list[Update]) -> list[Entry]:
        """Record updates of a start's catch-up (a window of its sweep); the token stays held."""
        async with self._lock:
            return await self._record(updates, None, self._fence)

    async def release(self) -> None:
        """The start's catch-up is recorded: keep the latest round's token, and tokens again."""
        async with self._lock:
            await self._record([], self._latest, self._fence)
            self._held = False

    async def add_transaction(self, txn_id: str, updates: list[Update]) -> list[Entry]:
        """Record a transaction the homeserver pushed (appservice mode), in one write: its
        updates but those of events already recorded, and its id, so that the same
        transaction again records nothing, whichever replica it was pushed to before. Not
        fenced: every replica listens. Raises ``WriteFailed`` when the file refuses it: then
        nothing is recorded, and the homeserver pushes it again."""
        async with self._lock:
            drop = await self._stale_marks(time.time())
            return await self._record(updates, None, None, txn_id, drop)

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
        fence: Lease | None,
        txn_id: str | None = None,
        drop: list[str] | None = None,
    ) -> list[Entry]:
        """Record what is not waiting already (nor, for a pushed transaction ``txn_id``,
        marked as pushed before); returns the new entries. Raises ``WriteFailed`` (nothing
        recorded), or ``LeaseLost`` when ``fence`` is no longer held."""
        new: dict[tuple[str, str], Update] = {}
        for update in updates:
            if (identity := _identity(update)) not in self._waiting:
                new.setdefault(identity, update)
        finished = set(self._finished)
        if not (new or sync_token is not None or txn_id is not None or drop or finished):
            return []

        async def numbered(tx: SerialTransaction) -> list[Entry]:
            fresh, marks = list(new.values()), []
            if txn_id is None:
                found = await tx.get_many([NEXT_SEQ_KEY])
            else:
                txn_mark = PUSHED_TXN + txn_id
                found = await tx.get_many(
                    [NEXT_SEQ_KEY, txn_mark, *(PUSHED_EVENT + u.event_id for u in fresh)]
                )
                if txn_mark in found:  # pushed again, to this replica or another: recorded
                    fresh = []
                else:
                    fresh = _not_marked(fresh, found)
                    marks = [txn_mark, *(PUSHED_EVENT + u.event_id for u in fresh)]
            first = max(int(found.get(NEXT_SEQ_KEY) or 0), self._next_seq)
            entries = [Entry(first + i, update) for i, update in enumerate(fresh)]
            tx.fence = fence
            if entries:
                tx.set(NEXT_SEQ_KEY, first + len(entries))
            for key in [*finished, *(drop or ())]:
                tx.delete(key)
            for entry in entries:
                tx.set(entry.key, entry.to_json())
            now = time.time()
            for key in marks:
                tx.set(key, now)
            if sync_token is not None:
                tx.set(SYNC_TOKEN_KEY, sync_token)
            return entries

        entries = await self._db.serialized(INBOX_LOCK, numbered)
        if len(entries) < len(updates):
            log.debug("inbox.already_recorded", updates=len(updates) - len(entries))
        self._finished -= finished
        if entries:
            self._next_seq = max(self._next_seq, entries[-1].seq + 1)
        self._waiting.update((_identity(e.update), e.key) for e in entries)
        self.depth += len(entries)
        return entries

    async def done(self, entry: Entry, fence: Lease | None = None) -> None:
        """The entry is finished. If the file refuses to drop it now, the next round drops it
        (a restart before then handles it again; its reply's transaction id dedups that).
        ``fence``: the room's lease (``LeaseLost`` when another replica has the room now)."""
        self.depth -= 1
        self._waiting.pop(_identity(entry.update), None)
        try:
            async with self._db.transaction() as tx:
                tx.fence = fence
                tx.delete(entry.key)
        except StoreRefused as err:
            self._finished.add(entry.key)
            self._refused("done", entry, err)

    async def started(self, entry: Entry, fence: Lease) -> None:
        """With replicas: mark the entry as started before it is handled, under the room's
        lease (``LeaseLost`` if it is gone), so a replica that takes the room over after a
        kill looks in the room for the answer first (``Update.may_be_answered``)."""
        marked = replace(entry, update=replace(entry.update, replayed=True))
        async with self._db.transaction() as tx:
            tx.fence = fence
            tx.set(entry.key, marked.to_json())

    async def postpone(self, entry: Entry, delay_s: float, fence: Lease | None = None) -> Entry:
        """Keep the entry for another attempt in ``delay_s`` seconds (survives a restart, unless
        the file refuses the write: then only this run remembers the attempt)."""
        self._metrics.retries_scheduled.inc()
        later = Entry(
            entry.seq,
            replace(entry.update, attempt=entry.update.attempt + 1),
            time.time() + delay_s,
        )
        try:
            async with self._db.transaction() as tx:
                tx.fence = fence
                tx.set(later.key, later.to_json())
        except StoreRefused as err:
            self._refused("postpone", entry, err)
        return later

    def _refused(self, during: str, entry: Entry, fault: StoreRefused) -> None:
        self._health.store_refused(str(fault))
        log.error(
            "store.write_failed",
            during=during,
            room_id=entry.update.room_id,
            event_id=entry.update.event_id,
            error=str(fault),
            remedy=fault.remedy,
        )


def _not_marked(updates: list[Update], marks: dict[str, Any]) -> list[Update]:
    """The updates of a pushed transaction whose event no earlier one recorded, each once."""
    fresh: dict[str, Update] = {}
    for update in updates:
        if PUSHED_EVENT + update.event_id not in marks:
            fresh.setdefault(update.event_id, update)
    return list(fresh.values())


def _identity(update: Update) -> tuple[str, str]:
    """What makes two updates the same: a room's event (an invite, a catch-up or a count of
    missed messages has an id of its own, made from its room and sync position)."""
    return update.room_id, update.event_id
