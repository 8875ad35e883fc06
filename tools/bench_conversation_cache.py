"""Benchmark: the conversation cache's bound (`make bench`), without a homeserver.

A fake homeserver answers ``/messages`` with realistic events, parsed from JSON as the wire
gives them (the fields sync gives, 200-character questions, answers of 1-3 KB with their HTML).
Prints, from one run (compare the ratios, not the absolute numbers):
- the memory the process grows by while the history of N rooms (10,000 by default) is read
  through the cache, against the budget (tracemalloc; ``--rss``: RSS). Target: within budget
  + 20%;
- what the same rooms would hold as raw events, unbounded (as the cache kept them before);
- the cache's part of a warm answer (the question observed, the history read from the cache,
  the answer noted, ``follows``), with and without eviction pressure.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import random
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import structlog

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from adapter.matrix.conversation import history as cache  # noqa: E402
from adapter.matrix.conversation.history import Conversations  # noqa: E402
from adapter.matrix.conversation.markdown import render  # noqa: E402
from adapter.matrix.vocabulary.content import message_content  # noqa: E402

BOT, SERVER = "@lambda:bench.example", "bench.example"
TARGET_OVER_BUDGET = 1.2
WORDS = "the a of to and in is it you that was for on are with as I his they be at one".split()


def prose(rng: random.Random, chars: int) -> str:
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < chars:
        words.append(rng.choice(WORDS))
    return " ".join(words)[:chars]


def page_template(window: int, seed: int = 7) -> str:
    """A room's ``/messages`` page (newest first) as JSON, with ROOM where the room's id goes:
    an owner's 200-character questions and the bot's 1-3 KB Markdown answers, by turns."""
    rng, ts = random.Random(seed), 1_760_000_000_000
    events: list[dict] = []
    owner = f"@owner-ROOM:{SERVER}"
    for i in range(window):
        ts += rng.randrange(1_000, 60_000)
        common = {"origin_server_ts": ts, "event_id": f"$ev{i}-ROOM-{'x' * 30}", "room_id": "ROOM"}
        if i % 2 == 0:
            content = {"msgtype": "m.text", "body": prose(rng, 200)}
            events.append(
                {"type": "m.room.message", "sender": owner, "content": content, **common}
                | {"unsigned": {"age": rng.randrange(10**6), "membership": "join"}}
            )
        else:
            answer = "\n\n".join(
                f"**{prose(rng, 30)}** {prose(rng, rng.randrange(200, 700))}" for _ in range(4)
            )[: rng.randrange(1_000, 3_000)]
            source = events[-1]["event_id"]
            content = message_content(
                answer, html=render(answer), notice=False, source_event_id=source
            )
            events.append(
                {"type": "m.room.message", "sender": BOT, "content": content, **common}
                | {"unsigned": {"age": rng.randrange(10**6), "transaction_id": f"lambda-{i}"}}
            )
    return json.dumps(events[::-1])


class FakeHomeserver:
    """``/messages`` of any room: the template's events, parsed afresh (new objects, as from
    the wire), for that room."""

    bot_id = BOT

    def __init__(self, template: str) -> None:
        self.template = template
        self.reads = 0

    async def messages(self, room_id, start, end, limit, types, forward=False, senders=None):
        self.reads += 1
        return json.loads(self.template.replace("ROOM", room_id[1:]))[:limit], None


def room(i: int) -> str:
    return f"!room{i:06d}:{SERVER}"


def question(room_id: str, n: int) -> dict:
    return {
        "type": "m.room.message",
        "sender": f"@owner-{room_id[1:]}:{SERVER}",
        "event_id": f"$q{n}-{room_id[1:]}",
        "origin_server_ts": 1_800_000_000_000 + n,
        "content": {"msgtype": "m.text", "body": f"question {n} " + "x" * 190},
        "unsigned": {"age": 12},
        "room_id": room_id,
    }


async def warm_answer(conversation: Conversations, room_id: str, n: int, answer: str) -> float:
    """The cache's part of one answer in a room: seconds."""
    ev = question(room_id, n)
    started = time.perf_counter()
    conversation.observe(room_id, [ev])
    await conversation.history(room_id, ev["sender"], ev["event_id"], ev["origin_server_ts"])
    conversation.sent(
        room_id,
        f"$a{n}-{room_id[1:]}",
        message_content(answer, source_event_id=ev["event_id"], notice=False),
    )
    conversation.follows(room_id, ev["event_id"])
    return time.perf_counter() - started


def rss_mb() -> float:
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith("VmRSS")).split()[1]) / 1024


async def read_rooms(conversation: Conversations, first: int, end: int) -> None:
    """Each room's message arrives (sync), then its history is read for the agent."""
    for i in range(first, end):
        ev = question(room(i), 0)
        conversation.observe(room(i), [ev])
        await conversation.history(room(i), ev["sender"], ev["event_id"], ev["origin_server_ts"])


async def memory(template: str, rooms: int, turns: int, budget: int, traced: bool) -> dict:
    """The process's growth while ``rooms`` rooms are read through a cache of ``budget``:
    ``traced``, what tracemalloc counts (Python's allocations, exactly); else RSS."""
    gc.collect()
    rss_before = rss_mb()
    if traced:
        tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    hs = FakeHomeserver(template)
    conversation = Conversations(hs, turns, budget)  # type: ignore[arg-type]
    started = time.perf_counter()
    await read_rooms(conversation, 0, rooms)
    took = time.perf_counter() - started
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    rss = (rss_mb() - rss_before) * 2**20
    kept = sum(room(i) in conversation for i in range(rooms))
    return {
        "grown": grown if traced else rss,
        "estimate": conversation.size,
        "rss": rss,
        "kept": kept,
        "reads": hs.reads,
        "took": took,
        "conversation": conversation,
    }


async def raw_per_room(template: str, rooms: int) -> float:
    """Bytes a room's raw events hold (what the cache kept before it was bounded)."""
    hs = FakeHomeserver(template)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    held = [await hs.messages(room(i), None, None, 10**6, []) for i in range(rooms)]
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    del held
    return grown / rooms


async def answer_times(
    small: Conversations, full: Conversations, rooms: list[str], answers: int, newcomer: int
) -> tuple[list[float], list[float], list[float]]:
    """The cache's part of warm answers over ``rooms`` in turn, interleaved so that the
    machine's noise hits each alike: in ``small`` (only these rooms), in ``full`` (at the
    budget), and in ``full`` right after a new room's read (from ``newcomer`` on) evicted
    the least recently used room (that read is not timed)."""
    text = prose(random.Random(3), 2_000)
    alone: list[float] = []
    calm: list[float] = []
    pressed: list[float] = []
    for n in range(answers):
        room_id = rooms[n % len(rooms)]
        alone.append(await warm_answer(small, room_id, 3 * n, text))
        calm.append(await warm_answer(full, room_id, 3 * n + 1, text))
        await read_rooms(full, newcomer + n, newcomer + n + 1)
        pressed.append(await warm_answer(full, room_id, 3 * n + 2, text))
    return alone, calm, pressed


def us(values: list[float]) -> str:
    values = sorted(values)
    p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
    return f"median {statistics.median(values) * 1e6:7.0f} us  p99 {p99 * 1e6:7.0f} us"


async def bench(rooms: int, turns: int, budget_mb: float, answers: int, rss: bool) -> None:
    budget = int(budget_mb * 2**20)
    window = cache.read_size(turns)
    template = page_template(window)
    mb = 2**20
    print(
        f"Lambda conversation cache benchmark: {rooms} rooms read through the cache, "
        f"{window} events a room (LAMBDA_HISTORY_TURNS={turns}), a fake homeserver"
    )
    found = await memory(template, rooms, turns, budget, traced=not rss)
    grown, estimate = found["grown"], found["estimate"]
    verdict = "ok" if grown <= budget * TARGET_OVER_BUDGET else "MISSED"
    how = "RSS" if rss else f"tracemalloc; RSS +{found['rss'] / mb:.0f} MB with tracemalloc's own"
    print(
        f"  budget {budget / mb:.0f} MB: the process grew by {grown / mb:.1f} MB ({how}), "
        f"{grown / budget:.2f}x the budget (target <= {TARGET_OVER_BUDGET}: {verdict})"
    )
    print(
        f"    the cache's estimate {estimate / mb:.1f} MB ({estimate / grown:.2f}x measured); "
        f"{found['kept']} rooms kept of {rooms}, {grown / max(found['kept'], 1) / 1024:.1f} KB "
        f"a room; {found['reads']} reads in {found['took']:.1f} s"
    )
    # After the growth measured above, whose RSS what this frees would hide.
    raw = await raw_per_room(template, 200)
    print(
        f"  raw events, as the cache kept them before: {raw / 1024:.0f} KB a room, "
        f"{raw * rooms / mb:.0f} MB for {rooms} rooms (unbounded)"
    )
    # 50 rooms in use, in a cache that holds only them, and in the full one: without new
    # rooms, and with a new room read (evicting the least recently used) before each answer.
    conversation = found["conversation"]
    working = [room(i) for i in range(rooms - 50, rooms)]
    small = Conversations(FakeHomeserver(template), turns, budget)  # type: ignore[arg-type]
    await read_rooms(small, rooms - 50, rooms)
    await answer_times(small, conversation, working, 100, rooms)  # warm-up: allocations
    alone, calm, pressed = await answer_times(small, conversation, working, answers, rooms + 100)
    print("  the cache's part of a warm answer (observe, history, sent, follows), 50 rooms in use")
    for what, times in (
        (f"{small.size / mb:.1f} MB held (only them)", alone),
        (f"{conversation.size / mb:.1f} MB held (at the budget)", calm),
        ("the same, just after an eviction", pressed),
    ):
        ratio = statistics.median(times) / statistics.median(alone)
        print(f"    {what:34}{us(times)}   {ratio:.2f}x")
    print(
        f"    (a new room read before each of the last: {answers + 100} rooms evicted; of the "
        f"50 in use, {sum(r in conversation for r in working)} still kept)"
    )


def main() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rooms", type=int, default=10_000)
    parser.add_argument("--turns", type=int, default=20, help="LAMBDA_HISTORY_TURNS")
    parser.add_argument("--budget-mb", type=float, default=cache.BUDGET_BYTES / 2**20)
    parser.add_argument("--answers", type=int, default=2_000)
    parser.add_argument(
        "--rss",
        action="store_true",
        help="measure the growth as RSS (the operator's figure) rather than with tracemalloc",
    )
    args = parser.parse_args()
    asyncio.run(bench(args.rooms, args.turns, args.budget_mb, args.answers, args.rss))


if __name__ == "__main__":
    main()
