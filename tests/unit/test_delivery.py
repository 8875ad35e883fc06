"""The inbox and the per-room workers: order, concurrency, retries, restarts (SPEC §5)."""

from __future__ import annotations

import asyncio
import time

import pytest

from adapter.matrix.delivery import lanes as delivery_module
from adapter.matrix.context import Update
from adapter.matrix.delivery.lanes import Delivery, RetryLater, retry_delay
from adapter.matrix.delivery.inbox import Inbox
from adapter.matrix.observe.metrics import Metrics
from adapter.matrix.store import MatrixStore


def msg(room: str, n: int) -> Update:
    return Update("message", room, "@a:x", f"${room}{n}", f"text {n}")


class Recorder:
    """A feed that records what it handled; ``block`` holds a room until released."""

    def __init__(self) -> None:
        self.handled: list[str] = []
        self.release = asyncio.Event()
        self.block: set[str] = set()
        self.fail: dict[str, int] = {}  # event id -> how many times to raise RetryLater
        self.gave_up: list[str] = []

    async def feed(self, update: Update) -> None:
        if update.room_id in self.block:
            await self.release.wait()
        if self.fail.get(update.event_id, 0) > 0:
            self.fail[update.event_id] -= 1
            raise RetryLater("homeserver down", retry_after_ms=10)
        self.handled.append(update.event_id)

    async def give_up(self, update: Update) -> None:
        self.gave_up.append(update.event_id)


async def until(check, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met"
        await asyncio.sleep(0.005)


async def test_ingest_writes_updates_and_token_together_and_reopens_in_order(store):
    inbox, pending = await Inbox.open(store)
    assert pending == []
    first = await inbox.ingest([msg("!a", 1), msg("!b", 1)], "t1")
    await inbox.ingest([msg("!a", 2)], "t2")
    await inbox.done(first[0])
    assert await MatrixStore(store).get_sync_token() == "t2"
    again, pending = await Inbox.open(store)
    assert [e.update.event_id for e in pending] == ["$!b1", "$!a2"]
    later = await again.ingest([msg("!a", 3)], "t3")
    assert later[0].seq > pending[-1].seq  # new entries sort after what was left


async def test_postpone_keeps_the_attempt_and_the_time_across_a_restart(store):
    inbox, _ = await Inbox.open(store)
    [entry] = await inbox.ingest([msg("!a", 1)], "t1")
    later = await inbox.postpone(entry, 30)
    _, [reopened] = await Inbox.open(store)
    assert reopened == later and reopened.update.attempt == 1
    assert reopened.not_before == pytest.approx(time.time() + 30, abs=2)


async def test_the_inbox_counts_its_depth_and_the_retries_from_a_restart_on(store):
    inbox, _ = await Inbox.open(store)
    first, *_ = await inbox.ingest([msg("!a", 1), msg("!a", 2), msg("!b", 1)], "t1")
    await inbox.postpone(first, 30)
    await inbox.done(first)
    metrics = Metrics()
    await Inbox.open(store, metrics)
    assert metrics.registry.get_sample_value("lambda_inbox_depth") == 2
    reopened, _ = await Inbox.open(store, metrics)
    [entry] = await reopened.ingest([msg("!c", 1)], "t2")
    await reopened.postpone(entry, 30)
    assert metrics.registry.get_sample_value("lambda_inbox_depth") == 3
    assert metrics.registry.get_sample_value("lambda_retries_scheduled_total") == 1


def test_retry_delay_prefers_the_servers_hint_else_doubles_to_a_cap():
    assert retry_delay(0, 4000) == 4.0
    assert [retry_delay(n, None) for n in range(4)] == [1, 2, 4, 8]
    assert retry_delay(20, None) == delivery_module.MAX_BACKOFF_S


async def test_rooms_are_handled_in_order_and_a_blocked_room_delays_no_other(store):
    inbox, _ = await Inbox.open(store)
    rec = Recorder()
    rec.block = {"!slow"}
    workers = Delivery(inbox, rec.feed, rec.give_up, concurrency=4)
    workers.push(await inbox.ingest([msg("!slow", 1), msg("!fast", 1), msg("!slow", 2),
                                     msg("!fast", 2)], "t"))
    await until(lambda: rec.handled == ["$!fast1", "$!fast2"])
    rec.release.set()
    await until(lambda: len(rec.handled) == 4)
    assert rec.handled[2:] == ["$!slow1", "$!slow2"]
    await workers.close()
    assert (await Inbox.open(store))[1] == []  # every handled update left the inbox


async def test_concurrency_bounds_how_many_rooms_run_at_once(store):
    inbox, _ = await Inbox.open(store)
    running, peak = 0, 0

    async def feed(update: Update) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.02)
        running -= 1

    workers = Delivery(inbox, feed, feed, concurrency=3)
    workers.push(await inbox.ingest([msg(f"!r{i}", 0) for i in range(10)], "t"))
    await until(lambda: workers.queued == 0)
    await workers.close()
    assert peak == 3


async def test_retry_later_keeps_the_update_first_in_its_room(store):
    inbox, _ = await Inbox.open(store)
    rec = Recorder()
    rec.fail = {"$!a1": 2}
    workers = Delivery(inbox, rec.feed, rec.give_up, concurrency=4)
    workers.push(await inbox.ingest([msg("!a", 1), msg("!a", 2)], "t"))
    await until(lambda: len(rec.handled) == 2)
    assert rec.handled == ["$!a1", "$!a2"] and rec.gave_up == []
    await workers.close()


async def test_gives_up_after_max_attempts_and_tells(store, monkeypatch):
    monkeypatch.setattr(delivery_module, "MAX_ATTEMPTS", 3)
    inbox, _ = await Inbox.open(store)
    rec = Recorder()
    rec.fail = {"$!a1": 100}
    workers = Delivery(inbox, rec.feed, rec.give_up, concurrency=4)
    workers.push(await inbox.ingest([msg("!a", 1), msg("!a", 2)], "t"))
    await until(lambda: rec.handled == ["$!a2"])
    assert rec.gave_up == ["$!a1"]
    await workers.close()
    assert (await Inbox.open(store))[1] == []


async def test_close_leaves_waiting_retries_in_the_inbox(store):
    inbox, _ = await Inbox.open(store)
    rec = Recorder()

    async def slow_retry_feed(update: Update) -> None:
        if update.attempt == 0:
            raise RetryLater("down", retry_after_ms=60_000)
        await rec.feed(update)

    workers = Delivery(inbox, slow_retry_feed, rec.give_up, concurrency=4)
    workers.push(await inbox.ingest([msg("!a", 1)], "t"))
    deadline = time.monotonic() + 5
    while not [e for e in (await Inbox.open(store))[1] if e.update.attempt == 1]:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)
    await asyncio.wait_for(workers.close(), 1)  # does not sit out the minute
    _, [left] = await Inbox.open(store)
    assert left.update.attempt == 1 and rec.handled == []
