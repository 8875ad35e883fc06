"""Replicas of one bot on one PostgreSQL (SPEC §10, Replicas): who is alive, and leases with a
fencing term (the shape of River's leader lease). The SQL of coordination lives here; the
adapter uses it through ``Coordinator``.

A lease is a row ``(name, holder, term, expires_at)``. It is taken only when free, expired or
released, and every taking makes its term grow, so a write fenced with an older term
(``Transaction.fence``) or a check of it (``holds``) fails once another replica took it.
Expiry is reckoned by the database's clock (``now()``), never a replica's. A replica renews
what it holds about every second and gives it up on purpose when done.

With a SQLite file there is one process: ``SoleCoordinator`` holds every lease at once, so the
same code runs without a database round trip.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import asyncpg
import structlog

from core.store.contract import Lease, StoreRefused
from core.store.postgres import LEASES_TABLE, REPLICAS_TABLE, PostgresStore

log = structlog.get_logger()

LEASE_TTL_S = 3.0  # a lease not renewed for this long may be taken by another replica
LIVE_WITHIN_S = 5.0  # a replica not seen for this long is not counted among the live
INBOX_CHANNEL = "lambda_inbox"  # NOTIFY: the inbox holds new entries

_ACQUIRE = (
    f"INSERT INTO {LEASES_TABLE} AS l (name, holder, term, expires_at) "
    "VALUES ($1, $2, 1, now() + make_interval(secs => $3)) "
    "ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, term = l.term + 1, "
    "expires_at = EXCLUDED.expires_at "
    "WHERE l.holder = '' OR l.expires_at < now() RETURNING term"
)
_RENEW = (
    f"UPDATE {LEASES_TABLE} SET expires_at = now() + make_interval(secs => $4) "
    "WHERE holder = $1 AND (name, term) IN (SELECT * FROM unnest($2::text[], $3::bigint[])) "
    "RETURNING name"
)
_RELEASE = (
    f"UPDATE {LEASES_TABLE} SET holder = '', expires_at = now() "
    "WHERE holder = $1 AND (name, term) IN (SELECT * FROM unnest($2::text[], $3::bigint[]))"
)
_HEARTBEAT = (
    f"INSERT INTO {REPLICAS_TABLE} (id, host, pid, started_at, last_seen, syncing, rooms) "
    "VALUES ($1, $2, $3, now(), now(), $4, $5) ON CONFLICT (id) DO UPDATE SET "
    "last_seen = now(), syncing = EXCLUDED.syncing, rooms = EXCLUDED.rooms"
)
_LIVE = f"SELECT count(*) FROM {REPLICAS_TABLE} WHERE last_seen > now() - make_interval(secs => $1)"
_FORGET_DEAD = f"DELETE FROM {REPLICAS_TABLE} WHERE last_seen < now() - interval '1 hour'"


def new_replica_id() -> str:
    """Random, with the host and pid for the humans reading logs and the doctor."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class ReplicaSeen:
    """One replica as the doctor shows it."""

    id: str
    host: str
    pid: int
    started_at: datetime
    last_seen: datetime
    syncing: bool
    rooms: int
    live: bool


class Coordinator(Protocol):
    """What replicas share beside the store: liveness, leases, wake-ups."""

    replica: str
    shared: bool  # False: one process, every lease is its own

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def heartbeat(self, syncing: bool, rooms: int) -> None:
        """This replica is alive (``StoreRefused`` when the database cannot be reached)."""
        ...

    async def live_replicas(self) -> int: ...

    async def acquire(self, name: str) -> Lease | None:
        """The lease, with a new term, if it is free or expired; else None."""
        ...

    async def renew(self, leases: list[Lease]) -> set[str]:
        """Extend ``leases``; returns the names of those still ours."""
        ...

    async def release(self, leases: list[Lease]) -> None: ...

    async def holds(self, lease: Lease) -> bool:
        """Still ours, checked at the database (and extended: what follows the check has a
        whole TTL before another replica may take it)."""
        ...

    async def notify_inbox(self) -> None: ...

    async def wait_inbox(self, timeout: float) -> None:
        """Until the inbox got new entries (NOTIFY) or ``timeout`` seconds passed."""
        ...


class SoleCoordinator:
    """One process (a SQLite file): every lease is held, nothing is asked of a database."""

    shared = False

    def __init__(self, replica: str | None = None) -> None:
        self.replica = replica or new_replica_id()
        self._terms: dict[str, int] = {}
        self._woken = asyncio.Event()

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def heartbeat(self, syncing: bool, rooms: int) -> None:
        pass

    async def live_replicas(self) -> int:
        return 1

    async def acquire(self, name: str) -> Lease | None:
        self._terms[name] = self._terms.get(name, 0) + 1
        return Lease(name, self.replica, self._terms[name])

    async def renew(self, leases: list[Lease]) -> set[str]:
        return {lease.name for lease in leases}

    async def release(self, leases: list[Lease]) -> None:
        pass

    async def holds(self, lease: Lease) -> bool:
        return True

    async def notify_inbox(self) -> None:
        self._woken.set()

    async def wait_inbox(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._woken.wait(), timeout)
        except TimeoutError:
            pass
        self._woken.clear()


class PostgresCoordinator:
    """Replicas on the PostgreSQL store's database (tables of migration 2)."""

    shared = True

    def __init__(self, store: PostgresStore, replica: str | None = None) -> None:
        self.replica = replica or new_replica_id()
        self._store = store
        self._pool = store.pool
        self._woken = asyncio.Event()
        self._listener: asyncpg.Connection | None = None

    async def start(self) -> None:
        await self._listen()

    async def _listen(self) -> None:
        """A connection of its own waits for NOTIFY; if it breaks, the poll still finds work."""
        try:
            self._listener = await self._pool.acquire()
            await self._listener.add_listener(INBOX_CHANNEL, self._on_notify)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as err:
            log.info("replica.listen_failed", error=str(err) or type(err).__name__)
            await self._drop_listener()

    async def _drop_listener(self) -> None:
        if self._listener is not None:
            try:
                await self._pool.release(self._listener)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                pass
            self._listener = None

    def _on_notify(self, *_: Any) -> None:
        self._woken.set()

    async def close(self) -> None:
        try:
            await self._run(
                lambda c: c.execute(f"DELETE FROM {REPLICAS_TABLE} WHERE id = $1", self.replica)
            )
        except StoreRefused:
            pass
        if self._listener is not None:
            try:
                await self._listener.remove_listener(INBOX_CHANNEL, self._on_notify)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                pass
        await self._drop_listener()

    async def heartbeat(self, syncing: bool, rooms: int) -> None:
        host, pid = socket.gethostname(), os.getpid()
        await self._run(lambda c: c.execute(_HEARTBEAT, self.replica, host, pid, syncing, rooms))
        if self._listener is None or self._listener.is_closed():
            self._listener = None
            await self._listen()

    async def live_replicas(self) -> int:
        return int(await self._run(lambda c: c.fetchval(_LIVE, LIVE_WITHIN_S)))

    async def acquire(self, name: str) -> Lease | None:
        term = await self._run(lambda c: c.fetchval(_ACQUIRE, name, self.replica, LEASE_TTL_S))
        return None if term is None else Lease(name, self.replica, int(term))

    async def renew(self, leases: list[Lease]) -> set[str]:
        if not leases:
            return set()
        names, terms = [x.name for x in leases], [x.term for x in leases]
        rows = await self._run(lambda c: c.fetch(_RENEW, self.replica, names, terms, LEASE_TTL_S))
        return {row["name"] for row in rows}

    async def release(self, leases: list[Lease]) -> None:
        if leases:
            names, terms = [x.name for x in leases], [x.term for x in leases]
            await self._run(lambda c: c.execute(_RELEASE, self.replica, names, terms))

    async def holds(self, lease: Lease) -> bool:
        return lease.name in await self.renew([lease])

    async def notify_inbox(self) -> None:
        await self._run(lambda c: c.execute("SELECT pg_notify($1, '')", INBOX_CHANNEL))

    async def wait_inbox(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._woken.wait(), timeout)
        except TimeoutError:
            pass
        self._woken.clear()

    async def _run(self, call: Callable[[asyncpg.Connection], Any]) -> Any:
        return await self._store._run(call)


async def replicas_seen(pool: asyncpg.Pool) -> list[ReplicaSeen]:
    """The replicas that were seen within the last hour (the doctor's list), oldest first."""
    async with pool.acquire() as conn:
        await conn.execute(_FORGET_DEAD)
        rows = await conn.fetch(
            f"SELECT *, last_seen > now() - make_interval(secs => $1) AS live "
            f"FROM {REPLICAS_TABLE} ORDER BY started_at",
            LIVE_WITHIN_S,
        )
    return [ReplicaSeen(**dict(row)) for row in rows]


async def sync_holder(pool: asyncpg.Pool) -> str | None:
    """The replica that holds the sync lease now, if any."""
    async with pool.acquire() as conn:
        return await conn.fetchval(
            f"SELECT holder FROM {LEASES_TABLE} WHERE name = 'sync' AND holder <> '' "
            "AND expires_at > now()"
        )


def coordinator_for(store: Any) -> Coordinator:
    """Replicas share a PostgreSQL store; a SQLite file is one process."""
    if isinstance(store, PostgresStore):
        return PostgresCoordinator(store)
    return SoleCoordinator()
