"""The inbox and the per-room workers: order, concurrency, retries, restarts (SPEC §5); and
the agent's slots (LAMBDA_CONCURRENCY), which only the agent's call holds."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest

from adapter.matrix.chain.context import Services
from adapter.matrix.delivery import lanes as delivery_module
from adapter.matrix.delivery.inbox import Inbox
from adapter.matrix.delivery.lanes import Delivery, retry_delay
from adapter.matrix.handlers import handle_update
from adapter.matrix.ingest.update import RetryLater, Update
from adapter.matrix.observe.metrics import Metrics
from adapter.matrix.store.records import MatrixStore, RoomMeta
from core.chat import Chat
from tests.unit.fakes import (
    ALICE,
    CHAT,
    SPACE,
    FakeHomeserver,
    healed_data,
    make_services,
    message,
    onboard,
)


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
    workers = Delivery(inbox, rec.feed, rec.give_up)
    workers.push(
        await inbox.ingest(
            [msg("!slow", 1), msg("!fast", 1), msg("!slow", 2), msg("!fast", 2)], "t"
        )
    )
    await until(lambda: rec.handled == ["$!fast1", "$!fast2"])
    rec.release.set()
    await until(lambda: len(rec.handled) == 4)
    assert rec.handled[2:] == ["$!slow1", "$!slow2"]
    await workers.close()
    assert (await Inbox.open(store))[1] == []  # every handled update left the inbox


async def test_lanes_bound_nothing_every_room_runs_at_once(store):
    inbox, _ = await Inbox.open(store)
    rec = Recorder()
    rec.block = {f"!r{i}" for i in range(40)}
    running: set[str] = set()

    async def feed(update: Update) -> None:
        running.add(update.room_id)
        await rec.feed(update)

    workers = Delivery(inbox, feed, rec.give_up)
    workers.push(await inbox.ingest([msg(room, 0) for room in sorted(rec.block)], "t"))
    await until(lambda: len(running) == 40)
    rec.release.set()
    await until(lambda: workers.queued == 0)
    await workers.close()


async def test_quiet_waits_for_updates_due_now_but_not_for_a_retrys_wait(store):
    inbox, _ = await Inbox.open(store)
    rec = Recorder()
    rec.block = {"!busy"}
    workers = Delivery(inbox, rec.feed, rec.give_up)
    await asyncio.wait_for(workers.quiet(5), 1)  # nothing queued: at once
    workers.push(await inbox.ingest([msg("!busy", 1)], "t"))
    started = time.monotonic()
    await workers.quiet(0.2)  # the busy room holds it, up to the bound
    assert time.monotonic() - started >= 0.2
    waiter = asyncio.create_task(workers.quiet(5))
    rec.release.set()
    await asyncio.wait_for(waiter, 1)  # and it ends when the room is done
    workers.push([await inbox.postpone((await inbox.ingest([msg("!later", 1)], "t"))[0], 30)])
    await asyncio.wait_for(workers.quiet(5), 1)  # a retry 30 s away is nothing due now
    await workers.close()


async def test_quiet_can_wait_for_the_lanes_to_stay_quiet_a_moment(store):
    inbox, _ = await Inbox.open(store)
    rec = Recorder()
    workers = Delivery(inbox, rec.feed, rec.give_up)
    await asyncio.wait_for(workers.quiet(5, settle=60), 1)  # no lane was ever busy: at once
    workers.push(await inbox.ingest([msg("!room", 1)], "t"))
    await asyncio.wait_for(workers.quiet(5), 1)  # the room is handled
    started = time.monotonic()
    await workers.quiet(0.3, settle=60)  # quiet, but not for long enough: up to the bound
    assert time.monotonic() - started >= 0.3
    await asyncio.wait_for(workers.quiet(5, settle=0.05), 1)  # quiet long enough
    await workers.close()


async def test_retry_later_keeps_the_update_first_in_its_room(store):
    inbox, _ = await Inbox.open(store)
    rec = Recorder()
    rec.fail = {"$!a1": 2}
    workers = Delivery(inbox, rec.feed, rec.give_up)
    workers.push(await inbox.ingest([msg("!a", 1), msg("!a", 2)], "t"))
    await until(lambda: len(rec.handled) == 2)
    assert rec.handled == ["$!a1", "$!a2"] and rec.gave_up == []
    await workers.close()


async def test_gives_up_after_max_attempts_and_tells(store, monkeypatch):
    monkeypatch.setattr(delivery_module, "MAX_ATTEMPTS", 3)
    inbox, _ = await Inbox.open(store)
    rec = Recorder()
    rec.fail = {"$!a1": 100}
    workers = Delivery(inbox, rec.feed, rec.give_up)
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

    workers = Delivery(inbox, slow_retry_feed, rec.give_up)
    workers.push(await inbox.ingest([msg("!a", 1)], "t"))
    deadline = time.monotonic() + 5
    while not [e for e in (await Inbox.open(store))[1] if e.update.attempt == 1]:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)
    await asyncio.wait_for(workers.close(), 1)  # does not sit out the minute
    _, [left] = await Inbox.open(store)
    assert left.update.attempt == 1 and rec.handled == []


class HeldSends(FakeHomeserver):
    """Holds the bot's messages into ``held`` rooms until ``release`` is set."""

    def __init__(self, held: set[str]) -> None:
        super().__init__()
        self.held, self.release = held, asyncio.Event()
        self.holding: list[str] = []

    async def send(self, room_id: str, content: dict, txn_id: str | None = None) -> str:
        if room_id in self.held:
            self.holding.append(content["body"])
            await self.release.wait()
        return await super().send(room_id, content, txn_id)


class CountingAgent:
    """Echoes once ``release`` is set; counts the calls running at once."""

    def __init__(self) -> None:
        self.running, self.peak, self.release = 0, 0, asyncio.Event()

    async def reply(self, chat: Chat, text: str) -> str:
        self.running += 1
        self.peak = max(self.peak, self.running)
        await self.release.wait()
        self.running -= 1
        return f"Echo: {text}"


async def chat_rooms(svc: Services, count: int) -> list[str]:
    """Alice onboarded, with ``count`` chat rooms (CHAT first)."""
    await onboard(svc)
    rooms = [CHAT]
    for i in range(2, count + 1):
        chat = await svc.chats.get_or_create(ALICE, f"c{i}", f"Chat {i}")
        await svc.store.set_room(f"!chat{i}:x", RoomMeta("chat", ALICE, chat.chat_id, SPACE))
        rooms.append(f"!chat{i}:x")
    return rooms


def delivery_over(inbox: Inbox, svc: Services) -> Delivery:
    """Lanes that feed the handlers as the chain would, every record being there."""

    async def feed(update: Update) -> None:
        await handle_update(update, await healed_data(svc, update))

    return Delivery(inbox, feed, feed)


async def test_a_room_waiting_on_the_homeserver_holds_no_agent_slot(store):
    hs = HeldSends(held={CHAT})
    svc = replace(make_services(store, hs), agent_slots=asyncio.Semaphore(1))
    first, second = await chat_rooms(svc, 2)
    inbox, _ = await Inbox.open(store)
    workers = delivery_over(inbox, svc)
    workers.push(await inbox.ingest([message(first, "first", event_id="$1")], "t1"))
    await until(lambda: hs.holding == ["Echo: first"])  # answered; its send waits on the server
    workers.push(await inbox.ingest([message(second, "second", event_id="$2")], "t2"))
    await until(lambda: "Echo: second" in hs.bodies)  # the only slot was free
    hs.release.set()
    await until(lambda: "Echo: first" in hs.bodies)
    await workers.close()


async def test_agent_slots_bound_the_agent_calls_at_once(store):
    agent, hs = CountingAgent(), FakeHomeserver()
    svc = replace(make_services(store, hs), agent=agent, agent_slots=asyncio.Semaphore(2))
    rooms = await chat_rooms(svc, 5)
    inbox, _ = await Inbox.open(store)
    workers = delivery_over(inbox, svc)
    workers.push(
        await inbox.ingest(
            [message(room, f"q{i}", event_id=f"${i}") for i, room in enumerate(rooms)], "t"
        )
    )
    await until(lambda: agent.running == 2)
    agent.release.set()
    await until(lambda: len(hs.sent) == 5)
    assert agent.peak == 2
    await workers.close()
