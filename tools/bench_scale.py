"""Benchmark: scale (SPEC §5, §7), with the bot as a real process (`make bench`).

Prints, from one run on one machine (compare the ratios, not the absolute numbers):
- bot start -> first reply, at 7 rooms and at 300 (built across users), after a total loss
  and after a healthy restart; the message was sent while the bot was down, and the time runs
  from the exec of ``python -m adapter.matrix`` to the reply's homeserver timestamp. Target:
  300 rooms take at most 1.3x what 7 take. With it, the bot process's memory;
- the case a user meets after a total loss: the bot started again right after its stop (no
  wait for an idle Synapse), the owner writing at ``bot.ready`` in one of their least recently
  active rooms, and ``!chats`` right after the answer; and the start's sweep, its total time.
  Target: both at 300 rooms at most 1.3x what they take at 7;
- K users writing at once to an agent that takes 1 s, for each K: median and max latency (the
  homeserver's timestamps: reply minus message) / 1 s. Target: max <= 1.15x median;
- the bot's /sync requests while 8 users type in its rooms for 10 s, counted on the wire by a
  proxy in front of Synapse. Target: at most 1 (its long poll).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import time
from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from bench_agent import LoggedCalls  # noqa: E402
from bench_delivery import AGENT_DELAY_S, burst, ms_spread, users  # noqa: E402
from bench_heal import BotProcess, Logs  # noqa: E402
from homeserver import LocalHomeserver  # noqa: E402
from nio import AsyncClient  # noqa: E402
from sandbox import bot_config, throwaway_homeserver  # noqa: E402
from scripted_user import ScriptedUser  # noqa: E402

from adapter.matrix.config import Config  # noqa: E402
from adapter.matrix.handlers.chat_rooms import linked_rooms  # noqa: E402
from tests.integration.fault_proxy import FaultProxy  # noqa: E402

TARGET_ROOMS_RATIO = 1.3
TARGET_MAX_OVER_MEDIAN = 1.15
TARGET_TYPING_SYNCS = 1
ONBOARD_BATCH = 8  # users onboarding at once (each waits at most 30 s for its welcome: 32 at
# once timed out on a loaded 2-core machine)
SYNC = r"/_matrix/client/v3/sync$"


class ProcessBot(BotProcess):
    """The bot as a real process (``python -m adapter.matrix``), its JSON log lines read into
    the ``logs`` given to ``start``; ``env`` adds variables (``LAMBDA_AGENT``, say)."""

    def __init__(self, config: Config, **env: str) -> None:
        super().__init__(config)
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task | None = None

    async def start(self, logs: Logs) -> float:
        """Exec the bot; returns seconds until it logged ``bot.ready``."""
        started = time.perf_counter()
        seen = sum(e.get("event") == "bot.ready" for e in logs)
        path = os.pathsep.join(filter(None, [str(ROOT / "tools"), os.environ.get("PYTHONPATH")]))
        env = {
            **os.environ,
            **self.config.to_env(),
            "LOG_FORMAT": "json",
            "PYTHONPATH": path,
            **self.env,
        }
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "adapter.matrix",
            cwd=ROOT,
            env=env,
            stderr=asyncio.subprocess.PIPE,
            limit=2**24,
        )
        self._reader = asyncio.create_task(self._read(logs))
        while sum(e.get("event") == "bot.ready" for e in logs) <= seen:
            if self._reader.done():
                raise RuntimeError(
                    f"the bot exited with {await self.proc.wait()} before bot.ready: {logs[-3:]}"
                )
            await asyncio.sleep(0.01)
        return time.perf_counter() - started

    async def _read(self, logs: Logs) -> None:
        assert self.proc and self.proc.stderr
        async for raw in self.proc.stderr:
            try:
                logs.append(json.loads(raw))
            except ValueError:
                logs.append({"event": "bench.unparsed", "level": "warning", "line": raw.decode()})

    async def stop(self) -> None:
        assert self.proc and self._reader
        self.proc.send_signal(signal.SIGTERM)
        await self.proc.wait()
        await self._reader

    def memory_mb(self) -> tuple[float, float]:
        """The bot process's resident memory now and at its peak (VmRSS, VmHWM), in MB."""
        assert self.proc
        status = Path(f"/proc/{self.proc.pid}/status").read_text().splitlines()
        fields = dict(line.split(":", 1) for line in status if ":" in line)
        return (int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024)


async def synapse_idle(hs: LocalHomeserver, below: float = 0.1, timeout: float = 60) -> None:
    """Until Synapse uses less than ``below`` of a core for a second: what building rooms set
    off in it is done, and does not share the CPU with the starts measured next."""
    assert hs._process is not None, "the homeserver is running"
    stat = Path(f"/proc/{hs._process.pid}/stat")

    def cpu_s() -> float:
        fields = stat.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    deadline, before = time.monotonic() + timeout, cpu_s()
    while time.monotonic() < deadline:
        await asyncio.sleep(1)
        if (now := cpu_s()) - before < below:
            return
        before = now


def logged_at(entry: Mapping[str, Any]) -> float:
    return datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00")).timestamp()


async def first_reply(
    hs: LocalHomeserver,
    bot: ProcessBot,
    logs: Logs,
    owner: ScriptedUser,
    chat: str,
    lose: bool,
    writes_again: bool = False,
) -> dict:
    """Stop the bot (and lose its DB and session, if ``lose``); the owner writes while it is
    down; once Synapse is idle (the last run's work done), start it (``writes_again``: the
    owner writes once more when it is ready). Seconds from the exec to the last reply's
    homeserver timestamp."""
    await bot.stop()
    if lose:
        bot.lose_everything()
    await synapse_idle(hs)
    sources = [await owner.send(chat, f"probe {time.time():.3f}")]
    began, mark = time.time(), len(logs)
    ready = await bot.start(logs)
    if writes_again:
        sources.append(await owner.send(chat, f"back {time.time():.3f}"))
    found = await owner.wait_answers(chat, sources, timeout=120)
    if set(sources) - set(found):
        raise RuntimeError(f"no answer to the probe in {chat}")
    probe = max(sources, key=lambda s: found[s]["origin_server_ts"])
    rss, peak = bot.memory_mb()
    starting = next(e for e in logs[mark:] if e.get("event") == "bot.starting")
    return {
        "first": found[probe]["origin_server_ts"] / 1000 - began,
        "ready": ready,
        "boot": logged_at(starting) - began,
        "rss": rss,
        "peak": peak,
    }


async def user_case(
    bot: ProcessBot, logs: Logs, owner: ScriptedUser, room: str, lobby: str
) -> dict:
    """A total loss as a user meets it: the bot is started right after its stop, with no wait
    for an idle Synapse; the owner writes in ``room`` (one of their least recently active) as
    soon as ``bot.ready`` is logged, then asks ``!chats`` in ``lobby`` once answered. Seconds,
    by the homeserver's timestamps; and the sweep's, from its ``sync.swept`` line."""
    await bot.stop()
    bot.lose_everything()
    began, mark = time.time(), len(logs)
    ready = await bot.start(logs)
    source = await owner.send(room, f"at ready {time.time():.3f}")
    found = await owner.wait_answers(room, [source], timeout=120)
    if source not in found:
        raise RuntimeError(f"no answer to the message at bot.ready in {room}")
    asked, answered = (await owner.origin_ts(room, source)) / 1000, found[source]
    command = await owner.send(lobby, "!chats")
    listed = (await owner.wait_answers(lobby, [command], timeout=120)).get(command)
    if listed is None:
        raise RuntimeError("no answer to !chats")
    deadline = time.monotonic() + 300
    while not (swept := [e for e in logs[mark:] if e.get("event") == "sync.swept"]):
        if time.monotonic() > deadline:
            raise RuntimeError("the sweep did not end")
        await asyncio.sleep(0.05)
    windows = [e for e in logs[mark:] if e.get("event") == "sync.catchup"]
    return {
        "first": answered["origin_server_ts"] / 1000 - began,
        "answer": answered["origin_server_ts"] / 1000 - asked,
        "chats": listed["origin_server_ts"] / 1000 - await owner.origin_ts(lobby, command) / 1000,
        "ready": ready,
        "sweep": swept[0]["duration_ms"] / 1000,
        "gave_way": swept[0].get("gave_way_ms", 0) / 1000,
        "rested": swept[0].get("rested_ms", 0) / 1000,
        "slowest": swept[0].get("slowest_ms", 0) / 1000,
        "windows": len(windows),
        "largest": max((w["rooms"] for w in windows), default=0),
    }


async def users_case(
    bot: ProcessBot,
    logs: Logs,
    owner: ScriptedUser,
    rooms: list[str],
    lobby: str,
    samples: int,
) -> list[dict]:
    """``user_case`` ``samples`` times, each in the owner's least recently active room then
    (``rooms``, least recently active first: each sample makes its room the most recent)."""
    return [await user_case(bot, logs, owner, rooms[i % len(rooms)], lobby) for i in range(samples)]


async def measure(
    hs: LocalHomeserver,
    bot: ProcessBot,
    logs: Logs,
    owner: ScriptedUser,
    chat: str,
    samples: int,
) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for kind, lose, writes_again in (
        ("healthy", False, False),
        ("loss", True, False),
        ("back", True, True),
    ):
        found[kind] = [
            await first_reply(hs, bot, logs, owner, chat, lose, writes_again)
            for _ in range(samples)
        ]
    return found


async def accounts(hs: LocalHomeserver, count: int, bot_id: str) -> list[ScriptedUser]:
    """``count`` fresh users (``user0``...), registered and logged in a batch at a time: all at
    once, their password hashing made the logins time out, again and again, on a loaded
    2-core machine."""
    people: list[ScriptedUser] = []
    for first in range(0, count, ONBOARD_BATCH):
        batch = range(first, min(count, first + ONBOARD_BATCH))
        made = await asyncio.gather(
            *(asyncio.to_thread(hs.register, f"user{i}", "user-pw") for i in batch)
        )
        people += await asyncio.gather(
            *(ScriptedUser.log_in(hs.url, a.user_id, a.password, bot_id) for a in made)
        )
    return people


async def onboard(people: list[ScriptedUser]) -> list[tuple[str, str, str]]:
    """Each user invites the bot and joins the Space and chat it makes, a batch at a time."""
    rooms: list[tuple[str, str, str]] = []
    for i in range(0, len(people), ONBOARD_BATCH):
        rooms += await asyncio.gather(*(p.onboard() for p in people[i : i + ONBOARD_BATCH]))
    return rooms


async def server_rooms(config: Config) -> int:
    """How many rooms the bot is in, asked of the homeserver (one login, then logged out)."""
    client = AsyncClient(config.homeserver, config.user_id)
    await client.login(config.password)
    try:
        return len((await client.joined_rooms()).rooms)
    finally:
        await client.logout()
        await client.close()


async def typing_syncs(hs: LocalHomeserver, work: Path, typists: int, seconds: float) -> dict:
    """A bot behind a counting proxy; ``typists`` users onboard, then type in their chats for
    ``seconds`` (a notice a second each, on and off). The bot's /sync requests meanwhile."""
    proxy = FaultProxy(hs.url)
    await proxy.start()
    config = replace(bot_config(hs, work, "typingbot"), homeserver=proxy.url)
    bot = ProcessBot(config)
    logs: Logs = []
    people: list[ScriptedUser] = []
    try:
        await bot.start(logs)
        people = await users(hs, typists, config.user_id)
        chats = [chat for _, _, chat in await onboard(people)]
        quiet_since, count = time.monotonic(), proxy.count(SYNC)
        while time.monotonic() - quiet_since < 3:  # the bot sits in its long poll
            await asyncio.sleep(0.1)
            if proxy.count(SYNC) != count:
                quiet_since, count = time.monotonic(), proxy.count(SYNC)
        notices = 0
        deadline = time.monotonic() + seconds

        async def type_in(person: ScriptedUser, chat: str) -> None:
            nonlocal notices
            on = True
            while time.monotonic() < deadline:
                await person.client.room_typing(chat, on, 30_000)
                notices, on = notices + 1, not on
                await asyncio.sleep(1)  # a typist's pace

        await asyncio.gather(*(type_in(p, c) for p, c in zip(people, chats, strict=False)))
        return {"syncs": proxy.count(SYNC) - count, "notices": notices, "logs": logs}
    finally:
        await bot.stop()
        for person in people:
            await person.close()
        await proxy.stop()


async def bench(
    sizes: tuple[int, int],
    ks: list[int],
    samples: int,
    typists: int,
    typing_s: float,
    bot_log: Path | None,
    starts_only: bool = False,
    user_case_only: bool = False,
    debug: bool = False,
) -> None:
    small, large = sizes
    logs: Logs = []
    people: list[ScriptedUser] = []
    with throwaway_homeserver("lambda-bench-scale-") as (hs, work):
        try:
            config = bot_config(hs, work, "scalebot")
            bot = ProcessBot(config, **({"LOG_LEVEL": "debug"} if debug else {}))
            load = 0 if starts_only else max(ks)
            people = await accounts(hs, 1 + max(load, (large - small) // 3), config.user_id)
            owner = people[0]
            await bot.start(logs)
            lobby, _, chat = await owner.onboard()
            benches = []  # the owner's chats that see no message until the user case
            for i in range(small - 3):  # lobby, Space, Chat 1, and these
                benches += linked_rooms((await owner.ask(lobby, f"!new Bench {i}", "Created"))[1])
            counted = {small: await server_rooms(config)}
            met = {small: await users_case(bot, logs, owner, benches, lobby, samples)}
            at = {}
            if not user_case_only:
                await synapse_idle(hs)
                at[small] = await measure(hs, bot, logs, owner, chat, samples)

            started = time.perf_counter()
            grown, extra = divmod(large - small, 3)  # users of 3 rooms, and chats to add
            rooms = await onboard(people[1 : grown + 1])
            for i in range(extra):
                await people[1].ask(rooms[0][0], f"!new Extra {i}", "Created")
            chats = [(p, c) for p, (_, _, c) in zip(people[1:], rooms, strict=False)]
            growing = time.perf_counter() - started
            counted[large] = await server_rooms(config)
            # Every other user's rooms are more recent than the owner's: theirs are among the
            # least recently active, as a user's room is among many.
            met[large] = await users_case(bot, logs, owner, benches, lobby, samples)
            if not user_case_only:
                await synapse_idle(hs)
                at[large] = await measure(hs, bot, logs, owner, chat, samples)
            joining, bursts = (0, 0.0), []
            if not starts_only:
                rest, started = people[grown + 1 : max(ks) + 1], time.perf_counter()
                chats += [(p, c) for p, (_, _, c) in zip(rest, await onboard(rest), strict=False)]
                joining = (len(rest), time.perf_counter() - started)  # the DB was just lost
                await bot.stop()
                bot.env["LAMBDA_AGENT"] = "bench_agent:SlowAgent"
                await bot.start(logs)
                agent = LoggedCalls(logs)
                # The rooms the total losses left unknown heal on their first message: not
                # measured.
                await burst(logs, agent, chats[: max(ks)], "warm-up")
                bursts = [await burst(logs, agent, chats[:k], f"burst{k}") for k in ks]
            await bot.stop()
        finally:
            for person in people:
                await person.close()
            if bot_log is not None:
                bot_log.write_text("".join(json.dumps(e) + "\n" for e in logs))
        typing = None if starts_only else await typing_syncs(hs, work, typists, typing_s)

    report(hs.url, counted, at, met, growing, joining, bursts, typing, typists, typing_s, logs)


KINDS = (
    ("loss", "after a total loss"),
    ("back", "  ... the owner writes again"),
    ("healthy", "healthy restart"),
)


def today(at: dict[int, dict]) -> None:
    """Today's starts: each once Synapse is idle, the message sent while the bot was down."""
    small, large = sorted(at)
    print(f"  {'':36}{small:5} rooms {large:5} rooms   ratio")
    print(f"  start -> first reply (target: ratio <= {TARGET_ROOMS_RATIO})")
    for kind, what in KINDS:
        a, b = (statistics.median(s["first"] for s in at[n][kind]) for n in (small, large))
        verdict = "ok" if b / a <= TARGET_ROOMS_RATIO else "MISSED"
        print(f"    {what:32}{a:9.2f} s {b:9.2f} s   {b / a:5.2f}x  {verdict}")
    for key, title in (
        ("ready", "start -> bot.ready (the first sync ingested)"),
        ("boot", "of which exec -> bot.starting (interpreter, imports, DB open)"),
    ):
        print(f"  {title}")
        for kind, what in KINDS:
            a, b = (statistics.median(s[key] for s in at[n][kind]) for n in (small, large))
            print(f"    {what:32}{a:9.2f} s {b:9.2f} s   {b / a:5.2f}x")


def memory(at: dict[int, dict]) -> None:
    """The bot's memory at those starts' first reply."""
    small, large = sorted(at)
    print("  bot RSS at the first reply (peak, VmHWM)")
    for kind, what in KINDS:
        rss = [max(s["rss"] for s in at[n][kind]) for n in (small, large)]
        peak = [max(s["peak"] for s in at[n][kind]) for n in (small, large)]
        print(
            f"    {what:32}{rss[0]:8.0f} MB{rss[1]:8.0f} MB   {rss[1] / rss[0]:5.2f}x  "
            f"(peak {peak[0]:.0f} / {peak[1]:.0f} MB)"
        )


def report(
    url: str,
    counted: dict[int, int],
    at: dict[int, dict],
    met: dict[int, list[dict]],
    growing: float,
    joining: tuple[int, float],
    bursts: list[dict],
    typing: dict | None,
    typists: int,
    typing_s: float,
    logs: Logs,
) -> None:
    small, large = sorted(met)
    print(
        f"Lambda scale benchmark: Synapse on {url}, the bot as a process "
        f"(python -m adapter.matrix); {len(met[small])} starts of each kind a size"
    )
    print(
        f"  rooms the bot is in (asked of the server): {counted[small]} and {counted[large]}"
        f" (grown in {growing:.0f} s)"
    )
    if at:
        today(at)
    print(
        "  after a total loss as a user meets it: started right after the stop, the owner "
        "writes at bot.ready"
    )
    print(
        f"  in one of their least recently active rooms, then !chats (target: ratio <= "
        f"{TARGET_ROOMS_RATIO}; median, and the spread over {len(met[small])} starts)"
    )
    print(f"  {'':36}{small:5} rooms {large:5} rooms   ratio")
    for key, what, target in (
        ("first", "start -> first answer", True),
        ("answer", "  of which message -> answer", False),
        ("chats", "!chats right after", True),
        ("ready", "start -> bot.ready", False),
        ("sweep", "the sweep's total time", False),
        ("gave_way", "  of which it gave way", False),
        ("rested", "  of which it rested", False),
        ("slowest", "  its slowest window", False),
    ):
        a, b = (statistics.median(s[key] for s in met[n]) for n in (small, large))
        spread = "  ".join(
            f"{min(s[key] for s in met[n]):.2f}-{max(s[key] for s in met[n]):.2f}"
            for n in (small, large)
        )
        ratio = b / a if a else float("nan")
        verdict = ("ok" if ratio <= TARGET_ROOMS_RATIO else "MISSED") if target else ""
        print(f"    {what:32}{a:9.2f} s {b:9.2f} s   {ratio:5.2f}x  {verdict:6} ({spread})")
    windows = [(s["windows"], s["largest"]) for s in met[large]]
    print(f"    sweep windows at {large} rooms (count, largest): {windows}")
    if at:
        memory(at)
    if joining[0]:
        print(
            f"  {joining[0]} new users onboarded (batches of {ONBOARD_BATCH} at once) just "
            f"after a total loss at {large} rooms: {joining[1]:.1f} s"
        )
    print(
        f"  K users write at once to a {AGENT_DELAY_S:.0f} s agent: latency / agent time "
        f"(target: max <= {TARGET_MAX_OVER_MEDIAN} x median)"
    )
    for b in bursts:
        r = b["ratios"] or [float("nan")]
        med, top = statistics.median(r), max(r)
        verdict = (
            "ok" if b["answered"] == b["k"] and top <= TARGET_MAX_OVER_MEDIAN * med else "MISSED"
        )
        print(
            f"    K={b['k']:3}  median {med:5.2f}  max {top:5.2f}  max/median {top / med:4.2f}"
            f"  answered {b['answered']}/{b['k']}  {verdict}"
        )
        if b["to_agent"]:
            print(
                f"           message stamped -> agent called {ms_spread(b['to_agent'])}, "
                f"calls within {b['spread']:.0f} ms; agent returned -> reply stamped "
                f"{ms_spread(b['to_reply'])}"
            )
    if typing is not None:
        verdict = "ok" if typing["syncs"] <= TARGET_TYPING_SYNCS else "MISSED"
        print(
            f"  bot /sync requests while {typists} users type for {typing_s:.0f} s "
            f"({typing['notices']} typing notices): {typing['syncs']} "
            f"(target <= {TARGET_TYPING_SYNCS}: {verdict})"
        )
    loud = [
        e for e in logs + (typing or {}).get("logs", []) if e.get("level") in ("warning", "error")
    ]
    print(
        f"  bot log lines at warning or above: {len(loud)}"
        + (f" ({sorted({e.get('event') for e in loud})})" if loud else "")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rooms",
        type=int,
        nargs=2,
        default=[7, 300],
        metavar=("SMALL", "LARGE"),
        help="SMALL is one user's (lobby, Space and 1 to 6 chats)",
    )
    parser.add_argument("--users", type=int, nargs="+", default=[8, 32, 64, 128])
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--typists", type=int, default=8)
    parser.add_argument("--typing-seconds", type=float, default=10.0)
    parser.add_argument("--bot-log", type=Path, help="write the bot's log lines there")
    parser.add_argument(
        "--debug", action="store_true", help="the bot logs at debug level (--bot-log)"
    )
    parser.add_argument(
        "--user-case-only",
        action="store_true",
        help="of the starts, only the case a user meets (no start waiting for an idle Synapse)",
    )
    parser.add_argument(
        "--starts-only",
        action="store_true",
        help="only the starts (first reply, the user's case, the sweep): no burst, no typing",
    )
    args = parser.parse_args()
    if not 3 <= args.rooms[0] <= 8 or args.rooms[1] <= args.rooms[0]:
        parser.error("--rooms: SMALL from 3 to 8 (the !new throttle), LARGE above it")
    asyncio.run(
        bench(
            (args.rooms[0], args.rooms[1]),
            sorted(args.users),
            args.samples,
            args.typists,
            args.typing_seconds,
            args.bot_log,
            args.starts_only or args.user_case_only,
            args.user_case_only,
            args.debug,
        )
    )


if __name__ == "__main__":
    main()
