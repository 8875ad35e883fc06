"""Benchmark: what reading the conversation from the room costs (`make bench`).

Prints, from one run (compare the ratios, not the absolute numbers):
- a warm answer with an old-style agent (no history) and with one that takes history;
- the first answer in a room after a restart, when its history is read from the room;
- how many `/messages` reads each room cost in a run (target: at most 1).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import structlog

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from bench_heal import BotProcess, ms  # noqa: E402
from sandbox import bot_config, throwaway_homeserver  # noqa: E402
from scripted_user import ScriptedUser  # noqa: E402

from adapter.matrix.handlers.chat_rooms import linked_rooms  # noqa: E402
from core.agent import EchoAgent, Turn  # noqa: E402
from core.chat import Chat  # noqa: E402


class HistoryEcho:
    """Takes the conversation, as a language model would, and echoes."""

    async def reply(self, chat: Chat, text: str, history: list[Turn]) -> str:
        return f"Echo: {text} (after {len(history)} turns)"


async def bench(rooms: int, turns: int, samples: int) -> None:
    with throwaway_homeserver("lambda-bench-conv-") as (hs, work):
        config = replace(bot_config(hs, work, "convbot"), creations_per_minute=1000)
        account = hs.register("convuser", "convuser-pw")
        person = await ScriptedUser.log_in(
            hs.url, account.user_id, account.password, config.user_id
        )
        with structlog.testing.capture_logs() as logs:
            bot = BotProcess(config, EchoAgent())
            await bot.start(logs)
            lobby, _, first = await person.onboard()
            chats = [first]
            for i in range(rooms - 1):
                _, text = await person.ask(lobby, f"!new Talk {i}", "Created")
                chats.append(linked_rooms(text)[0])
            for room in chats:  # a conversation in every room
                for i in range(turns):
                    await person.ask(room, f"turn {i}", f"Echo: turn {i}")
            echo_warm = [
                (await person.ask(chats[0], f"old {i}", f"Echo: old {i}"))[0]
                for i in range(samples)
            ]
            await bot.stop()

            bot = BotProcess(config, HistoryEcho())
            await bot.start(logs)
            mark = len(logs)
            cold = [
                (await person.ask(room, "first after restart", "Echo: first"))[0] for room in chats
            ]
            warm = [
                (await person.ask(chats[0], f"warm {i}", f"Echo: warm {i}"))[0]
                for i in range(samples)
            ]
            reads = Counter(e["room_id"] for e in logs[mark:] if e["event"] == "conversation.read")
            await bot.stop()
        await person.close()

    echo_median, warm_median = statistics.median(echo_warm), statistics.median(warm)
    print(
        f"Lambda conversation benchmark: {rooms} rooms with {turns} turns each, Synapse on {hs.url}"
    )
    print(f"  warm answer, old-style agent (no history)  {ms(echo_warm)}")
    print(
        f"  warm answer, agent taking history          {ms(warm)}   "
        f"ratio {warm_median / echo_median:.2f}x the old style"
    )
    print(
        f"  first answer in a room after a restart     {ms(cold)}   "
        f"ratio {statistics.median(cold) / warm_median:.2f}x warm (its history read)"
    )
    print(
        f"  /messages reads per room in that run       max {max(reads.values(), default=0)}"
        f"  total {sum(reads.values())} for {len(chats)} rooms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rooms", type=int, default=10)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--samples", type=int, default=15)
    args = parser.parse_args()
    asyncio.run(bench(args.rooms, args.turns, args.samples))


if __name__ == "__main__":
    main()
