"""One contract, every backend (mautrix-python's ``state_store/tests/store_test.py`` is the
model): each test runs on a SQLite file and on a fresh PostgreSQL database, through the
``Store`` contract only, and through the records the bot keeps on it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict
from pathlib import Path

import pytest

from adapter.matrix.delivery.inbox import PREFIX as INBOX_PREFIX
from adapter.matrix.delivery.inbox import Entry, Inbox
from adapter.matrix.ingest.update import Update
from adapter.matrix.store.records import Creation, MatrixStore, Pending, RoomMeta, UserMeta
from core.chat import ChatManager
from core.store import Birth, BirthCause, Store, open_store
from core.store.contract import SerialTransaction

Opener = Callable[..., Awaitable[Store]]


@pytest.fixture(params=["sqlite", "postgresql"])
def reopen(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    """Opens the test's store (the same file or database at each call)."""
    location = (
        str(tmp_path / "t.db") if request.param == "sqlite" else request.getfixturevalue("pg_url")
    )

    async def opener(birth_cause: BirthCause = "store_missing") -> Store:
        return await open_store(location, birth_cause)

    return opener


@pytest.fixture
async def db(reopen: Opener) -> AsyncIterator[Store]:
    store = await reopen()
    yield store
    await store.close()


def update(n: int, room: str = "!r:x") -> Update:
    return Update("message", room, "@alice:x", f"$e{n}", f"message {n}", ts=n)


async def test_get_set_delete_round_trip_json(db):
    assert db.created
    value = {"x": [1, "two", None, 3.5], "nul": "a\x00b", "é": "\U0001f600"}
    await db.set("a", value)
    assert await db.get("a") == value
    await db.set("a", "replaced")
    assert await db.get("a") == "replaced"
    await db.delete("a")
    assert await db.get("a") is None
    await db.delete("never there")


async def test_prefix_scan_is_literal_case_sensitive_and_ordered(db):
    for key in ["chat:@a:x:2", "chat:@a:x:1", "chat:@ab:x:1", "chat:@A:x:1", "CHAT:@a:x:3"]:
        await db.set(key, key)
    for key in ["a%b", "a%c", "axb", "a_b", "a_", "aXb", "a\\b"]:
        await db.set(key, key)
    assert [k for k, _ in await db.scan("chat:@a:")] == ["chat:@a:x:1", "chat:@a:x:2"]
    assert [k for k, _ in await db.scan("chat:@A:")] == ["chat:@A:x:1"]
    assert [k for k, _ in await db.scan("a%")] == ["a%b", "a%c"]
    assert [k for k, _ in await db.scan("a_")] == ["a_", "a_b"]
    assert [k for k, _ in await db.scan("a\\")] == ["a\\b"]
    assert [v for _, v in await db.scan("chat:@a:x:1")] == ["chat:@a:x:1"]


@pytest.mark.parametrize("prefix", ["k\U0010ffff", "\U0010ffff\U0010ffff", "k\ud7ff", "k", ""])
async def test_prefix_scan_at_the_edges_of_unicode(db, prefix):
    """Keys order by code point on every backend (PostgreSQL's own collation would not), and
    a prefix ending in the highest code point, or just below the surrogates, still bounds
    the range; an empty prefix lists everything."""
    keys = [
        "k",
        "k\ud7ff",
        "k\ud7ffz",
        "k\ue000",
        "kZ",
        "ka",
        "k\U0010ffff",
        "k\U0010ffff\U0010ffffz",
        "l",
        "\U0010ffff",
        "\U0010ffff\U0010ffff",
        "\U0010ffff\U0010ffffa",
    ]
    for key in keys:
        await db.set(key, 1)
    got = [k for k, _ in await db.scan(prefix)]
    assert got == sorted(k for k in [*keys, "birth"] if k.startswith(prefix))


async def test_a_transaction_is_all_or_nothing(db):
    await db.set("keep", 1)
    with pytest.raises(RuntimeError):
        async with db.transaction() as tx:
            tx.set("a", 1)
            tx.delete("keep")
            raise RuntimeError("boom")
    assert await db.get("a") is None and await db.get("keep") == 1
    async with db.transaction() as tx:
        tx.set("a", 1)
        tx.delete("keep")
    assert await db.get("a") == 1 and await db.get("keep") is None


async def test_a_transaction_applies_its_writes_in_order(db):
    await db.set("b", "old")
    async with db.transaction() as tx:
        tx.set("a", 1)
        tx.delete("a")
        tx.delete("b")
        tx.set("b", 2)
        tx.set("c", 1)
        tx.set("c", 3)
    assert await db.scan("") == [("b", 2), ("birth", asdict(db.birth)), ("c", 3)]


async def test_many_concurrent_writers_all_land(db):
    await asyncio.gather(*(db.set(f"w:{i:03d}", i) for i in range(64)))
    assert [v for _, v in await db.scan("w:")] == list(range(64))


async def other_process(db: Store, reopen: Opener) -> Store:
    """The same database as another process sees it (a SQLite file is one process's)."""
    return db if db.engine == "sqlite" else await reopen()


async def test_serialized_read_modify_writes_of_two_processes_never_interleave(db, reopen):
    """Each one reads what the one before it wrote, whichever process ran it: no number is
    handed out twice and none is lost, however many run at once."""
    other = await other_process(db, reopen)

    async def take(tx: SerialTransaction) -> int:
        n = (await tx.get_many(["counter", "absent"])).get("counter", 0)
        await asyncio.sleep(0)  # let the others run between the read and the write
        tx.set("counter", n + 1)
        tx.set(f"taken:{n:03d}", n)
        return n

    taken = await asyncio.gather(*(store.serialized("c", take) for store in (db, other) * 16))
    assert sorted(taken) == list(range(32))
    assert await db.get("counter") == 32 and len(await db.scan("taken:")) == 32
    if other is not db:
        await other.close()


async def test_serialized_work_that_raises_writes_nothing(db):
    async def fail(tx: SerialTransaction) -> None:
        tx.set("a", 1)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await db.serialized("c", fail)
    assert await db.get("a") is None


async def test_replicas_recording_pushed_transactions_at_once_number_them_apart(db, reopen):
    """Appservice mode with replicas: every replica records what is pushed to it. Two at once
    never give one number twice; a transaction pushed to both (a retry that landed on the
    other) and an event pushed again are recorded once; and one after another, as the
    homeserver pushes, whoever records, numbers follow the order they were recorded in."""
    other = await other_process(db, reopen)
    a, _ = await Inbox.open(db)
    b, _ = await Inbox.open(other)

    async def push(inbox: Inbox, numbers: range) -> None:
        for n in numbers:
            await inbox.add_transaction(f"t{n}", [update(n, f"!r{n % 3}:x")])

    # Each replica its own transactions, and the last ones to both.
    await asyncio.gather(push(a, range(0, 10)), push(b, range(10, 20)))
    await asyncio.gather(push(a, range(20, 25)), push(b, range(20, 25)))
    assert await b.add_transaction("again", [update(7, "!r1:x")]) == []
    stored = [Entry.from_json(key, data) for key, data in await db.scan(INBOX_PREFIX)]
    assert sorted(e.update.event_id for e in stored) == sorted(f"$e{n}" for n in range(25))
    in_turn = [
        *await a.ingest([update(100)], "token"),  # a syncing replica numbers from the same count
        *[
            e
            for n in range(101, 107)
            for e in await (a, b)[n % 2].add_transaction(f"s{n}", [update(n)])
        ],
    ]
    assert [e.update.event_id for e in in_turn] == [f"$e{n}" for n in range(100, 107)]
    assert [e.seq for e in in_turn] == sorted(e.seq for e in in_turn)
    assert in_turn[0].seq > max(e.seq for e in stored)
    if other is not db:
        await other.close()


async def test_a_new_store_records_its_birth_and_keeps_it_across_reopens(reopen):
    store = await reopen("local_reset")
    born = store.birth
    assert store.created and born is not None and born.cause == "local_reset"
    assert born.at <= time.time()
    await store.set("k", "v")
    await store.close()
    store = await reopen()  # reopened by the bot: still the reset's
    assert not store.created and store.birth == born and await store.get("k") == "v"
    await store.close()


async def test_a_legacy_reset_marker_reads_as_a_local_reset_birth(reopen):
    store = await reopen()
    await store.delete("birth")
    await store.set("reset_marker", {"at": "2026-01-02T03:04:05Z", "by": "reset_local"})
    await store.close()
    store = await reopen()
    assert store.birth == Birth(1767323045, "local_reset")
    await store.close()


async def test_the_inbox_keeps_a_round_and_its_token_together_across_reopens(reopen):
    store = await reopen()
    inbox, pending = await Inbox.open(store)
    assert pending == []
    first = await inbox.ingest([update(1), update(2, "!s:x")], "token-1")
    await inbox.ingest([update(3)], "token-2")
    await inbox.done(first[0])
    await store.close()

    store = await reopen()
    inbox, pending = await Inbox.open(store)
    assert [e.update.event_id for e in pending] == ["$e2", "$e3"]
    assert await MatrixStore(store).get_sync_token() == "token-2"
    assert inbox.depth == 2
    later = await inbox.ingest([update(4)], "token-3")
    assert later[0].seq > pending[-1].seq  # numbering goes on after what was left
    await store.close()


async def test_an_update_recorded_twice_is_one_entry(reopen):
    """A sync round fetched again (the same room and event ids) adds nothing already waiting;
    also in a later run, and also within one round."""
    store = await reopen()
    inbox, _ = await Inbox.open(store)
    assert len(await inbox.ingest([update(1), update(2)], "token-1")) == 2
    again = await inbox.ingest([update(2), update(3), update(3)], "token-2")
    assert [e.update.event_id for e in again] == ["$e3"]
    assert len(await store.scan(INBOX_PREFIX)) == 3
    await store.close()

    store = await reopen()
    inbox, pending = await Inbox.open(store)
    assert await inbox.ingest([update(1), update(3)], "token-3") == []
    assert [e.update.event_id for e in (await Inbox.open(store))[1]] == ["$e1", "$e2", "$e3"]
    assert await MatrixStore(store).get_sync_token() == "token-3"  # the token moves on
    await inbox.done(pending[0])  # finished: a later round that holds it again records it
    assert len(await inbox.ingest([update(1)], "token-4")) == 1
    assert inbox.depth == 3
    await store.close()


async def test_records_of_rooms_users_pending_confirmations_and_creations(db):
    records = MatrixStore(db)
    await records.set_user("@a:x", UserMeta("!space:x", "!lobby:x"))
    async with records.transaction() as tx:
        await records.set_room("!c:x", RoomMeta("chat", "@a:x", "abc", "!space:x"), tx)
        await records.set_room("!space:x", RoomMeta("space", "@a:x"), tx)
        await records.set_created("$new", Creation("abc", "Chat 2"), tx)
    await records.set_pending("!c:x", Pending("archive", "abc", 123.0))
    assert await records.get_user("@a:x") == UserMeta("!space:x", "!lobby:x")
    assert await records.chat_rooms_of("@a:x") == {"abc": "!c:x"}
    assert await records.get_pending("!c:x") == Pending("archive", "abc", 123.0)
    assert await records.get_created("$new") == Creation("abc", "Chat 2")
    await records.set_created("$new", Creation("abc", "Chat 2", "!c:x"))
    assert await records.get_created("$new") == Creation("abc", "Chat 2", "!c:x")
    await records.set_pending("!c:x", None)
    assert await records.get_pending("!c:x") is None


async def test_chats_of_the_core(db):
    chats = ChatManager(db)
    made = await chats.get_or_create("@a:x", "c1", "Ünïcode ✓")
    await chats.get_or_create("@a:x", "c2", "Two")
    await chats.archive("@a:x", "c2")
    assert [c.chat_id for c in await chats.list_active("@a:x")] == ["c1"]
    assert (await chats.rename("@a:x", "c1", "Renamed")).title == "Renamed"
    assert (await chats.get("@a:x", "c1")).created_at == made.created_at


async def test_an_update_the_store_holds_twice_is_handled_once_after_a_restart(reopen):
    """A round whose write succeeded unheard (the connection broke after the commit) and
    was then recorded again: the next start keeps its first entry only."""
    store = await reopen()
    inbox, _ = await Inbox.open(store)
    [first] = await inbox.ingest([update(1)], "token-1")
    await store.set(f"{INBOX_PREFIX}{first.seq + 1:012d}", first.to_json())  # the same again
    await store.close()

    store = await reopen()
    _, pending = await Inbox.open(store)
    assert [(e.seq, e.update.event_id) for e in pending] == [(first.seq, "$e1")]
    assert [key for key, _ in await store.scan(INBOX_PREFIX)] == [first.key]
    await store.close()
