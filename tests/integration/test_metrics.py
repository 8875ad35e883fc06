"""``LAMBDA_METRICS_ADDR`` (SPEC §9): ``/metrics`` counts what the bot did, ``/health`` follows
the homeserver and the DB; unset, nothing listens; a port in use stops the start with exit 2."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from aiohttp import ClientSession
from prometheus_client.parser import text_string_to_metric_families

from adapter.matrix.config import ListenAddr
from tests.integration.conftest import TIMEOUT, BotProcess, BotRunner, LogSink
from tests.integration.test_db_faults import fill_disk, free_disk, wait_line

ANY_PORT = ListenAddr("127.0.0.1", 0)
SYNC = r"/sync$"
SEND = r"/send/m\.room\.message/"
BAD_GATEWAY = {"errcode": "M_UNKNOWN", "error": "bad gateway"}

Samples = dict[tuple[str, frozenset], float]


async def scrape(url: str) -> Samples:
    """Every sample of ``/metrics``: (name, labels) -> value."""
    async with ClientSession() as http, http.get(f"{url}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def metrics_until(url: str, check: Callable[[Samples], object]) -> Samples:
    """Scrape until ``check`` holds (a count is recorded just after the answer is sent)."""
    deadline = time.monotonic() + TIMEOUT
    while not check(samples := await scrape(url)):
        assert time.monotonic() < deadline, f"metrics never matched: {samples}"
        await asyncio.sleep(0.05)
    return samples


async def health(url: str) -> tuple[int, dict]:
    async with ClientSession() as http, http.get(f"{url}/health") as resp:
        return resp.status, await resp.json()


async def health_until(url: str, status: int) -> dict:
    deadline = time.monotonic() + TIMEOUT
    while (answer := await health(url))[0] != status:
        assert time.monotonic() < deadline, f"/health stayed {answer}"
        await asyncio.sleep(0.05)
    return answer[1]


def reasons(body: dict) -> list[str]:
    return [problem["reason"] for problem in body.get("problems", [])]


def listening_ports() -> set[int]:
    """The TCP ports this process listens on (Linux: its socket fds in /proc/net/tcp*)."""
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def url_of(logs: LogSink) -> str:
    return logs.named("metrics.listening")[-1]["url"]


needs_proc = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads /proc")


@needs_proc
async def test_metrics_count_answers_commands_and_heals_by_cause_and_health_is_ok(
    bot_config, make_user, logs
):
    bot = BotRunner(replace(bot_config, metrics_addr=ANY_PORT), logs)
    await bot.start()
    url = url_of(logs)
    assert int(url.rsplit(":", 1)[1]) in listening_ports()
    status, body = await health(url)
    assert status == 200 and body["status"] == "ok" and body["last_sync_s"] >= 0
    alice = await make_user("alice")
    _, _, chat = await alice.onboard(bot.user_id)
    await alice.ask(chat, bot.user_id, "hello", "Echo: hello")
    await alice.ask(chat, bot.user_id, "!help", "!rename")
    samples = await metrics_until(url, lambda s: sample(s, "lambda_messages_answered_total"))
    assert sample(samples, "lambda_messages_answered_total") == 1
    assert sample(samples, "lambda_reply_latency_seconds_count") == 1
    assert sample(samples, "lambda_reply_latency_seconds_bucket", le="+Inf") == 1
    assert 0 < sample(samples, "lambda_reply_latency_seconds_sum") < TIMEOUT
    assert sample(samples, "lambda_agent_call_duration_seconds_count") == 1
    assert sample(samples, "lambda_commands_total", command="help") == 1
    assert sample(samples, "lambda_sync_rounds_total") >= 1
    assert sample(samples, "lambda_sync_failures_total") == 0
    assert not [key for key in samples if key[0] == "lambda_heals_total"]  # nothing was lost

    await bot.restart_losing("everything")  # a new run counts from zero, like a new process
    url = url_of(logs)
    await alice.ask(chat, bot.user_id, "after the loss", "Echo: after the loss")
    samples = await metrics_until(url, lambda s: sample(s, "lambda_messages_answered_total"))
    heals = {
        dict(labels)["cause"]: value
        for (name, labels), value in samples.items()
        if name == "lambda_heals_total" and dict(labels)["source"] == "marker"
    }
    assert heals["store_missing"] >= 1 and set(heals) == {"store_missing"}
    assert sample(samples, "lambda_messages_answered_total") == 1
    assert sample(samples, "lambda_inbox_depth") == 0
    await bot.stop()
    assert int(url.rsplit(":", 1)[1]) not in listening_ports()  # stopped with the bot


@needs_proc
async def test_without_a_metrics_address_nothing_listens(bot_config, logs):
    before = listening_ports()
    bot = BotRunner(bot_config, logs)
    await bot.start()
    assert listening_ports() == before and not logs.named("metrics.listening")
    await bot.stop()


@pytest.mark.warnings_expected("a port in use is a configuration error")
async def test_a_metrics_port_in_use_stops_the_start_with_exit_2(bot_config, logs):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        addr = ListenAddr("127.0.0.1", taken.getsockname()[1])
        bot = BotRunner(replace(bot_config, metrics_addr=addr), logs)
        await bot.start(wait_ready=False)
        assert await bot.exit_code() == 2
    [line] = logs.named("config.invalid")
    assert f"LAMBDA_METRICS_ADDR={addr}" in line["error"] and "in use" in line["error"]
    assert not logs.named("bot.starting")  # refused before logging in


@pytest.mark.warnings_expected("the homeserver fails on purpose (sync.failed, a failed send)")
async def test_health_follows_a_homeserver_outage_and_metrics_count_the_retries(
    bot_config, proxy, make_user, logs
):
    config = replace(bot_config, homeserver=proxy.url, metrics_addr=ANY_PORT, outage_after_s=1.0)
    proxy.fail(SYNC, 502, BAD_GATEWAY)
    bot = BotRunner(config, logs)
    await bot.start(wait_ready=False)
    await logs.wait_for("sync.failed")
    url = url_of(logs)
    status, body = await health(url)
    assert status == 503 and "not_syncing_yet" in reasons(body)
    proxy.heal()
    await logs.wait_for("bot.ready")
    assert (await health(url))[0] == 200

    alice = await make_user("alice")
    _, _, chat = await alice.onboard(bot.user_id)
    proxy.fail(SEND, 502, BAD_GATEWAY, times=1)  # the answer's send; the retry goes through
    await alice.ask(chat, bot.user_id, "retry me", "Echo: retry me")

    failed = len(logs.named("sync.failed"))
    proxy.fail(SYNC, 502, BAD_GATEWAY)
    await alice.send(chat, "wake up")  # ends the long-poll in flight, if one is
    await logs.wait_for("sync.failed", count=failed + 1)
    body = await health_until(url, 503)
    assert reasons(body) == ["homeserver_failing"]
    assert "bad gateway" in body["problems"][0]["detail"]
    proxy.heal()
    assert (await health_until(url, 200))["status"] == "ok"
    await alice.wait_reply(chat, bot.user_id, "Echo: wake up")

    samples = await metrics_until(url, lambda s: sample(s, "lambda_messages_answered_total") == 2)
    assert sample(samples, "lambda_retries_scheduled_total") == 1
    assert sample(samples, "lambda_sync_failures_total") == len(logs.named("sync.failed"))
    assert sample(samples, "lambda_updates_given_up_total") == 0
    await bot.stop()


async def test_health_is_unavailable_while_the_db_refuses_writes(bot_config, make_user):
    proc = BotProcess(bot_config, LOG_LEVEL="info", LAMBDA_METRICS_ADDR="127.0.0.1:0")
    await proc.start()
    url = (await proc.wait_log("metrics.listening"))["url"]
    await proc.wait_log("bot.ready")
    assert (await health(url))[0] == 200
    fill_disk(proc)
    alice = await make_user("alice")
    await alice.open_lobby(bot_config.user_id)  # its invite: a round the DB cannot record
    await wait_line(proc, "store.write_failed", during="sync")
    status, body = await health(url)
    assert status == 503 and reasons(body) == ["store_refuses_writes"]
    free_disk(proc)
    await proc.wait_log("store.recovered")
    assert (await health(url))[0] == 200
    assert await proc.terminate() == 0
