"""A start without a sync token asks for little (SPEC §5, Scale): the first sync carries a
short timeline per room, and only a room whose latest events show an unanswered message is
read further back, in its own lane, so no other room waits for it."""

from __future__ import annotations

import re

import pytest

from adapter.matrix.transport.sweep import TIMELINE
from tests.integration.test_delivery import echoes, wait_echoes


def messages_reads(proxy, room_id: str) -> int:
    return sum(1 for r in proxy.requests
               if re.match(rf"GET .*/rooms/{re.escape(room_id)}/messages", r))


@pytest.mark.warnings_expected("the busy room's first reads fail on purpose (sync.catchup)")
async def test_after_a_total_loss_only_the_room_with_unanswered_messages_reads_back(
        proxied_bot, proxy, make_user, logs):
    bot = proxied_bot
    alice, bob = await make_user("alice"), await make_user("bob")
    _, _, busy = await alice.onboard(bot.user_id)
    _, _, quiet = await bob.onboard(bot.user_id)
    await bob.ask(quiet, bot.user_id, "answered before", "Echo: answered before")
    await bot.stop()
    sent = [f"while down {i}" for i in range(TIMELINE + 5)]  # past the first sync's
    for body in sent:
        await alice.send(busy, body)
    await bot.lose("everything")

    proxy.fail(rf"/rooms/{re.escape(busy)}/messages", 500, {"errcode": "M_UNKNOWN"}, times=2)
    await bot.start()
    # The busy room's read back fails and waits its retry; the quiet room does not wait.
    await bob.ask(quiet, bot.user_id, "right after the start", "Echo: right after the start")
    assert echoes(alice, busy, bot.user_id, "while down") == []
    assert await wait_echoes(alice, busy, bot.user_id, sent) == sent  # all, once, in order
    [read] = logs.named("sync.catchup_read", room_id=busy)
    assert read["answered"] == len(sent)
    assert messages_reads(proxy, quiet) == 0  # nothing to answer there: no read at all
    # Two refused; then one page back, and (a retry may follow a partial run) one forwards.
    assert messages_reads(proxy, busy) == 4
    await alice.ask(busy, bot.user_id, "and now", "Echo: and now")
    assert echoes(alice, busy, bot.user_id, "while down") == sent
