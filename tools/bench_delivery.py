"""Benchmark: delivery (SPEC §5) against a local Synapse (`make bench`).

Prints, from one run on one machine:
- concurrency: K users onboarded, then each sends one message in its own chat at the same
  moment to an agent that takes AGENT_DELAY_S; each reply's latency (the homeserver's
  timestamps: reply minus message) as a multiple of that delay. Target: median <= 1.1,
  max <= 1.3 (no user waits for another);
- a gap: N messages sent by one user in one chat while the bot is stopped (its DB and sync
  token kept), then the bot started: how many answered, in order, and how fast.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import structlog

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from bench_heal import BotProcess, Logs  # noqa: E402
from homeserver import LocalHomeserver  # noqa: E402
from sandbox import bot_config, throwaway_homeserver  # noqa: E402
from scripted_user import SOURCE_KEY, ScriptedUser  # noqa: E402

from core.chat import Chat  # noqa: E402

AGENT_DELAY_S = 1.0
TARGET_MEDIAN, TARGET_MAX = 1.1, 1.3


class TimedCalls(Protocol):
    """When (epoch ms) each text's agent call began and ended: ``calls[text] = (began, ended)``."""

    @property
    def calls(self) -> Mapping[str, tuple[float, float]]: ...


class SlowAgent:
    """An agent that thinks for AGENT_DELAY_S, then echoes; it notes when (epoch ms) each
    text's call began and ended, to split a latency into homeserver and bot time."""

    def __init__(self) -> None:
        self.calls: dict[str, tuple[float, float]] = {}

    async def reply(self, chat: Chat, text: str) -> str:
        began = time.time() * 1000
        await asyncio.sleep(AGENT_DELAY_S)
        self.calls[text] = (began, time.time() * 1000)
        return f"Echo: {text}"


async def users(hs: LocalHomeserver, count: int, bot_id: str) -> list[ScriptedUser]:
    """``count`` fresh users, registered and logged in concurrently."""
    accounts = await asyncio.gather(
        *(asyncio.to_thread(hs.register, f"user{i}", "user-pw") for i in range(count))
    )
    return list(
        await asyncio.gather(
            *(ScriptedUser.log_in(hs.url, a.user_id, a.password, bot_id) for a in accounts)
        )
    )


async def answered(logs: Sequence[Mapping[str, Any]], event_ids: list[str], timeout: float) -> None:
    """Wait until the bot logged ``message.answered`` for each of ``event_ids``."""
    wanted, deadline = set(event_ids), time.monotonic() + timeout
    while not wanted <= {e.get("event_id") for e in logs if e["event"] == "message.answered"}:
        if time.monotonic() > deadline:
            return
        await asyncio.sleep(0.05)


async def burst(
    logs: Sequence[Mapping[str, Any]],
    agent: TimedCalls,
    group: list[tuple[ScriptedUser, str]],
    label: str,
) -> dict:
    """Every user sends one message in its chat at once; latency per user / agent delay.
    The users do not sync until the bot is done: the observers must not load the
    homeserver (nor this event loop) while they are being measured."""
    texts = [f"{label} from {i}" for i in range(len(group))]
    sent = await asyncio.gather(
        *(person.send(chat, text) for (person, chat), text in zip(group, texts, strict=False))
    )
    await answered(logs, sent, timeout=60)
    replies = await asyncio.gather(
        *(
            person.wait_answers(chat, [event_id], timeout=10)
            for (person, chat), event_id in zip(group, sent, strict=False)
        )
    )
    ratios, to_agent, to_reply = [], [], []
    for (person, chat), event_id, found, text in zip(group, sent, replies, texts, strict=False):
        if event_id in found:
            asked, stamped = (
                await person.origin_ts(chat, event_id),
                found[event_id]["origin_server_ts"],
            )
            ratios.append((stamped - asked) / 1000 / AGENT_DELAY_S)
            began, ended = agent.calls[text]
            to_agent.append(began - asked)
            to_reply.append(stamped - ended)
    begins = [agent.calls[text][0] for text in texts if text in agent.calls]
    return {
        "k": len(group),
        "answered": len(ratios),
        "ratios": ratios,
        "to_agent": to_agent,
        "to_reply": to_reply,
        "spread": max(begins) - min(begins) if begins else float("nan"),
    }


async def gap(bot: BotProcess, logs: Logs, person: ScriptedUser, chat: str, n: int) -> dict:
    """``n`` messages while the bot is stopped; then start it and wait for the answers
    (seen by the user's sync); then check them against the room's own timeline."""
    await bot.stop()
    started = time.perf_counter()
    sent = [await person.send(chat, f"gap{n} {i}") for i in range(n)]
    sending = time.perf_counter() - started
    await person._drain(0)  # the user's own messages: not to be counted as waiting time
    started, mark = time.perf_counter(), len(logs)
    await bot.start(logs)
    await person.wait_answers(chat, sent, timeout=max(60, n * 0.5))
    last_seen = time.perf_counter() - started
    wanted = set(sent)
    replies = [
        ev
        for ev in await person.history(chat, 2 * n + 10)
        if ev.get("sender") == person.bot_id and (ev.get("content") or {}).get(SOURCE_KEY) in wanted
    ]
    order = [ev["content"][SOURCE_KEY] for ev in replies]
    bodies = {ev["content"][SOURCE_KEY]: ev["content"].get("body") for ev in replies}
    echoes_ok = all(bodies[e] == f"Echo: gap{n} {i}" for i, e in enumerate(sent) if e in bodies)
    return {
        "n": n,
        "answered": len(set(order)),
        "duplicates": len(order) - len(set(order)),
        "in_order": order == [e for e in sent if e in bodies] and echoes_ok,
        "sending": sending,
        "last_seen": last_seen,
        "backfilled": sum(
            e["events"]
            for e in logs[mark:]
            if e["event"] == "sync.gap_backfilled" and e.get("room_id") == chat
        ),
    }


async def bench(sizes: list[int], gaps: list[int]) -> None:
    people: list[ScriptedUser] = []
    with throwaway_homeserver("lambda-bench-delivery-") as (hs, work):
        try:
            config = bot_config(hs, work, "deliverybot")
            slow = SlowAgent()
            bot = BotProcess(config, slow)
            with structlog.testing.capture_logs() as logs:
                await bot.start(logs)
                started = time.perf_counter()
                people = await users(hs, max(sizes) + 1, config.user_id)
                rooms = await asyncio.gather(*(person.onboard() for person in people))
                onboarding = time.perf_counter() - started
                chats = [
                    (person, chat) for person, (_, _, chat) in zip(people, rooms, strict=False)
                ]
                loner, loner_chat = chats.pop()
                bursts = [await burst(logs, slow, chats[:k], f"burst{k}") for k in sizes]
                bot.agent = None  # from here on: config.agent, the echo agent
                gaps_seen = [await gap(bot, logs, loner, loner_chat, n) for n in gaps]
                await bot.stop()
        finally:
            for person in people:
                await person.close()

    print(f"Lambda delivery benchmark: Synapse on {hs.url}, agent delay {AGENT_DELAY_S:.1f} s")
    print(f"  onboarding {len(people)} users at once           {onboarding:7.1f} s")
    for b in bursts:
        r = b["ratios"] or [float("nan")]
        med, top = statistics.median(r), max(r)
        verdict = (
            "ok"
            if (b["answered"] == b["k"] and med <= TARGET_MEDIAN and top <= TARGET_MAX)
            else "MISSED"
        )
        print(
            f"  K={b['k']:3} users at once: latency / delay  median {med:5.2f}  max {top:5.2f}"
            f"  answered {b['answered']}/{b['k']}  (target <= {TARGET_MEDIAN} / <= "
            f"{TARGET_MAX}: {verdict})"
        )
        if b["to_agent"]:
            print(
                f"         message stamped -> agent called {ms_spread(b['to_agent'])}, "
                f"all {b['k']} calls within {b['spread']:.0f} ms; agent returned -> reply "
                f"stamped {ms_spread(b['to_reply'])}"
            )
    for g in gaps_seen:
        print(
            f"  gap N={g['n']:4} sent while stopped ({g['sending']:4.1f} s to send): answered "
            f"{g['answered']}/{g['n']}, duplicates {g['duplicates']}, in order "
            f"{'yes' if g['in_order'] else 'NO'}, last answer seen "
            f"{g['last_seen']:5.1f} s after bot start ({g['backfilled']} via /messages)"
        )


def ms_spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.0f} ms (max {max(values):.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--gaps", type=int, nargs="+", default=[120, 500])
    args = parser.parse_args()
    asyncio.run(bench(sorted(args.users), args.gaps))


if __name__ == "__main__":
    main()
