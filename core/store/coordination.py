"""Replicas of one bot on one PostgreSQL (SPEC §10, Replicas): who is alive, and leases with a
fencing term (the shape of River's leader lease). The SQL of coordination lives here; the
adapter uses it through ``Coordinator``.

A lease is a row ``(name, holder, term, expires_at)``. It is taken only when free, expired or
released, and every taking makes its term grow, so a write fenced with an older term
(``Transaction.fence``) or a check of it (``holds``) fails once another replica took it.
Expiry is reckoned by the database's clock (``now()``), never a replica's. A replica renews
what it holds about every second and gives it up on purpose when done.

A replica that dies on a live machine (kill -9, a crash) has its PostgreSQL sessions closed
by the kernel at once. Each replica keeps one long-lived connection (the one that LISTENs),
named after it (``application_name``), and records that name with its heartbeat: a lease
whose holder recorded a session that PostgreSQL no longer lists (``pg_stat_activity``; the
replicas share one role, so they see each other's names) is taken at once, not at its
expiry. A replica that stalls (SIGSTOP, a long pause) keeps its session, so its leases last
until the TTL as before; a lost machine (no session closed) falls back to the TTL too. A
replica holds leases only while its own session is up.

With a SQLite file there is one process: ``SoleCoordinator`` holds every lease at once, so the
same code runs without a database round trip.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import asyncpg
import structlog

from core.store.contract import Lease, StoreRefused
from core.store.postgres import (
    APPLICATION_NAME_MAX,
    BOT_APPLICATION,
    LEASES_TABLE,
    REPLICAS_TABLE,
    PostgresStore,
)

log = structlog.get_logger()

LEASE_TTL_S = 3.0  # a lease not renewed for this long may be taken by another replica
RENEW_EVERY_S = 1.0  # how often a held lease is renewed
LIVE_WITHIN_S = 5.0  # a replica not seen for this long is not counted among the live
INBOX_CHANNEL = "lambda_inbox"  # NOTIFY: the inbox holds new entries

HOST_IN_ID = 24  # characters of the host name kept in a replica's id (see new_replica_id)
# The replica ``r`` recorded a session that PostgreSQL no longer lists: its process is gone.
_GONE = (
    "(r.session IS NOT NULL AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a "
    "WHERE a.datname = current_database() AND a.application_name = r.session))"
)
# ``prior``: who held it, and whether its expiry was still ahead (for the log only).
_ACQUIRE = (
    f"WITH prior AS (SELECT holder, expires_at > now() AS running FROM {LEASES_TABLE} "
    "WHERE name = $1) "
    f"INSERT INTO {LEASES_TABLE} AS l (name, holder, term, expires_at) "
    "VALUES ($1, $2, 1, now() + make_interval(secs => $3)) "
    "ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, term = l.term + 1, "
    "expires_at = EXCLUDED.expires_at "
    "WHERE l.holder = '' OR l.expires_at < now() OR l.holder <> $2 AND EXISTS "
    f"(SELECT 1 FROM {REPLICAS_TABLE} r WHERE r.id = l.holder AND {_GONE}) "
    "RETURNING term, (SELECT holder FROM prior) AS was, (SELECT running FROM prior) AS running"
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
# Seen within LIVE_WITHIN_S, and its session (if it recorded one) still listed.
_LIVE_WHERE = f"r.last_seen > now() - make_interval(secs => $1) AND NOT {_GONE}"
# The heartbeat, and in the same round trip the other live replicas' ids.
_HEARTBEAT = (
    f"WITH beat AS (INSERT INTO {REPLICAS_TABLE} "
    "(id, host, pid, started_at, last_seen, syncing, rooms, session) "
    "VALUES ($2, $3, $4, now(), now(), $5, $6, $7) ON CONFLICT (id) DO UPDATE SET "
    "last_seen = now(), syncing = EXCLUDED.syncing, rooms = EXCLUDED.rooms, "
    "session = EXCLUDED.session RETURNING id) "
    f"SELECT (SELECT array_agg(r.id) FROM {REPLICAS_TABLE} r WHERE r.id <> $2 AND {_LIVE_WHERE}) "
    "AS others, EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.datname = current_database() "
    "AND a.application_name = $7) AS listed"
)
_FORGET_DEAD = f"DELETE FROM {REPLICAS_TABLE} WHERE last_seen < now() - interval '1 hour'"


async def _woken_within(woken: asyncio.Event, timeout: float) -> None:
    """Until ``woken`` is set (the inbox got entries) or ``timeout`` seconds passed; then
    cleared for the next wait."""
    try:
        await asyncio.wait_for(woken.wait(), timeout)
    except TimeoutError:
        pass
    woken.clear()


def new_replica_id() -> str:
    """Random, with the host and pid for the humans reading logs and the doctor; short and
    plain enough to be kept whole in its session's name (``session_name``)."""
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:HOST_IN_ID] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


def session_name(replica: str) -> str:
    """The ``application_name`` of the replica's long-lived connection. An id too long for
    it is cut: two replicas cut alike would each be taken for alive while the other is, so
    the cut errs on the side of waiting for the TTL."""
    return f"{BOT_APPLICATION} {replica}"[:APPLICATION_NAME_MAX]


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

    async def heartbeat(self, syncing: bool, rooms: int) -> list[str]:
        """This replica is alive; returns the ids of the live replicas, this one first
        (``StoreRefused`` when the database cannot be reached)."""
        ...

    async def acquire(self, name: str) -> Lease | None:
        """The lease, with a new term, if it is free or expired; else None."""
        ...

    async def renew(self, leases: list[Lease]) -> set[str]:
        """Extend ``leases``; returns the names of those still ours."""
        ...

    async def release(self, leases: list[Lease]) -> None: ...

    async def holds(self, lease: Lease) -> bool:
        """Still ours, checked at the database (and extended: what follows the check has a
        whole TTL before another replica may take it, unless this replica's session ends)."""
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

    async def heartbeat(self, syncing: bool, rooms: int) -> list[str]:
        return [self.replica]

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
        await _woken_within(self._woken, timeout)


class PostgresCoordinator:
    """Replicas on the PostgreSQL store's database (tables of migrations 2 and 3)."""

    shared = True

    def __init__(self, store: PostgresStore, replica: str | None = None) -> None:
        self.replica = replica or new_replica_id()
        self._store = store
        self._pool = store.pool
        self._woken = asyncio.Event()
        self._listener: asyncpg.Connection | None = None
        self._started = False
        # The name of this replica's long-lived session, once ``start`` made it: from then on
        # others take its leases as soon as that session is gone, so it holds none without it.
        self._session: str | None = None

    async def start(self) -> None:
        self._started, self._session = True, session_name(self.replica)
        await self._listen()

    def _listening(self) -> bool:
        try:
            return self._listener is not None and not self._listener.is_closed()
        except asyncpg.InterfaceError:  # the pool took it back: it broke
            return False

    async def _listen(self) -> None:
        """A connection of its own waits for NOTIFY, and is the session by which the others
        know this replica is alive; if it breaks, the poll still finds work, and the next
        heartbeat opens it again."""
        try:
            self._listener = await self._pool.acquire()
            if self._session is not None:
                await self._listener.execute(
                    "SELECT set_config('application_name', $1, false)", self._session
                )
                if self._listener.get_server_version().major >= 14:
                    # It sits idle between notifications: an operator's idle_session_timeout
                    # must not end it (the others would take this live replica's leases).
                    await self._listener.execute("SET idle_session_timeout = 0")
                seen = await self._listener.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = pg_backend_pid() "
                    "AND application_name = $1",
                    self._session,
                )
                if not seen:  # the others could not tell it alive: leases only by the TTL
                    log.error("replica.session_unseen", session=self._session)
                    self._session = None
            await self._listener.add_listener(INBOX_CHANNEL, self._on_notify)
            self._listener.add_termination_listener(self._on_session_end)
            log.info("replica.session_opened", session=self._session)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as err:
            log.info("replica.listen_failed", error=str(err) or type(err).__name__)
            await self._drop_listener()

    def _on_session_end(self, _: asyncpg.Connection) -> None:
        log.warning("replica.session_lost", session=self._session)

    async def _drop_listener(self) -> None:
        if self._listener is not None:
            try:
                self._listener.remove_termination_listener(self._on_session_end)
                await self._pool.release(self._listener)  # its name is reset with it
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

    async def heartbeat(self, syncing: bool, rooms: int) -> list[str]:
        if self._started and not self._listening():
            await self._drop_listener()
            await self._listen()
        session = self._session if self._listening() else None
        host, pid = socket.gethostname(), os.getpid()
        row = await self._run(
            lambda c: c.fetchrow(
                _HEARTBEAT, LIVE_WITHIN_S, self.replica, host, pid, syncing, rooms, session
            )
        )
        if session is not None and not row["listed"]:
            # Our session looks open here but PostgreSQL no longer lists it (a failover left
            # it half-open): the others take our leases as gone. Open it again.
            log.warning("replica.session_unlisted", session=session)
            await self._drop_listener()
        return [self.replica, *sorted(row["others"] or ())]

    async def acquire(self, name: str) -> Lease | None:
        if self._session is not None and not self._listening():
            return None  # the others would take it at once: they cannot see us alive
        row = await self._run(lambda c: c.fetchrow(_ACQUIRE, name, self.replica, LEASE_TTL_S))
        if row is None:
            return None
        if row["running"] and row["was"] not in ("", self.replica):
            log.info("lease.taken_from_gone", lease=name, holder=row["was"], term=row["term"])
        return Lease(name, self.replica, int(row["term"]))

    async def renew(self, leases: list[Lease]) -> set[str]:
        if not leases:
            return set()
        if self._session is not None and not self._listening():
            return set()  # our session is gone: the others may have taken any of them
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
        await _woken_within(self._woken, timeout)

    async def _run(self, call: Callable[[asyncpg.Connection], Any]) -> Any:
        return await self._store._run(call)


@asynccontextmanager
async def renewed(coordinator: Coordinator, lease: Lease) -> AsyncIterator[None]:
    """Keep ``lease`` renewed while the block runs (work that may outlast the TTL, a login to
    a slow homeserver say, outside the renewals of ``adapter.matrix.delivery.leases``)."""

    async def keep() -> None:
        while True:
            await asyncio.sleep(RENEW_EVERY_S)
            try:
                if lease.name not in await coordinator.renew([lease]):
                    log.warning("lease.lost", lease=lease.name, term=lease.term)
                    return
            except StoreRefused as err:  # the next renewal may get through
                log.info("lease.renew_failed", lease=lease.name, error=str(err))

    keeper = asyncio.create_task(keep())
    try:
        yield
    finally:
        keeper.cancel()
        await asyncio.gather(keeper, return_exceptions=True)


async def replicas_seen(pool: asyncpg.Pool) -> list[ReplicaSeen]:
    """The replicas that were seen within the last hour (the doctor's list), oldest first."""
    async with pool.acquire() as conn:
        await conn.execute(_FORGET_DEAD)
        rows = await conn.fetch(
            "SELECT id, host, pid, started_at, last_seen, syncing, rooms, "
            f"{_LIVE_WHERE} AS live FROM {REPLICAS_TABLE} r ORDER BY started_at",
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
