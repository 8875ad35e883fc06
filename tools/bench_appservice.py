"""Benchmark: appservice mode against sync mode on the same local Synapse (`make bench`).

Prints, from one run on one machine, for each mode side by side:
- K users each sending one message in its own chat at the same moment to an agent that takes
  AGENT_DELAY_S: each reply's latency (the homeserver's timestamps: reply minus message) as a
  multiple of that delay, median and max; and the time from a message's send (its timestamp)
  to its handling starting (the agent being called);
- after DOWN seconds with the bot stopped, a message sent at the start of that time: the time
  from the bot's start to its answer (the answer's timestamp). Target: within 5 s. (Synapse
  backs off pushing to an appservice that is down; the start's ping makes it push at once.)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import MutableMapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import structlog
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from appservice import registration  # noqa: E402
from bench_delivery import AGENT_DELAY_S, SlowAgent, burst  # noqa: E402
from bench_heal import BotProcess  # noqa: E402
from homeserver import LocalHomeserver, free_port  # noqa: E402
from sandbox import bot_config  # noqa: E402
from scripted_user import ScriptedUser  # noqa: E402

from adapter.matrix.config import Registration  # noqa: E402

DOWN_TARGET_S = 5.0
# Users logging in, or being onboarded, at once: 129 of either at once overwhelm a Synapse on
# 2 shared cores (logins took 150 s; welcomes came after the users' 30 s wait).
LOGINS_AT_ONCE = 8


async def run_mode(
    mode: str,
    bot: BotProcess,
    hs: LocalHomeserver,
    logs: list[MutableMapping[str, Any]],
    sizes: list[int],
    down_s: float,
) -> dict:
    """Onboard max(sizes)+1 users with ``bot``, run the bursts, then the downtime."""
    slow = SlowAgent()
    bot.agent = slow
    await bot.start(logs)
    people = await users_for(hs, max(sizes) + 1, bot.config.user_id, mode)
    try:
        started = time.perf_counter()
        gate = asyncio.Semaphore(LOGINS_AT_ONCE)

        async def onboard(person: ScriptedUser) -> tuple[str, str, str]:
            async with gate:
                return await person.onboard()

        rooms = await asyncio.gather(*(onboard(person) for person in people))
        onboarding = time.perf_counter() - started
        chats = [(person, chat) for person, (_, _, chat) in zip(people, rooms, strict=True)]
        loner, loner_chat = chats.pop()
        bursts = [await burst(logs, slow, chats[:k], f"{mode}{k}") for k in sizes]
        await bot.stop()
        sent = await loner.send(loner_chat, f"{mode} while down")
        await asyncio.sleep(down_s)  # the scenario itself: the homeserver backs off meanwhile
        start_ms = time.time() * 1000
        await bot.start(logs)
        found = await loner.wait_answers(loner_chat, [sent], timeout=max(60.0, 4 * down_s))
        first_answer = (
            (found[sent]["origin_server_ts"] - start_ms) / 1000 if sent in found else float("nan")
        )
        await bot.stop()
    finally:
        for person in people:
            await person.close()
    return {"onboarding": onboarding, "bursts": bursts, "first_answer": first_answer}


async def users_for(hs: LocalHomeserver, count: int, bot_id: str, mode: str) -> list[ScriptedUser]:
    """Fresh users for one mode (a user per mode, so each bot onboards its own)."""
    gate = asyncio.Semaphore(LOGINS_AT_ONCE)

    async def user(i: int) -> ScriptedUser:
        async with gate:
            account = await asyncio.to_thread(hs.register, f"{mode}user{i}", "user-pw")
            return await ScriptedUser.log_in(hs.url, account.user_id, account.password, bot_id)

    return list(await asyncio.gather(*(user(i) for i in range(count))))


def spread(values: list[float], unit: str = "") -> str:
    if not values:
        return "   n/a"
    return f"{statistics.median(values):6.2f}{unit} / {max(values):6.2f}{unit}"


async def bench(sizes: list[int], down_s: float) -> None:
    with tempfile.TemporaryDirectory(prefix="lambda-bench-appservice-") as tmp:
        work = Path(tmp)
        reg_path = work / "registration.yaml"
        reg_path.write_text(
            yaml.safe_dump(
                registration(f"http://127.0.0.1:{free_port()}", "@asbot:localhost", "lambda-bench")
            )
        )
        hs = LocalHomeserver(
            work / "synapse",
            extra_config={
                "app_service_config_files": [str(reg_path)],
                "bcrypt_rounds": 4,  # the users' logins are not what is measured
            },
        )
        hs.start()
        try:
            synced = replace(bot_config(hs, work, "syncbot"), creations_per_minute=1000)
            reg = Registration.load(reg_path)
            pushed = replace(
                synced,
                user_id="@asbot:localhost",
                password=None,
                db_path=work / "asbot.db",
                store_path=work / "asbot_store",
                appservice=reg,
                appservice_listen=reg.listen_addr(),
            )
            with structlog.testing.capture_logs() as logs:
                results = {
                    "sync": await run_mode("sync", BotProcess(synced), hs, logs, sizes, down_s),
                    "appservice": await run_mode(
                        "appservice", BotProcess(pushed), hs, logs, sizes, down_s
                    ),
                }
        finally:
            hs.stop()

    print(
        f"Lambda appservice benchmark: Synapse on {hs.url}, agent delay {AGENT_DELAY_S:.1f} s, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    print(
        "  each figure median / max: reply latency / agent delay; message stamped -> agent "
        "called (ms)"
    )
    for mode, result in results.items():
        print(
            f"  {mode}: onboarding {max(sizes) + 1} users, {LOGINS_AT_ONCE} at a time, "
            f"{result['onboarding']:.1f} s"
        )
    for i, k in enumerate(sizes):
        row = []
        for mode, result in results.items():
            b = result["bursts"][i]
            row.append(
                f"{mode:10} {spread(b['ratios'])}  to handling {spread(b['to_agent'], '')}"
                f"  answered {b['answered']}/{k}"
            )
        print(f"  K={k:3}  " + "\n         ".join(row))
    for mode, result in results.items():
        seconds = result["first_answer"]
        verdict = "ok" if seconds <= DOWN_TARGET_S else "MISSED"
        print(
            f"  {mode:10} after {down_s:.0f} s down: start -> first answer of a message sent "
            f"while down {seconds:5.2f} s (target <= {DOWN_TARGET_S:.0f} s: {verdict})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, nargs="+", default=[8, 32, 64, 128])
    parser.add_argument("--down", type=float, default=60.0, help="seconds the bot is down")
    args = parser.parse_args()
    asyncio.run(bench(sorted(args.users), args.down))


if __name__ == "__main__":
    main()
