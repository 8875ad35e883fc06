"""What only the PostgreSQL backend has: its own tables in a shared database, a schema version,
the URL that cannot work, the password never shown, and a server that goes away and comes
back under an open store."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from postgres import LocalPostgres

from core.store import (
    PostgresStore,
    StoreMisconfigured,
    StoreRefused,
    StoreUnreachable,
    open_store,
    redact_url,
    scrub,
)
from core.store.contract import SerialTransaction
from core.store.postgres import BOT_APPLICATION, BOT_TABLES, SCHEMA_VERSION


def tables(server: LocalPostgres, url: str) -> list[str]:
    database = url.rsplit("/", 1)[1]
    listed = server.sql(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1", database
    )
    return listed.split()


async def test_the_bot_makes_its_own_tables_and_leaves_a_foreign_one_alone(postgres, pg_url):
    database = pg_url.rsplit("/", 1)[1]
    postgres.sql("CREATE TABLE kv (key text, value text)", database)
    postgres.sql("INSERT INTO kv VALUES ('birth', 'theirs')", database)
    store = await open_store(pg_url)
    await store.set("birth-of-mine", 1)
    await store.close()
    assert tables(postgres, pg_url) == ["kv", *sorted(BOT_TABLES)]
    assert postgres.sql("SELECT value FROM kv", database) == "theirs"
    assert postgres.sql("SELECT version FROM lambda_schema", database) == str(SCHEMA_VERSION)


async def test_a_foreign_table_under_the_bots_name_is_refused_untouched(postgres, pg_url):
    database = pg_url.rsplit("/", 1)[1]
    postgres.sql("CREATE TABLE lambda_kv (id int)", database)
    with pytest.raises(StoreMisconfigured) as err:
        await open_store(pg_url)
    assert "not the bot's" in str(err.value)
    assert tables(postgres, pg_url) == ["lambda_kv"]


async def test_tables_of_a_newer_bot_are_refused_with_the_remedy(postgres, pg_url):
    await (await open_store(pg_url)).close()
    postgres.sql(f"UPDATE lambda_schema SET version = {SCHEMA_VERSION + 1}", pg_url.split("/")[-1])
    with pytest.raises(StoreMisconfigured) as err:
        await open_store(pg_url)
    assert "newer" in str(err.value) and "newer version of the bot" in err.value.remedy


@pytest.mark.parametrize("fault", ["password", "database", "host"])
async def test_a_url_that_cannot_work_is_misconfigured_and_never_shows_the_password(
    postgres, fault
):
    url = {
        "password": postgres.url("postgres", password="s3cret-wrong"),
        "database": postgres.url("no_such_db"),
        "host": "postgresql://lambda:s3cret-wrong@no-such-host.invalid:5432/db",
    }[fault]
    with pytest.raises(StoreMisconfigured) as err:
        await open_store(url)
    told = f"{err.value} {err.value.remedy}"
    assert "s3cret-wrong" not in told and "lambda-test-password" not in told
    assert redact_url(url) in told
    expected = {"password": "password", "database": "CREATE DATABASE", "host": "host name"}
    assert expected[fault] in told


async def test_a_server_that_does_not_answer_is_unreachable(postgres):
    down = LocalPostgres()  # a port nothing listens on
    with pytest.raises(StoreUnreachable):
        await open_store(down.url())
    down.remove()


async def test_the_bots_connections_say_who_they_are(postgres, pg_url):
    store = await open_store(pg_url)
    names = postgres.sql(
        f"SELECT count(*) FROM pg_stat_activity WHERE application_name = '{BOT_APPLICATION}' "
        f"AND datname = '{pg_url.split('/')[-1]}'"
    )
    await store.close()
    assert int(names) >= 1


async def test_a_restarted_server_refuses_for_now_then_the_store_reconnects_by_itself():
    server = LocalPostgres()
    server.start()
    try:
        store = await PostgresStore.open(server.create_database("restart"))
        await store.set("before", 1)
        server.stop()
        with pytest.raises(StoreRefused) as err:
            await store.set("while down", 1)
        assert "retries by itself" in err.value.remedy
        with pytest.raises(StoreRefused):
            await store.get("before")
        server.start()
        assert await store.get("before") == 1  # the same store: the pool reconnected
        await store.set("after", 2)
        assert [k for k, _ in await store.scan("")] == ["after", "before", "birth"]
        await store.close()
    finally:
        server.remove()


@pytest.mark.parametrize(
    "url, shown",
    [
        ("postgresql://u:pw@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("postgres://u@h/db", "postgres://u@h/db"),
        (
            "postgresql://h/db?password=pw&sslmode=require",
            "postgresql://h/db?password=***&sslmode=require",
        ),
        ("postgresql://u:p%40ss@h/db", "postgresql://u:***@h/db"),
        ("/var/lib/lambda.db", "/var/lib/lambda.db"),
    ],
)
def test_a_url_is_shown_without_its_password(url, shown):
    assert redact_url(url) == shown


def test_a_message_quoting_the_password_is_scrubbed():
    url = "postgresql://u:p%40ss@h/db"
    assert scrub(f"failed for {url} with p@ss and p%40ss", url) == (
        "failed for postgresql://u:***@h/db with *** and ***"
    )


async def test_a_store_stalled_inside_serialized_holds_the_others_up_only_until_postgres_ends_it(
    pg_url,
):
    """A replica paused between two statements of ``serialized`` (SIGSTOP, a long pause) would
    hold its lock for every replica: PostgreSQL ends its session once it has been idle in
    the transaction for ``SERIAL_IDLE_MS``, and the others go on. What the paused one did
    never lands: woken, it is refused, or it runs its work again on what the others wrote."""
    stalled, other = await open_store(pg_url), await open_store(pg_url)
    inside, resume = asyncio.Event(), asyncio.Event()
    runs: list[Any] = []

    async def stall(tx: SerialTransaction) -> None:
        seen = (await tx.get_many(["n"])).get("n")
        runs.append(seen)
        if len(runs) == 1:
            inside.set()
            await resume.wait()  # no statement is sent meanwhile, as if the process were stopped
        tx.set("n", f"stalled after {seen}")

    async def take(tx: SerialTransaction) -> None:
        tx.set("n", "other")

    first = asyncio.create_task(stalled.serialized("c", stall))
    await inside.wait()
    await other.serialized("c", take)  # waits for the lock until the stalled session is ended
    assert not first.done()
    resume.set()
    try:
        await first
    except StoreRefused:
        assert runs == [None] and await other.get("n") == "other"
    else:
        assert runs == [None, "other"] and await other.get("n") == "stalled after other"
    await stalled.close()
    await other.close()
