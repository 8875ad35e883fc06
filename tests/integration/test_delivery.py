"""Delivery (SPEC §5): every message answered exactly once, in order, whatever happens around
it (a reset, a total loss, a long gap, a failed heal, kill -9), and no room waits for another."""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace

import pytest

from adapter.matrix.ingest import events
from tests.integration.agents import FaultyAgent, GatedAgent
from tests.integration.conftest import BACKENDS, BotProcess, BotRunner, reset_tool


def echoes(user, room_id: str, bot_id: str, prefix: str) -> list[str]:
    """The bot's echoes in the room of messages starting with ``prefix``, in timeline order."""
    return [
        ev["content"]["body"].removeprefix("Echo: ")
        for ev in user.bot_messages(room_id, bot_id)
        if ev["content"]["body"].startswith(f"Echo: {prefix}")
    ]


async def wait_echoes(user, room_id: str, bot_id: str, sent: list[str]) -> list[str]:
    prefix = os.path.commonprefix(sent)
    await user.wait_for(lambda: len(echoes(user, room_id, bot_id, prefix)) >= len(sent), 90)
    return echoes(user, room_id, bot_id, prefix)


async def sent_while_down(bot, alice, prefix: str, count: int) -> tuple[str, list[str]]:
    """Alice's first chat, and ``count`` messages she sent there while the bot was stopped."""
    _, _, chat = await alice.onboard(bot.user_id)
    await bot.stop()
    sent = [f"{prefix} {i}" for i in range(count)]
    for body in sent:
        await alice.send(chat, body)
    return chat, sent


async def test_message_sent_at_once_after_a_reset_is_answered(bot, make_user):
    alice = await make_user("alice")
    _, _, chat = await alice.onboard(bot.user_id)
    await bot.stop()
    code, out = await reset_tool(bot.config, "--yes")
    assert code == 0, out
    await bot.start(wait_ready=False)
    await alice.send(chat, "right after the reset")
    await alice.wait_reply(chat, bot.user_id, "Echo: right after the reset")


async def test_catch_up_skips_messages_older_than_the_window(bot_config, logs, make_user):
    runner = BotRunner(replace(bot_config, catchup_hours=1 / 3600), logs)  # one second
    await runner.start()
    alice = await make_user("alice")
    _, _, chat = await alice.onboard(runner.user_id)
    await runner.stop()
    await alice.send(chat, "too old by now")
    await asyncio.sleep(1.5)  # the condition is the passing of time itself
    await alice.send(chat, "fresh")
    await runner.lose("everything")
    await runner.start()
    await alice.wait_reply(chat, runner.user_id, "Echo: fresh")
    await alice.ask(chat, runner.user_id, "later", "Echo: later")
    assert echoes(alice, chat, runner.user_id, "") == ["fresh", "later"]
    await runner.stop()


@pytest.mark.parametrize("count", [120])
async def test_long_gap_is_backfilled_and_answered_in_order_exactly_once(bot, make_user, count):
    alice = await make_user("alice")
    chat, sent = await sent_while_down(bot, alice, "gap", count)
    await bot.start()
    assert await wait_echoes(alice, chat, bot.user_id, sent) == sent
    backfilled = bot.logs.named("sync.gap_backfilled", room_id=chat)
    assert backfilled and backfilled[-1]["events"] == count - 100  # a sync carries 100
    assert not bot.logs.named("sync.timeline_gap")


async def test_a_slow_answer_in_one_room_delays_no_other_room(bot_config, logs, make_user):
    agent = GatedAgent()
    runner = BotRunner(bot_config, logs, agent)
    await runner.start()
    alice, bob = await make_user("alice"), await make_user("bob")
    _, _, alice_chat = await alice.onboard(runner.user_id)
    _, _, bob_chat = await bob.onboard(runner.user_id)
    await alice.send(alice_chat, "slow question")
    await alice.send(alice_chat, "then this")  # same room: waits for the slow one, in order
    await alice.wait_for(lambda: agent.holding)
    await bob.ask(bob_chat, runner.user_id, "quick one", "Echo: quick one")
    await alice.wait_for(lambda: runner.user_id in alice.typing.get(alice_chat, []))
    assert echoes(alice, alice_chat, runner.user_id, "") == []
    agent.release.set()
    assert await wait_echoes(alice, alice_chat, runner.user_id, ["slow question", "then this"]) == [
        "slow question",
        "then this",
    ]
    await alice.wait_for(lambda: runner.user_id not in alice.typing.get(alice_chat, []))
    await runner.stop()


@pytest.mark.warnings_expected("agent.failed is an error")
async def test_agent_failure_and_timeout_are_told_once_and_not_retried(bot_config, logs, make_user):
    runner = BotRunner(bot_config, logs, FaultyAgent())
    await runner.start()
    alice = await make_user("alice")
    _, _, chat = await alice.onboard(runner.user_id)
    for body in ("boom", "hang"):
        seen = len(logs.named("agent.failed"))
        await alice.ask(chat, runner.user_id, body, "the assistant failed")
        await logs.wait_for("agent.failed", count=seen + 1)
    await alice.ask(chat, runner.user_id, "fine", "Echo: fine")
    await runner.restart()
    await alice.ask(chat, runner.user_id, "still fine", "Echo: still fine")
    apologies = [
        e
        for e in alice.bot_messages(chat, runner.user_id)
        if "the assistant failed" in e["content"]["body"]
    ]
    assert len(apologies) == 2
    await runner.stop()


@pytest.mark.parametrize(
    "agent, kill_on",
    [
        ("tests.integration.agents:SlowAgent", "test_agent.thinking"),
        ("core.agent:EchoAgent", "message.answered"),
    ],
    ids=["while_the_agent_thinks", "right_after_the_reply"],
)
@pytest.mark.parametrize("backend", BACKENDS)
async def test_kill_9_mid_message_answers_it_exactly_once(bot, make_user, agent, kill_on):
    alice = await make_user("alice")
    _, _, chat = await alice.onboard(bot.user_id)
    await bot.stop()
    proc = BotProcess(bot.config, LAMBDA_AGENT=agent)
    await proc.start()
    await proc.wait_log("bot.ready")
    await alice.send(chat, "once")
    await proc.wait_log(kill_on)
    await proc.kill()
    await bot.start()
    await alice.wait_reply(chat, bot.user_id, "Echo: once")
    await bot.restart()
    await alice.ask(chat, bot.user_id, "next", "Echo: next")
    assert echoes(alice, chat, bot.user_id, "") == ["once", "next"]


async def test_kill_9_during_a_gap_backfill_answers_every_message_once(bot, make_user):
    alice = await make_user("alice")
    chat, sent = await sent_while_down(bot, alice, "lost", 110)
    proc = BotProcess(bot.config)
    await proc.start()
    await proc.wait_log("sync.gap_backfilled")
    await proc.kill()
    await bot.start()
    assert await wait_echoes(alice, chat, bot.user_id, sent) == sent


@pytest.mark.warnings_expected("messages lost past the bound")
async def test_a_gap_past_the_bound_tells_the_owner_how_many_went_unanswered(
    bot, make_user, monkeypatch
):
    monkeypatch.setattr(events, "MAX_BACKFILL", 5)  # the real bound is 1,000 a room
    alice = await make_user("alice")
    chat, sent = await sent_while_down(bot, alice, "flood", 112)
    await bot.start()
    notice = await alice.wait_reply(chat, bot.user_id, "missed 7 older messages")
    assert await wait_echoes(alice, chat, bot.user_id, sent[7:]) == sent[7:]
    [gap] = bot.logs.named("sync.timeline_gap", room_id=chat)
    assert gap["unanswered"] == 7 and gap["log_level"] == "warning"
    assert notice["content"]["io.lambda.source"]  # a reply like any other
