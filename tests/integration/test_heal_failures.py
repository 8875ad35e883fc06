"""Homeserver errors during a heal: logged, the user told once, retried from the inbox (across
restarts too), nothing lost."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.warnings_expected("homeserver faults")

STATE = r"/rooms/[^/]+/state$"


async def fail_heals_after_a_loss(bot, proxy, alice, first: str) -> str:
    """Alice's chat after a total loss, with every state fetch failing (502), and ``first``
    sent there and told it will be retried. Returns the chat's room id."""
    _, _, chat = await alice.onboard(bot.user_id)
    await bot.restart_losing("everything")
    proxy.fail(STATE, 502, {"errcode": "M_UNKNOWN", "error": "bad gateway"})
    await alice.send(chat, first)
    await alice.wait_reply(chat, bot.user_id, "I'll retry")
    return chat


def retry_notices(alice, chat: str, bot_id: str) -> list[dict]:
    return [e for e in alice.bot_messages(chat, bot_id) if "I'll retry" in e["content"]["body"]]


async def test_heal_failure_is_reported_once_and_the_message_answered_after_recovery(
    proxied_bot, proxy, make_user
):
    bot = proxied_bot
    alice = await make_user("alice")
    chat = await fail_heals_after_a_loss(bot, proxy, alice, "first try")
    await alice.send(chat, "second try")
    await bot.logs.wait_for("state.heal_failed", count=2, room_id=chat, will_retry=True)
    assert len(retry_notices(alice, chat, bot.user_id)) == 1
    proxy.heal()
    await alice.send(chat, "third try")
    for body in ("first try", "second try", "third try"):
        await alice.wait_reply(chat, bot.user_id, f"Echo: {body}")
    assert len(bot.logs.named("state.healed", room_id=chat)) == 1


async def test_rate_limited_heal_retries_by_itself_after_retry_after(proxied_bot, proxy, make_user):
    bot = proxied_bot
    alice = await make_user("alice")
    _, _, chat = await alice.onboard(bot.user_id)
    await bot.restart_losing("everything")
    # A long limit is not slept through inside the request: the heal fails, and is retried
    # after retry_after_ms (the proxy stops limiting after the first answer).
    proxy.fail(
        STATE,
        429,
        {"errcode": "M_LIMIT_EXCEEDED", "error": "slow down", "retry_after_ms": 4000},
        times=1,
    )
    await alice.send(chat, "patience")
    failed = await bot.logs.wait_for("state.heal_failed", room_id=chat)
    assert "M_LIMIT_EXCEEDED" in failed[0]["error"]
    await alice.wait_reply(chat, bot.user_id, "rate-limiting me. I'll retry in 4 s")
    await alice.wait_reply(chat, bot.user_id, "Echo: patience")


async def test_unreachable_homeserver_at_start_is_retried_without_crashing(
    proxied_bot, proxy, make_user
):
    bot = proxied_bot
    await bot.stop()
    proxy.fail(r"/sync$", 0, times=12)
    await bot.start()
    await bot.logs.wait_for("sync.failed")
    alice = await make_user("alice")
    await alice.onboard(bot.user_id)


async def test_failed_heal_is_kept_across_a_restart_during_the_outage(
    proxied_bot, proxy, make_user
):
    bot = proxied_bot
    alice = await make_user("alice")
    chat = await fail_heals_after_a_loss(bot, proxy, alice, "during the outage")
    await bot.logs.wait_for("delivery.retry_scheduled", room_id=chat)
    await bot.stop()
    proxy.heal()
    await bot.start()
    await alice.wait_reply(chat, bot.user_id, "Echo: during the outage")
    await alice.ask(chat, bot.user_id, "after", "Echo: after")
    assert len(retry_notices(alice, chat, bot.user_id)) == 1
    bodies = [e["content"]["body"] for e in alice.bot_messages(chat, bot.user_id)]
    assert bodies.count("Echo: during the outage") == 1
