"""Leases with a fence on the real PostgreSQL (core.store.coordination): a lease is taken when
free, expired or released, each taking raises its term, and a write fenced with an older term
is refused whole. With a SQLite file every lease is the one process's."""

from __future__ import annotations

import asyncio

import asyncpg

from core.store import PostgresStore, coordination
from core.store.contract import Lease, LeaseLost
from core.store.coordination import (
    LEASES_TABLE,
    PostgresCoordinator,
    SoleCoordinator,
    renewed,
    replicas_seen,
    sync_holder,
)


async def expire(url: str, name: str) -> None:
    """What a stall past the TTL leaves: the row's expiry in the past (the DB's clock)."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            f"UPDATE {LEASES_TABLE} SET expires_at = now() - interval '1 second' WHERE name = $1",
            name,
        )
    finally:
        await conn.close()


async def live(store: PostgresStore) -> set[str]:
    return {r.id for r in await replicas_seen(store.pool) if r.live}


async def test_a_lease_goes_to_one_replica_and_to_another_only_once_expired(pg_url):
    store = await PostgresStore.open(pg_url)
    a, b = PostgresCoordinator(store, "a"), PostgresCoordinator(store, "b")
    try:
        first = await a.acquire("sync")
        assert first == Lease("sync", "a", 1)
        assert await b.acquire("sync") is None
        assert await a.holds(first)
        await expire(pg_url, "sync")
        second = await b.acquire("sync")
        assert second == Lease("sync", "b", 2)
        assert not await a.holds(first)  # the stalled one learns it lost the lease
        assert await a.renew([first]) == set()
        await b.release([second])
        assert (await a.acquire("sync")) == Lease("sync", "a", 3)
    finally:
        await store.close()


async def test_a_write_fenced_with_a_lost_term_is_refused_whole(pg_url):
    store = await PostgresStore.open(pg_url)
    a, b = PostgresCoordinator(store, "a"), PostgresCoordinator(store, "b")
    try:
        mine = await a.acquire("room:!r")
        assert mine is not None
        async with store.transaction() as tx:
            tx.fence = mine
            tx.set("inbox:000000000001", {"n": 1})
        await expire(pg_url, "room:!r")
        assert await b.acquire("room:!r") is not None
        try:
            async with store.transaction() as tx:
                tx.fence = mine
                tx.delete("inbox:000000000001")
                tx.set("sync_token", "stale")
        except LeaseLost:
            pass
        else:
            raise AssertionError("a write fenced with a lost term was kept")
        assert await store.get("inbox:000000000001") == {"n": 1}
        assert await store.get("sync_token") is None
    finally:
        await store.close()


async def test_replicas_are_seen_live_with_what_they_hold(pg_url):
    store = await PostgresStore.open(pg_url)
    a, b = PostgresCoordinator(store, "a"), PostgresCoordinator(store, "b")
    try:
        await a.heartbeat(syncing=True, rooms=2)
        await b.heartbeat(syncing=False, rooms=0)
        assert await live(store) == {"a", "b"}
        await a.acquire("sync")
        assert await sync_holder(store.pool) == "a"
        seen = {r.id: (r.syncing, r.rooms, r.live) for r in await replicas_seen(store.pool)}
        assert seen == {"a": (True, 2, True), "b": (False, 0, True)}
        await b.close()
        assert await live(store) == {"a"}
    finally:
        await store.close()


async def test_one_process_holds_every_lease():
    sole = SoleCoordinator("me")
    lease = await sole.acquire("room:!r")
    assert lease is not None and await sole.holds(lease)
    assert await sole.acquire("room:!r") is not None  # nobody else to take it from


async def test_a_lease_whose_holder_session_is_gone_is_taken_before_its_expiry(pg_url):
    """kill -9 closes the holder's sessions: its lease is taken at once. While its session is
    up (a stall), the lease stays its own until the expiry."""
    mine, theirs = await PostgresStore.open(pg_url), await PostgresStore.open(pg_url)
    a, b = PostgresCoordinator(mine, "a"), PostgresCoordinator(theirs, "b")
    try:
        await a.start()
        await a.heartbeat(syncing=False, rooms=1)
        held = await a.acquire("room:!r")
        assert held is not None
        await later(pg_url, "room:!r")  # no expiry in sight: only the session can free it
        assert await b.acquire("room:!r") is None  # alive (or stalled): kept
        assert await live(theirs) == {"a"}
        assert a._listener is not None
        a._listener.terminate()  # what the kernel does to a killed process's sockets
        for _ in range(200):  # until PostgreSQL has ended that session
            if (taken := await b.acquire("room:!r")) is not None:
                break
            await asyncio.sleep(0.01)
        assert taken == Lease("room:!r", "b", held.term + 1)
        assert await live(theirs) == set()  # a is not counted: b never beat
        assert not await a.holds(held)  # a (were it alive) holds nothing without its session
    finally:
        await mine.close()
        await theirs.close()


async def test_a_replica_without_a_session_is_not_taken_for_dead(pg_url):
    """A replica that never opened a session (or recorded none) keeps its leases until the
    TTL, whatever pg_stat_activity lists."""
    store = await PostgresStore.open(pg_url)
    a, b = PostgresCoordinator(store, "a"), PostgresCoordinator(store, "b")
    try:
        await a.heartbeat(syncing=False, rooms=1)
        assert await a.acquire("room:!r") is not None
        await later(pg_url, "room:!r")
        assert await b.acquire("room:!r") is None
    finally:
        await store.close()


async def later(url: str, name: str) -> None:
    """The lease's expiry an hour away (the DB's clock)."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            f"UPDATE {LEASES_TABLE} SET expires_at = now() + interval '1 hour' WHERE name = $1",
            name,
        )
    finally:
        await conn.close()


async def test_a_lease_is_kept_renewed_while_a_slow_block_runs(monkeypatch):
    monkeypatch.setattr(coordination, "RENEW_EVERY_S", 0.01)
    renewals: list[list[Lease]] = []
    thrice = asyncio.Event()

    class Counting(SoleCoordinator):
        async def renew(self, leases: list[Lease]) -> set[str]:
            renewals.append(leases)
            if len(renewals) >= 3:
                thrice.set()
            return {lease.name for lease in leases}

    sole = Counting("me")
    lease = await sole.acquire("login")
    assert lease is not None
    async with renewed(sole, lease):
        await asyncio.wait_for(thrice.wait(), 10)  # a login slower than the renewals
    assert all(each == [lease] for each in renewals)
