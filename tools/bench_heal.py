"""Benchmark: what lazy healing costs, measured against a local Synapse (`make bench`).

Prints, from one run on one machine (so compare the ratios, not the absolute numbers):
- a healthy reply's latency, and the first reply in a room after a total local loss;
- homeserver requests per healed room (from the `state.healed` log lines);
- `!chats` with N chats, warm and after a total local loss (it heals the whole Space);
- what metrics cost: healthy replies with and without LAMBDA_METRICS_ADDR (scraped every
  100 ms, 150 times Prometheus' default rate), in alternating runs, as a ratio (and the ratio
  between plain runs, the noise); what recording one answered message and one scrape take.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import MutableMapping
from contextlib import suppress
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import structlog

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from sandbox import bot_config, throwaway_homeserver  # noqa: E402
from scripted_user import ScriptedUser  # noqa: E402

from adapter.matrix.config import Config, ListenAddr  # noqa: E402
from adapter.matrix.handlers.chat_rooms import linked_rooms  # noqa: E402
from adapter.matrix.observe.metrics import Metrics  # noqa: E402
from adapter.matrix.run import run_bot  # noqa: E402
from core.agent import Agent  # noqa: E402

SCRAPE_EVERY_S = 0.1
Logs = list[MutableMapping[str, Any]]  # the log lines, as structlog.testing.capture_logs


class BotProcess:
    def __init__(self, config: Config, agent: Agent | None = None) -> None:
        """``agent`` overrides ``config.agent`` (None: the one the config names)."""
        self.config, self.agent = config, agent
        self.task: asyncio.Task[int] | None = None
        self.stop_event: asyncio.Event | None = None

    async def start(self, logs: Logs) -> float:
        """Start the bot in-process; returns seconds until it logged ``bot.ready``."""
        started = time.perf_counter()
        seen = sum(e["event"] == "bot.ready" for e in logs)
        self.stop_event = asyncio.Event()
        self.task = asyncio.create_task(run_bot(self.config, self.stop_event, self.agent))
        while sum(e["event"] == "bot.ready" for e in logs) <= seen:
            if self.task.done():
                raise RuntimeError(f"the bot exited with {self.task.result()} before bot.ready")
            await asyncio.sleep(0.01)
        return time.perf_counter() - started

    async def stop(self) -> None:
        assert self.stop_event is not None and self.task is not None, "stop() before start()"
        self.stop_event.set()
        await self.task

    def lose_everything(self) -> None:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.config.db_path}{suffix}").unlink(missing_ok=True)
        shutil.rmtree(self.config.store_path, ignore_errors=True)


async def cli_start_seconds(config: Config) -> float:
    """`python -m adapter.matrix` from exec to its `bot.ready` line, then SIGTERM."""
    env = {**os.environ, **config.to_env()}
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "adapter.matrix", cwd=ROOT, env=env, stderr=asyncio.subprocess.PIPE
    )
    assert proc.stderr is not None  # a pipe
    async for raw in proc.stderr:
        if json.loads(raw).get("event") == "bot.ready":
            break
    seconds = time.perf_counter() - started
    proc.terminate()
    await proc.wait()
    return seconds


async def scrape_every(url: str, seconds: float, scrapes: list[int]) -> None:
    """GET ``url`` every ``seconds`` until cancelled, like a (very eager) Prometheus."""
    async with aiohttp.ClientSession() as http:
        while True:
            async with http.get(url) as resp:
                await resp.read()
            scrapes[0] += 1
            await asyncio.sleep(seconds)


async def metrics_cost(
    bot: BotProcess,
    person: ScriptedUser,
    room: str,
    logs: Logs,
    samples: int,
) -> dict:
    """Healthy replies in alternating runs without and with a metrics listener being scraped
    (plain, metered, metered, plain, twice: a drift of the machine weighs on both alike). The
    plain runs that open and close each block, compared, show the noise between runs."""
    runs: list[tuple[bool, list[float]]] = []
    scrapes = [0]
    for metered in [False, True, True, False] * 2:
        await bot.stop()
        bot.config = replace(
            bot.config, metrics_addr=ListenAddr("127.0.0.1", 0) if metered else None
        )
        await bot.start(logs)
        scraper = None
        if metered:
            url = [e for e in logs if e["event"] == "metrics.listening"][-1]["url"]
            scraper = asyncio.create_task(scrape_every(f"{url}/metrics", SCRAPE_EVERY_S, scrapes))
        replies = []
        for i in range(samples):
            text = f"metrics {len(runs)}.{i}"
            replies.append((await person.ask(room, text, f"Echo: {text}"))[0])
        runs.append((metered, replies))
        if scraper is not None:
            scraper.cancel()
            with suppress(asyncio.CancelledError):
                await scraper
    return {
        "plain": [t for metered, r in runs if not metered for t in r],
        "metered": [t for metered, r in runs if metered for t in r],
        "opening": [t for i, (_, r) in enumerate(runs) if i % 4 == 0 for t in r],
        "closing": [t for i, (_, r) in enumerate(runs) if i % 4 == 3 for t in r],
        "scrapes": scrapes[0],
        **await recording_cost(),
    }


async def recording_cost(runs: int = 100_000) -> dict:
    """Seconds to record what one answered message and its sync round record (the agent
    call's timing wrapper included, an empty call's own cost taken off), and to build one
    scrape."""
    metrics = Metrics()

    async def agent() -> str:
        return "answer"

    async def bare() -> float:
        started = time.perf_counter()
        for _ in range(runs):
            await agent()
        return time.perf_counter() - started

    async def recorded() -> float:
        started, ts = time.perf_counter(), int(time.time() * 1000)
        for _ in range(runs):
            await metrics.timed_agent_call(agent())
            metrics.answered(ts)
            metrics.sync_rounds.inc()
        return time.perf_counter() - started

    per_message = (await recorded() - await bare()) / runs
    started = time.perf_counter()
    for _ in range(100):
        metrics.exposition()
    return {"per_message": per_message, "per_scrape": (time.perf_counter() - started) / 100}


def ms(values: list[float]) -> str:
    return f"median {statistics.median(values) * 1000:7.1f} ms  (n={len(values)})"


async def bench(chats: int, samples: int) -> None:
    with throwaway_homeserver("lambda-bench-") as (hs, work):
        # Its user makes 30 chats at once: past the 5-a-minute throttle of !new.
        config = replace(bot_config(hs, work, "benchbot"), creations_per_minute=1000)
        user_account = hs.register("benchuser", "benchuser-pw")
        cli_config = bot_config(hs, work, "clibot")
        cli = {
            "first start": await cli_start_seconds(cli_config),
            "restart": await cli_start_seconds(cli_config),
        }
        bot = BotProcess(config)
        person = await ScriptedUser.log_in(
            hs.url, user_account.user_id, user_account.password, config.user_id
        )
        with structlog.testing.capture_logs() as logs:
            starts = {"first start (password login)": await bot.start(logs)}
            lobby = await person.invite_bot()
            await person.wait_for_bot(lobby, "Welcome")
            rooms = []
            for i in range(chats):
                _, text = await person.ask(lobby, f"!new Bench {i}", "Created")
                rooms.extend(linked_rooms(text))
            healthy = [
                (await person.ask(rooms[0], f"hi {i}", f"Echo: hi {i}"))[0] for i in range(samples)
            ]
            warm_chats = [(await person.ask(lobby, "!chats", "Your chats"))[0] for _ in range(3)]
            cost = await metrics_cost(bot, person, rooms[0], logs, samples)

            await bot.stop()
            starts["restart, state intact"] = await bot.start(logs)
            await bot.stop()
            bot.lose_everything()
            starts["restart after total loss"] = await bot.start(logs)
            first = [
                (await person.ask(room, "after loss", "Echo: after loss"))[0]
                for room in rooms[:samples]
            ]
            healed = [e for e in logs if e["event"] == "state.healed"]

            await bot.stop()
            bot.lose_everything()
            await bot.start(logs)
            mark = len(logs)
            cold_chats, listing = await person.ask(lobby, "!chats", "Your chats")
            cold_heals = [e for e in logs[mark:] if e["event"] == "state.healed"]
            await bot.stop()
        await person.close()

    requests = [e["hs_requests"] for e in healed]
    print(f"Lambda healing benchmark: {chats} chats, {samples} samples, Synapse on {hs.url}")
    for what, seconds in cli.items():
        print(f"  python -m adapter.matrix -> ready: {what:14} {seconds * 1000:7.1f} ms")
    for what, seconds in starts.items():
        print(f"  bot start -> ready: {what:27} {seconds * 1000:7.1f} ms")
    print(f"  healthy reply                       {ms(healthy)}")
    print(
        f"  first reply after total loss        {ms(first)}   "
        f"ratio {statistics.median(first) / statistics.median(healthy):.2f}x"
    )
    print(
        f"  heal itself (state.healed)          median "
        f"{statistics.median(e['duration_ms'] for e in healed):7.1f} ms  (n={len(healed)})"
    )
    print(
        f"  homeserver requests per healed room min {min(requests)}  max {max(requests)}  "
        f"mean {statistics.mean(requests):.2f}"
    )
    print(f"  !chats warm ({chats} chats)             {ms(warm_chats)}")
    print(
        f"  !chats after total loss             {cold_chats * 1000:7.1f} ms  "
        f"({len(cold_heals)} rooms healed, "
        f"{sum(e['hs_requests'] for e in cold_heals)} state requests; listed "
        f"{listing.count('Bench ')} chats)"
    )
    plain, metered = statistics.median(cost["plain"]), statistics.median(cost["metered"])
    print(f"  healthy reply, no metrics listener  {ms(cost['plain'])}")
    print(
        f"  healthy reply, /metrics scraped     {ms(cost['metered'])}   "
        f"ratio {metered / plain:.2f}x  ({cost['scrapes']} scrapes, every "
        f"{SCRAPE_EVERY_S * 1000:.0f} ms)"
    )
    print(
        f"    noise: plain runs closing / opening each block  ratio "
        f"{statistics.median(cost['closing']) / statistics.median(cost['opening']):.2f}x"
    )
    print(
        f"  recording one answered message      {cost['per_message'] * 1e6:7.1f} µs;  one "
        f"scrape built in {cost['per_scrape'] * 1e6:.0f} µs"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chats", type=int, default=30)
    parser.add_argument("--samples", type=int, default=10)
    args = parser.parse_args()
    asyncio.run(bench(args.chats, args.samples))


if __name__ == "__main__":
    main()
