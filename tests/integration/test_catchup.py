"""A start without a sync token asks for little (SPEC §5, Scale): the first sync carries a
short timeline per room, and only a room whose latest events show an unanswered message is
read further back, in its own lane, so no other room waits for it."""

from __future__ import annotations

import re

import pytest

from adapter.matrix.ingest import sweep
from adapter.matrix.ingest.sweep import TIMELINE
from tests.integration.test_delivery import echoes, wait_echoes

SLIDING = r"/org\.matrix\.simplified_msc3575/sync"


def messages_reads(proxy, room_id: str) -> int:
    return sum(
        1 for r in proxy.requests if re.match(rf"GET .*/rooms/{re.escape(room_id)}/messages", r)
    )


@pytest.mark.warnings_expected("the busy room's first reads fail on purpose (sync.catchup)")
async def test_after_a_total_loss_only_the_room_with_unanswered_messages_reads_back(
    proxied_bot, proxy, make_user, logs
):
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


async def test_the_sweep_walks_the_rooms_most_recent_first_a_window_at_a_time(
    proxied_bot, proxy, make_user, logs, monkeypatch
):
    monkeypatch.setattr(sweep, "FIRST_WINDOW", 2)
    monkeypatch.setattr(sweep, "WINDOW", 3)
    bot = proxied_bot
    alice, bob, carol, dave = [await make_user(name) for name in ("alice", "bob", "carol", "dave")]
    for person in (bob, carol):
        await person.onboard(bot.user_id)
    _, _, chat = await alice.onboard(bot.user_id)
    await bot.stop()
    await alice.send(chat, "while down")  # her chat becomes the most recently active room
    lobby = await dave.open_lobby(bot.user_id)  # and an invite waits
    await bot.lose("everything")
    mark, asked = len(logs.entries), proxy.count(SLIDING)
    await bot.start()
    assert await wait_echoes(alice, chat, bot.user_id, ["while down"]) == ["while down"]
    await dave.wait_reply(lobby, bot.user_id, "Space")
    swept = (await logs.wait_for("sync.swept", count=2))[-1]
    # 10 rooms (Dave's Space and chat may join them while the walk goes): 2, then 3 at a time.
    assert swept["via"] == "sliding_sync" and swept["windows"] >= 4
    windows = [e for e in logs.entries[mark:] if e.get("event") == "sync.catchup"]
    # The two most recently active rooms come first: Alice's, to catch up, and the invite.
    assert (windows[0]["rooms"], windows[0]["deferred"], windows[0]["invites"]) == (1, 1, 1)
    assert [w["deferred"] + w["invites"] for w in windows[1:]] == [0] * (len(windows) - 1)
    assert proxy.count(SLIDING) - asked == swept["windows"]


async def test_without_sliding_sync_the_sweep_is_one_first_sync_of_every_room(
    proxied_bot, proxy, make_user, logs
):
    proxy.fail(SLIDING, 404, {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"})
    bot = proxied_bot
    alice, carol = await make_user("alice"), await make_user("carol")
    _, _, chat = await alice.onboard(bot.user_id)
    await bot.stop()
    await alice.send(chat, "while down")
    lobby = await carol.open_lobby(bot.user_id)
    await bot.lose("everything")
    await bot.start()
    assert await wait_echoes(alice, chat, bot.user_id, ["while down"]) == ["while down"]
    await carol.wait_reply(lobby, bot.user_id, "Space")
    swept = (await logs.wait_for("sync.swept", count=2))[-1]
    assert (swept["via"], swept["windows"]) == ("sync", 1)
    assert len(logs.named("sync.sweep_fallback")) == 1
