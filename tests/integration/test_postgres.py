"""The bot on PostgreSQL (SPEC §10) against the real Synapse: a database stopped under traffic,
a database not there yet at start, a URL that cannot work, kill -9 under traffic, and the
reset tool on a URL, beside another application's table."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from dataclasses import replace

import pytest
from aiohttp import ClientSession
from postgres import PASSWORD, LocalPostgres

from adapter.matrix.config import Config, ListenAddr
from adapter.matrix.handlers.chat_rooms import linked_rooms
from core.store import open_store, redact_url
from tests.integration.conftest import (
    ROOT,
    BotProcess,
    BotRunner,
    doctor_tool,
    reset_tool,
    unique,
)

DATABASE_DOWN = "I can't reach my database just now"


@pytest.fixture(scope="module")
def own_postgres():
    """A PostgreSQL of this module's own, which its tests stop and start."""
    server = LocalPostgres()
    server.start()
    yield server
    server.remove()


@pytest.fixture
def outage_config(own_postgres: LocalPostgres, bot_config: Config) -> Config:
    own_postgres.start()  # again, should a test have failed while it was stopped
    return replace(
        bot_config,
        db_url=own_postgres.create_database(unique("db")),
        metrics_addr=ListenAddr("127.0.0.1", 0),
    )


def echoes(user, room_id: str, bot_id: str) -> list[str]:
    return [
        ev["content"]["body"].removeprefix("Echo: ")
        for ev in user.bot_messages(room_id, bot_id)
        if ev["content"]["body"].startswith("Echo: ")
    ]


def notices(user, room_id: str, bot_id: str) -> list[dict]:
    return [
        ev for ev in user.bot_messages(room_id, bot_id) if DATABASE_DOWN in ev["content"]["body"]
    ]


async def health(url: str) -> tuple[int, dict]:
    async with ClientSession() as http, http.get(f"{url}/health") as resp:
        return resp.status, await resp.json()


@pytest.mark.warnings_expected("PostgreSQL is stopped on purpose")
async def test_postgresql_stopped_under_traffic_keeps_the_bot_up_and_answers_each_once(
    own_postgres, outage_config, logs, make_user
):
    bot = BotRunner(outage_config, logs)
    await bot.start()
    metrics = logs.named("metrics.listening")[-1]["url"]
    alice = await make_user("alice")
    _, _, chat = await alice.onboard(bot.user_id)
    await alice.ask(chat, bot.user_id, "before", "Echo: before")

    own_postgres.stop()
    sent: list[str] = []
    down_since = time.monotonic()
    while time.monotonic() - down_since < 10:  # ten seconds of traffic, a message a second
        sent.append(f"while down {len(sent)}")
        await alice.send(chat, sent[-1])
        await alice.sync(timeout_ms=1000)
    failed = await logs.wait_for("store.write_failed", during="sync")
    assert "retries by itself" in failed[0]["remedy"]
    status, body = await health(metrics)
    assert status == 503 and "store_refuses_writes" in [p["reason"] for p in body["problems"]]
    await alice.wait_for(lambda: len(notices(alice, chat, bot.user_id)) == len(sent), 60)
    assert echoes(alice, chat, bot.user_id) == ["before"]
    assert bot._task is not None and not bot._task.done()  # up all along

    own_postgres.start()
    await logs.wait_for("store.recovered", timeout=60)
    await alice.wait_for(lambda: len(echoes(alice, chat, bot.user_id)) == len(sent) + 1, 90)
    assert (await health(metrics))[0] == 200
    await alice.ask(chat, bot.user_id, "after", "Echo: after")
    assert echoes(alice, chat, bot.user_id) == ["before", *sent, "after"]
    assert len(notices(alice, chat, bot.user_id)) == len(sent)  # each told once
    assert await bot.stop() == 0


@pytest.mark.warnings_expected("the database is not there yet at start")
async def test_a_database_down_at_start_is_waited_for(own_postgres, outage_config, logs, make_user):
    own_postgres.stop()
    bot = BotRunner(outage_config, logs)
    await bot.start(wait_ready=False)
    waiting = await logs.wait_for("store.unreachable")
    assert waiting[0]["db"] == redact_url(outage_config.db) and PASSWORD not in str(waiting)
    own_postgres.start()
    await logs.wait_for("bot.ready", timeout=60)
    alice = await make_user("alice")
    _, _, chat = await alice.onboard(bot.user_id)
    await alice.ask(chat, bot.user_id, "hello", "Echo: hello")
    assert await bot.stop() == 0


@pytest.mark.parametrize("fault", ["password", "database"])
async def test_a_url_that_cannot_work_stops_the_bot_with_one_clear_line_and_exit_1(
    postgres, bot_config, fault
):
    url = {
        "password": postgres.url("postgres", password="not-the-password"),
        "database": postgres.url("no_such_database"),
    }[fault]
    env = {**os.environ, **bot_config.to_env(), "LAMBDA_MATRIX_DB": url, "LOG_FORMAT": "json"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "adapter.matrix",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    lines = [json.loads(line) for line in err.decode().splitlines()]  # JSON only: no traceback
    [line] = [entry for entry in lines if entry["level"] == "error"]
    assert line["event"] == "store.misconfigured" and line["db"] == redact_url(url)
    assert {"password": "password", "database": "CREATE DATABASE"}[fault] in line["remedy"]
    everything = out.decode() + err.decode()
    assert "not-the-password" not in everything and PASSWORD not in everything


@pytest.mark.parametrize("backend", ["postgresql"])
async def test_kill_9_under_traffic_loses_nothing_and_answers_nothing_twice(bot, make_user):
    alice = await make_user("alice")
    lobby, _, chat = await alice.onboard(bot.user_id)
    created = await alice.ask(lobby, bot.user_id, "!new Second", "Created “Second”")
    [room2] = linked_rooms(created["content"]["body"])
    await alice.wait_for(lambda: room2 in alice.invites)
    await alice.join(room2)
    await bot.stop()
    proc = BotProcess(bot.config, LOG_LEVEL="info")
    await proc.start()
    await proc.wait_log("bot.ready")
    sent = {chat: [f"a{i}" for i in range(6)], room2: [f"b{i}" for i in range(6)]}
    for i in range(6):
        for room, bodies in sent.items():
            await alice.send(room, bodies[i])
        await alice.sync(timeout_ms=0)  # a sync's timeline holds 10 events a room: keep up
    await proc.wait_log("message.answered")
    await proc.kill()
    await bot.start()
    for room, bodies in sent.items():
        await alice.wait_for(lambda r=room, b=bodies: len(echoes(alice, r, bot.user_id)) >= len(b))
    await bot.restart()
    await alice.ask(chat, bot.user_id, "next", "Echo: next")
    assert echoes(alice, chat, bot.user_id) == [*sent[chat], "next"]
    assert echoes(alice, room2, bot.user_id) == sent[room2]


async def bot_rows(url: str) -> dict[str, object]:
    store = await open_store(url)
    try:
        return dict(await store.scan(""))
    finally:
        await store.close()


@pytest.mark.parametrize("backend", ["postgresql"])
async def test_the_reset_tool_on_a_url_removes_only_the_bots_tables(
    bot, make_user, postgres, tmp_path
):
    database = bot.config.db.rsplit("/", 1)[1]
    postgres.sql("CREATE TABLE their_app (id int, note text)", database)
    postgres.sql("INSERT INTO their_app VALUES (1, 'keep me')", database)
    alice = await make_user("alice")
    _, _, chat = await alice.onboard(bot.user_id)

    code, out = await reset_tool(bot.config, "--yes")  # the bot is connected
    assert code == 1 and "pg_stat_activity" in out and "lambda-matrix-bot" in out
    await bot.stop()
    rows = await bot_rows(bot.config.db)
    assert f"matrix_room:{chat}" in rows

    code, out = await reset_tool(bot.config, "--dry-run")
    assert code == 0 and "Dry run: nothing was changed." in out and chat in out
    assert await bot_rows(bot.config.db) == rows

    code, out = await reset_tool(bot.config, "--yes", "--backup", str(tmp_path / "saved"))
    assert code == 0, out
    assert PASSWORD not in out and redact_url(bot.config.db) in out
    after = await bot_rows(bot.config.db)
    assert list(after) == ["birth"] and after["birth"]["cause"] == "local_reset"  # type: ignore[index]
    assert postgres.sql("SELECT note FROM their_app", database) == "keep me"
    [dump] = (tmp_path / "saved").glob("reset-*/lambda_kv.jsonl")
    saved = {line["key"]: json.loads(line["value"]) for line in map(json.loads, dump.open())}
    assert saved == rows
    assert not (bot.config.store_path / "session.json").exists()

    await bot.start()
    await alice.ask(chat, bot.user_id, "after the reset", "Echo: after the reset")
    assert {h["cause"] for h in bot.logs.named("state.healed")} == {"local_reset"}


@pytest.mark.parametrize("backend", ["postgresql"])
async def test_the_doctor_reads_a_url_without_writing_or_showing_the_password(bot, make_user):
    alice = await make_user("alice")
    _, _, chat = await alice.onboard(bot.user_id)
    rows = await bot_rows(bot.config.db)
    code, out, err = await doctor_tool(bot.config)
    assert code == 0, err
    assert chat in out and redact_url(bot.config.db) in out and PASSWORD not in out + err
    assert await bot_rows(bot.config.db) == rows
    await bot.stop()
    await bot.lose("everything")  # no tables of the bot: the doctor says so, and cannot run
    code, out, err = await doctor_tool(bot.config)
    assert code == 2 and "holds no tables of the bot" in err and PASSWORD not in out + err
