"""The bot's metrics (SPEC §9): one registry per bot, what a recording adds, and the
listener's answers, over HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from aiohttp import ClientSession
from prometheus_client.parser import text_string_to_metric_families

from adapter.matrix.config import ListenAddr
from adapter.matrix.observe.health import Health
from adapter.matrix.observe.listener import ListenerUnavailable, MetricsListener
from adapter.matrix.observe.metrics import Metrics


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_each_bot_counts_in_its_own_registry():
    one, two = Metrics(), Metrics()
    one.answered(int(time.time() * 1000) - 1500)
    assert value(one, "lambda_messages_answered_total") == 1
    assert value(two, "lambda_messages_answered_total") == 0


def test_an_answer_observes_its_wait_from_origin_server_ts():
    metrics = Metrics()
    metrics.answered(int(time.time() * 1000) - 1500)
    assert value(metrics, "lambda_reply_latency_seconds_bucket", le="1.0") == 0
    assert value(metrics, "lambda_reply_latency_seconds_bucket", le="2.0") == 1
    waited = value(metrics, "lambda_reply_latency_seconds_sum")
    assert waited is not None and 1.5 <= waited < 2.0


async def test_an_agent_call_is_timed_however_it_ends():
    metrics = Metrics()

    async def fails() -> str:
        raise RuntimeError("boom")

    assert await metrics.timed_agent_call(asyncio.sleep(0, "ok")) == "ok"
    with pytest.raises(RuntimeError):
        await metrics.timed_agent_call(fails())
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(metrics.timed_agent_call(asyncio.sleep(5)), 0.05)
    assert value(metrics, "lambda_agent_call_duration_seconds_count") == 3
    timed = value(metrics, "lambda_agent_call_duration_seconds_sum")
    assert timed is not None and timed >= 0.05


def test_every_metric_is_named_lambda():
    metrics = Metrics()
    families = list(text_string_to_metric_families(metrics.exposition().decode()))
    assert {family.name for family in families} >= {
        "lambda_messages_answered",
        "lambda_commands",
        "lambda_reply_latency_seconds",
        "lambda_agent_call_duration_seconds",
        "lambda_heals",
        "lambda_heal_refusals",
        "lambda_inbox_depth",
        "lambda_retries_scheduled",
        "lambda_updates_given_up",
        "lambda_sync_rounds",
        "lambda_sync_failures",
        "lambda_session_renewals",
    }
    assert all(family.name.startswith("lambda_") for family in families)


@pytest.fixture
async def listener():
    metrics, health = Metrics(), Health()
    served = await MetricsListener.start(ListenAddr("127.0.0.1", 0), metrics, health)
    yield served, metrics, health
    await served.stop()


async def test_the_listener_serves_metrics_and_health(listener):
    served, metrics, health = listener
    metrics.commands.labels(command="help").inc()
    async with ClientSession() as http:
        async with http.get(f"{served.url}/metrics") as resp:
            assert resp.status == 200 and resp.content_type == "text/plain"
            assert 'lambda_commands_total{command="help"} 1.0' in await resp.text()
        async with http.get(f"{served.url}/health") as resp:
            assert resp.status == 503
            assert (await resp.json())["problems"][0]["reason"] == "not_syncing_yet"
        health.synced()
        async with http.get(f"{served.url}/health") as resp:
            assert resp.status == 200 and (await resp.json())["status"] == "ok"


async def test_an_address_in_use_is_refused_with_the_address():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ListenerUnavailable, match=f"127.0.0.1:{port}.*in use"):
            await MetricsListener.start(ListenAddr("127.0.0.1", port), Metrics(), Health())
