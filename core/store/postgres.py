"""The store on PostgreSQL (SPEC §10), on asyncpg: the same contract as the SQLite file, in the
bot's own tables of a database it may share with other applications.

The bot creates and upgrades its tables on start (``lambda_kv``, and ``lambda_schema`` with
the schema's version), under an advisory lock so that processes starting together upgrade
once, and never touches another table. Every write of a transaction is one statement, one
round trip. A database that is down for now (refused, reset, shut down, out of connections
or disk) raises ``StoreRefused`` like a full disk does; the pool reconnects by itself.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any, TypeVar

import asyncpg
import asyncpg.exceptions as pg

from core.store.contract import (
    BIRTH_KEY,
    LEGACY_RESET_MARKER_KEY,
    Birth,
    BirthCause,
    Engine,
    LeaseLost,
    SerialTransaction,
    SerialWork,
    StoreError,
    StoreRefused,
    StoreUnreadable,
    Transaction,
    birth_from,
    prefix_end,
)
from core.store.location import redact_url, scrub

# What the bot's connections call themselves (pg_stat_activity.application_name): how the
# reset tool knows a bot is connected. The tools name theirs otherwise. A replica's one
# long-lived connection adds its id after a space (``core.store.coordination``).
BOT_APPLICATION = "lambda-matrix-bot"
APPLICATION_NAME_MAX = 63  # PostgreSQL keeps this many bytes of it (NAMEDATALEN - 1)
KV_TABLE = "lambda_kv"
SCHEMA_TABLE = "lambda_schema"
LEASES_TABLE = "lambda_leases"
REPLICAS_TABLE = "lambda_replicas"
BOT_TABLES = (KV_TABLE, SCHEMA_TABLE, LEASES_TABLE, REPLICAS_TABLE)
# Schema upgrades, in order: step N brings a database at version N-1 to version N.
MIGRATIONS: tuple[str, ...] = (
    # 1: the key/value table; keys compare as bytes ("C"), like SQLite, so a prefix scan is a
    # key range in code-point order whatever the database's own collation.
    f'CREATE TABLE {KV_TABLE} (key text COLLATE "C" PRIMARY KEY, value text NOT NULL)',
    # 2: replicas (core.store.coordination): who is alive, and leases with a fencing term.
    f'CREATE TABLE {LEASES_TABLE} (name text COLLATE "C" PRIMARY KEY, holder text NOT NULL, '
    "term bigint NOT NULL, expires_at timestamptz NOT NULL); "
    f"CREATE TABLE {REPLICAS_TABLE} (id text PRIMARY KEY, host text NOT NULL, pid integer "
    "NOT NULL, started_at timestamptz NOT NULL, last_seen timestamptz NOT NULL, syncing "
    "boolean NOT NULL DEFAULT false, rooms integer NOT NULL DEFAULT 0)",
    # 3: the application_name of each replica's long-lived connection: a replica whose
    # session is gone (its process died) gives up its leases at once, not at their expiry.
    f"ALTER TABLE {REPLICAS_TABLE} ADD COLUMN session text",
)
SCHEMA_VERSION = len(MIGRATIONS)
UPGRADE_LOCK = 0x6C616D62  # pg_advisory_xact_lock key ("lamb"): one upgrade at a time
CONNECT_TIMEOUT_S = 10.0
COMMAND_TIMEOUT_S = 30.0
POOL_SIZE = 16
NOTHING_AFTER = chr(0x10FFFF) * 2  # a key above every key the bot writes
POOL_WARM = 8  # connections opened (and their statements prepared) at start
RETRIES = "the bot keeps its place and retries by itself"

_GET = f"SELECT value FROM {KV_TABLE} WHERE key = $1"
_GET_MANY = f"SELECT key, value FROM {KV_TABLE} WHERE key = ANY($1::text[])"
_SCAN_FROM = f"SELECT key, value FROM {KV_TABLE} WHERE key >= $1 ORDER BY key"
_SCAN_RANGE = f"SELECT key, value FROM {KV_TABLE} WHERE key >= $1 AND key < $2 ORDER BY key"
# A transaction's writes in one statement (atomic by itself): its deletes, then its sets. A
# key is either deleted or set (``Transaction.final``); keys go in sorted, so concurrent
# writers lock rows in one order.
_WRITE = (
    f"WITH gone AS (DELETE FROM {KV_TABLE} WHERE key = ANY($1::text[])) "
    f"INSERT INTO {KV_TABLE} (key, value) SELECT * FROM unnest($2::text[], $3::text[]) "
    "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
)
# A fenced write, in one statement (one round trip): the writes of ``_WRITE``, made only if
# the lease row still has our term; it returns how many lease rows matched (0: refused). FOR
# SHARE keeps a takeover (an UPDATE of that row) waiting until the statement's transaction
# ends, so the writes land before it or not at all; a takeover that committed first leaves
# the fence empty (read committed re-reads the locked row), and nothing is written.
_FENCED_WRITE = (
    f"WITH fence AS MATERIALIZED (SELECT 1 FROM {LEASES_TABLE} WHERE name = $4 AND holder = $5 "
    "AND term = $6 FOR SHARE), "
    f"gone AS (DELETE FROM {KV_TABLE} WHERE key = ANY($1::text[]) "
    "AND EXISTS (SELECT FROM fence)), "
    f"kept AS (INSERT INTO {KV_TABLE} (key, value) SELECT * FROM unnest($2::text[], $3::text[]) "
    "WHERE EXISTS (SELECT FROM fence) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value) "
    "SELECT count(*) FROM fence"
)
# A fence: the lease row still has our term. FOR SHARE keeps a takeover (an UPDATE of that
# row) waiting until this transaction ends, so the writes land before it or not at all.
_FENCE = f"SELECT 1 FROM {LEASES_TABLE} WHERE name = $1 AND holder = $2 AND term = $3 FOR SHARE"
# ``serialized``: a transaction-level advisory lock, in the two-key space (apart from the
# one-key UPGRADE_LOCK) under the bot's class "lamb", keyed by the lock's name. Taken in its
# own statement, so the reads after it see what the holder before it committed.
SERIAL_LOCKS = 0x6C616D62
# A replica that stalls (SIGSTOP, a pause, cut off) inside ``serialized`` would hold that lock,
# and the sync lease's row, for every replica: PostgreSQL ends its session once it has been
# idle in the transaction this long (under the 3 s lease TTL), which frees both; its commit
# then fails, and it recorded nothing. The work between two statements takes milliseconds.
SERIAL_IDLE_MS = 2000
_SERIAL_LOCK = (
    "SELECT set_config('idle_in_transaction_session_timeout', $3::text, true), "
    "pg_advisory_xact_lock($1::integer, hashtext($2))"
)

# Faults of the moment (server class codes): the connection (08), the operator (57: shut down,
# starting up), resources (53: disk, memory, connections), a rolled-back transaction (40),
# a standby that takes no writes (25006).
_PASSING = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    pg.InternalClientError,
    pg.PostgresConnectionError,
    pg.OperatorInterventionError,
    pg.InsufficientResourcesError,
    pg.TransactionRollbackError,
    pg.ReadOnlySQLTransactionError,
)
# A connection that broke under the pool (the server restarted), or that asyncpg itself no
# longer trusts: worth one more try at once, on another connection.
_BROKEN = (
    pg.ConnectionDoesNotExistError,
    pg.AdminShutdownError,
    asyncpg.InterfaceError,
    pg.InternalClientError,
)

T = TypeVar("T")


class StoreMisconfigured(StoreError):
    """``LAMBDA_MATRIX_DB`` names a PostgreSQL database that cannot work as given (no such
    host or database, a refused password, no right to create the bot's tables). Waiting will
    not help; ``remedy`` says what will."""

    def __init__(self, where: str, detail: str, remedy: str) -> None:
        super().__init__(f"cannot use the database {where}: {detail}")
        self.where = where
        self.remedy = remedy


class StoreUnreachable(StoreError):
    """PostgreSQL does not answer for now (refused, starting up, out of connections): the
    database may well be right, so it is worth waiting for."""

    def __init__(self, where: str, detail: str) -> None:
        super().__init__(f"the database {where} does not answer: {detail}")
        self.where = where


async def connect_pool(
    url: str, application: str = BOT_APPLICATION, **settings: str
) -> asyncpg.Pool:
    """A pool of connections to ``url``, named ``application`` in pg_stat_activity (with more
    server ``settings``). It keeps no floor of connections (asyncpg would retry one, with a
    traceback a second, while the server is down) and keeps idle ones open, so the ones
    ``warm`` opens stay."""
    return await asyncpg.create_pool(
        url,
        min_size=0,
        max_size=POOL_SIZE,
        max_inactive_connection_lifetime=0,
        init=_prepare,
        timeout=CONNECT_TIMEOUT_S,
        command_timeout=COMMAND_TIMEOUT_S,
        server_settings={"application_name": application, **settings},
    )


async def _warm(pool: asyncpg.Pool) -> None:
    """Open ``POOL_WARM`` connections now, each with the statements prepared (also the one
    that made the tables, before which there was nothing to prepare), not in a reply."""
    held = [await pool.acquire() for _ in range(POOL_WARM)]
    try:
        for conn in held:
            await _prepare(conn)
    finally:
        for conn in held:
            await pool.release(conn)


async def connect_tool(url: str, application: str, **settings: str) -> asyncpg.Connection:
    """One connection for a tool (the doctor, the reset tool), named ``application`` so that
    it is not taken for a bot; raises what ``open_failure`` explains."""
    try:
        return await asyncpg.connect(
            url,
            timeout=CONNECT_TIMEOUT_S,
            command_timeout=COMMAND_TIMEOUT_S,
            server_settings={"application_name": application, **settings},
        )
    except (asyncpg.PostgresError, OSError, TimeoutError, asyncpg.InterfaceError) as err:
        raise open_failure(err, url) from err


async def _prepare(conn: asyncpg.Connection) -> None:
    """A new pooled connection prepares the bot's statements now, not in a user's reply: a
    statement's first use on a connection costs one more round trip. Skipped while the
    tables do not exist yet (the open checks and creates them on the first connection)."""
    if await schema_version(conn) == SCHEMA_VERSION:
        # Run, not just prepared: what is run is what asyncpg keeps in its statement cache.
        await conn.fetchval(_GET, "")
        await conn.fetch(_GET_MANY, [])
        await conn.fetch(_SCAN_FROM, NOTHING_AFTER)
        await conn.fetch(_SCAN_RANGE, NOTHING_AFTER, NOTHING_AFTER)
        await conn.execute(_WRITE, [], [], [])  # no key: it writes nothing
        await conn.fetchval(_FENCED_WRITE, [], [], [], "", "", 0)  # no lease: nor does this


def open_failure(err: BaseException, url: str) -> StoreError:
    """What a failed connection at start means: the URL cannot work (``StoreMisconfigured``)
    or the database is down for now (``StoreUnreachable``)."""
    where, detail = redact_url(url), scrub(str(err) or type(err).__name__, url)
    if isinstance(err, socket.gaierror):
        return StoreMisconfigured(
            where, f"no such host ({detail})", "check the host name in LAMBDA_MATRIX_DB"
        )
    if isinstance(err, pg.InvalidAuthorizationSpecificationError):  # password, user, hba
        return StoreMisconfigured(
            where,
            detail,
            "check the user name and password in LAMBDA_MATRIX_DB, and that "
            "pg_hba.conf lets this user in from this host",
        )
    if isinstance(err, pg.InvalidCatalogNameError):
        return StoreMisconfigured(
            where,
            detail,
            "create the database (createdb, or CREATE DATABASE … OWNER the bot's user) "
            "or fix its name in LAMBDA_MATRIX_DB",
        )
    if isinstance(err, pg.InsufficientPrivilegeError):
        return StoreMisconfigured(
            where,
            detail,
            "let the bot's user create tables in the database (make it the owner, or "
            "GRANT CREATE ON SCHEMA public TO it)",
        )
    if isinstance(err, ValueError | pg.ProtocolViolationError):  # a malformed URL, say
        return StoreMisconfigured(where, detail, "fix LAMBDA_MATRIX_DB")
    if isinstance(err, _PASSING):
        return StoreUnreachable(where, detail)
    return StoreMisconfigured(where, detail, "check LAMBDA_MATRIX_DB and the database")


class PostgresStore:
    """Key/value store with JSON values in the ``lambda_kv`` table of a PostgreSQL database.
    ``created``: the bot's tables were made at this open; ``birth``: when and why."""

    engine: Engine = "postgresql"

    def __init__(self, url: str, pool: asyncpg.Pool, created: bool, birth: Birth | None) -> None:
        self._url = url
        self.where = redact_url(url)
        self.created = created
        self.birth = birth
        self._pool = pool

    @classmethod
    async def open(cls, url: str, birth_cause: BirthCause = "store_missing") -> PostgresStore:
        """Connect, then create or upgrade the bot's tables (writing the birth record,
        ``birth_cause``, when they are new). Raises ``StoreMisconfigured``,
        ``StoreUnreachable`` or ``StoreUnreadable``."""
        try:
            pool = await connect_pool(url)
        except (asyncpg.PostgresError, OSError, TimeoutError, asyncpg.InterfaceError) as err:
            raise open_failure(err, url) from err
        try:
            async with pool.acquire() as conn:
                created = await _upgrade(conn, url, birth_cause)
                rows = await conn.fetch(
                    f"SELECT key, value FROM {KV_TABLE} WHERE key = ANY($1::text[])",
                    [BIRTH_KEY, LEGACY_RESET_MARKER_KEY],
                )
            birth = birth_from({row["key"]: row["value"] for row in rows})
            await _warm(pool)
        except ValueError as err:
            await pool.close()
            raise StoreUnreadable(redact_url(url), f"unreadable birth record: {err}") from err
        except (asyncpg.PostgresError, OSError, TimeoutError, asyncpg.InterfaceError) as err:
            await pool.close()
            raise open_failure(err, url) from err
        except BaseException:
            await pool.close()
            raise
        return cls(url, pool, created, birth)

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self._pool.close(), CONNECT_TIMEOUT_S)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            self._pool.terminate()

    async def get(self, key: str) -> Any | None:
        raw = await self._run(lambda conn: conn.fetchval(_GET, key))
        return None if raw is None else self._decode(key, raw)

    async def scan(self, prefix: str) -> list[tuple[str, Any]]:
        """All (key, value) pairs whose key starts with ``prefix`` (case-sensitive), in key
        order."""
        end = prefix_end(prefix)
        rows = await self._run(
            lambda conn: (
                conn.fetch(_SCAN_FROM, prefix)
                if end is None
                else conn.fetch(_SCAN_RANGE, prefix, end)
            )
        )
        return [(row["key"], self._decode(row["key"], row["value"])) for row in rows]

    async def set(self, key: str, value: Any) -> None:
        async with self.transaction() as tx:
            tx.set(key, value)

    async def delete(self, key: str) -> None:
        async with self.transaction() as tx:
            tx.delete(key)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        tx = Transaction()
        yield tx
        final = sorted(tx.final().items())
        if not final:
            return
        args = _write_args(final)
        if tx.fence is None:
            await self._run(lambda conn: conn.execute(_WRITE, *args))
            return
        fence = tx.fence
        held = await self._run(
            lambda conn: conn.fetchval(_FENCED_WRITE, *args, fence.name, fence.holder, fence.term)
        )
        if not held:
            raise LeaseLost(fence)

    async def serialized(self, lock: str, work: SerialWork[T]) -> T:
        async def locked(conn: asyncpg.Connection) -> T:
            async def read(keys: list[str]) -> dict[str, Any]:
                rows = await conn.fetch(_GET_MANY, keys)
                return {row["key"]: self._decode(row["key"], row["value"]) for row in rows}

            writing = False
            try:
                async with conn.transaction():
                    await conn.execute(_SERIAL_LOCK, SERIAL_LOCKS, lock, str(SERIAL_IDLE_MS))
                    tx = SerialTransaction(read)
                    result = await work(tx)
                    fence = tx.fence
                    if fence is not None and (
                        await conn.fetchval(_FENCE, fence.name, fence.holder, fence.term) is None
                    ):
                        raise LeaseLost(fence)
                    writing = True
                    if final := sorted(tx.final().items()):
                        await conn.execute(_WRITE, *_write_args(final))
            except _BROKEN as err:
                if not writing:
                    raise  # nothing was sent that could have landed: ``_run`` tries again
                # Its commit may have landed unheard: running ``work`` again would number
                # the same entries twice. Refused, like any write whose fate is unknown.
                conn.terminate()
                raise self._refused(err) from err
            return result

        return await self._run(locked)

    @property
    def pool(self) -> asyncpg.Pool:
        """The connections, for the replicas' coordination (``core.store.coordination``)."""
        return self._pool

    async def _run(self, call: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """``call`` on a pooled connection; a connection that broke under the pool (the
        server restarted since) is tried once more on a fresh one. What fails for now
        raises ``StoreRefused``."""
        for attempt in (1, 2):
            try:
                async with self._pool.acquire() as conn:
                    try:
                        return await call(conn)
                    except _BROKEN:
                        conn.terminate()  # never back into the pool in whatever state it is
                        raise
            except _BROKEN:
                if attempt == 1:
                    continue
                raise self._refused_now() from None
            except _PASSING as err:
                raise self._refused(err) from err
            except pg.PostgresError as err:
                if isinstance(err, pg.DataError):
                    raise  # what was asked cannot be kept: a bug, not a fault of the moment
                raise self._refused(err) from err
        raise AssertionError("unreachable")

    def _refused(self, err: BaseException) -> StoreRefused:
        detail = scrub(str(err) or type(err).__name__, self._url)
        if isinstance(err, pg.InsufficientResourcesError):
            remedy = f"PostgreSQL at {self.where} is out of disk, memory or connections: free "
        elif isinstance(err, pg.ReadOnlySQLTransactionError):
            remedy = f"{self.where} takes no writes (a standby?): point the bot at the primary; "
        elif isinstance(err, pg.InvalidAuthorizationSpecificationError):
            remedy = "the database refuses the bot's login now: check the URL's password; "
        else:
            remedy = f"check that PostgreSQL at {self.where} runs and is reachable; "
        return StoreRefused(f"{type(err).__name__}: {detail}", remedy + RETRIES)

    def _refused_now(self) -> StoreRefused:
        return StoreRefused(
            "the connection to PostgreSQL broke twice in a row",
            f"check that PostgreSQL at {self.where} runs and is reachable; {RETRIES}",
        )

    def _decode(self, key: str, raw: str) -> Any:
        try:
            return json.loads(raw)
        except json.JSONDecodeError as err:
            raise StoreUnreadable(self.where, f"record {key!r} is not JSON") from err


def _write_args(final: list[tuple[str, str | None]]) -> tuple[list[str], list[str], list[str]]:
    """``_WRITE``'s arguments for a transaction's final writes, sorted by key: the keys
    deleted, then the keys set and their values."""
    gone = [key for key, value in final if value is None]
    kept = [(key, value) for key, value in final if value is not None]
    return gone, [k for k, _ in kept], [v for _, v in kept]


async def _upgrade(conn: asyncpg.Connection, url: str, birth_cause: BirthCause) -> bool:
    """Bring the bot's tables to ``SCHEMA_VERSION``; True when they were created now.

    The lock is taken before the transaction begins: a transaction that began before another
    process committed the tables may still see them missing from this connection's catalog
    cache (a lookup at connect time, in ``_prepare``, caches "no such table"), and would take
    the bot's new tables for a foreign one. A transaction begun after the lock sees them."""
    await conn.execute("SELECT pg_advisory_lock($1)", UPGRADE_LOCK)
    try:
        return await _upgrade_locked(conn, url, birth_cause)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", UPGRADE_LOCK)


async def _upgrade_locked(conn: asyncpg.Connection, url: str, birth_cause: BirthCause) -> bool:
    async with conn.transaction():
        version = await schema_version(conn)
        if version is None:
            if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", KV_TABLE):
                raise StoreMisconfigured(
                    redact_url(url),
                    f"a table {KV_TABLE} is there, but not the bot's (no {SCHEMA_TABLE})",
                    "give the bot a database of its own, or drop that table if it is "
                    "a leftover of the bot",
                )
            await conn.execute(f"CREATE TABLE {SCHEMA_TABLE} (version integer NOT NULL)")
            await conn.execute(f"INSERT INTO {SCHEMA_TABLE} (version) VALUES (0)")
            version = 0
        if version > SCHEMA_VERSION:
            raise StoreMisconfigured(
                redact_url(url),
                f"its tables are at version {version}, newer than this bot's ({SCHEMA_VERSION})",
                "run the newer version of the bot",
            )
        for step in MIGRATIONS[version:]:
            await conn.execute(step)
        if version < SCHEMA_VERSION:
            await conn.execute(f"UPDATE {SCHEMA_TABLE} SET version = $1", SCHEMA_VERSION)
        if version == 0:
            birth = json.dumps(asdict(Birth(time.time(), birth_cause)))
            await conn.execute(
                f"INSERT INTO {KV_TABLE} (key, value) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                BIRTH_KEY,
                birth,
            )
    return version == 0


async def schema_version(conn: asyncpg.Connection) -> int | None:
    """The version of the bot's tables in this database; None when it holds none."""
    if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", SCHEMA_TABLE):
        return None
    return await conn.fetchval(f"SELECT max(version) FROM {SCHEMA_TABLE}")


async def drop_bot_tables(conn: asyncpg.Connection) -> None:
    """Remove the bot's tables, and nothing else (the reset tool's, and a test's total loss)."""
    await conn.execute(f"DROP TABLE IF EXISTS {', '.join(BOT_TABLES)}")


async def bot_connections(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """The bots connected to this connection's database now: pid, client address and host,
    and since when (pg_stat_activity, by ``BOT_APPLICATION``)."""
    return await conn.fetch(
        "SELECT pid, client_addr, client_hostname, backend_start FROM pg_stat_activity "
        "WHERE datname = current_database() "
        "AND (application_name = $1 OR starts_with(application_name, $1 || ' ')) "
        "AND pid <> pg_backend_pid() ORDER BY backend_start",
        BOT_APPLICATION,
    )


async def all_rows(conn: asyncpg.Connection) -> dict[str, str]:
    """Every record of the bot's table, raw (key -> JSON text): what the tools read."""
    return {
        row["key"]: row["value"] for row in await conn.fetch(f"SELECT key, value FROM {KV_TABLE}")
    }


async def reset_tables(conn: asyncpg.Connection, url: str) -> None:
    """Drop the bot's tables and make them anew with a birth record that says ``local_reset``,
    in one transaction, under the lock a starting bot takes to upgrade them."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", UPGRADE_LOCK)
        await drop_bot_tables(conn)
        await _upgrade(conn, url, "local_reset")
