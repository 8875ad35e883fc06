"""Benchmark: replicas (SPEC §10) on a local Synapse and a local PostgreSQL.

Prints, from one run on one machine (bots as real processes, ``python -m adapter.matrix``):
- failover of the sync: kill -9 of the syncing replica, then a message sent at once; seconds
  from the kill to its answer (target <= 5 s);
- failover of a room: kill -9 of the replica answering a room (mid-answer), then a message
  sent at once in that room; seconds from the kill to the second answer;
- concurrency: K = 8, 32, 64 users each sending one message at the same moment to a 1 s
  agent, with 1, 2 and 3 replicas: median and max latency (reply minus message, the
  homeserver's timestamps) / the agent's time (target: 3 replicas within 1.1x of one); and
  the CPU time the bots, Synapse and PostgreSQL used during each burst, beside the machine's
  (what is coordination and what is contention for the cores); each count of replicas is
  warmed first by one untimed message from every user;
- a soak: users writing all along while a random replica is killed -9 every 5-12 s (and
  started again): messages sent, lost, duplicated, answered out of order (target 0, 0, 0).

    python tools/bench_replicas.py [--soak-s 90] [--users 64]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import signal
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from homeserver import LocalHomeserver  # noqa: E402
from postgres import LocalPostgres  # noqa: E402
from sandbox import bot_config, throwaway_homeserver  # noqa: E402
from scripted_user import SOURCE_KEY, ScriptedUser  # noqa: E402

from adapter.matrix.config import Config  # noqa: E402

AGENT = "tests.integration.agents:SlowAgent"  # thinks TEST_AGENT_DELAY_S, then echoes
AGENT_DELAY_S = 1.0


class Replica:
    """One bot process, its JSON log read as it comes."""

    def __init__(self, config: Config, name: str, delay_s: float = AGENT_DELAY_S) -> None:
        self.config, self.name, self.delay_s = config, name, delay_s
        self.lines: list[dict] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task | None = None

    async def start(self) -> None:
        env = {
            **os.environ,
            **self.config.to_env(),
            "LOG_FORMAT": "json",
            "LAMBDA_AGENT": AGENT,
            "TEST_AGENT_DELAY_S": str(self.delay_s),
            "LAMBDA_CONCURRENCY": "128",
        }
        self.lines = []
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "adapter.matrix",
            cwd=ROOT,
            env=env,
            stderr=asyncio.subprocess.PIPE,
        )
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc and self.proc.stderr
        while raw := await self.proc.stderr.readline():
            try:
                self.lines.append(json.loads(raw))
            except json.JSONDecodeError:
                pass

    def seen(self, event: str, **fields: object) -> list[dict]:
        return [
            e
            for e in self.lines
            if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
        ]

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def syncing(self) -> bool:
        return self.alive and len(self.seen("bot.ready")) > len(self.seen("sync.stopped_leading"))

    async def wait(self, event: str, timeout: float = 60, **fields: object) -> dict:
        deadline = time.monotonic() + timeout
        while not (found := self.seen(event, **fields)):
            if time.monotonic() > deadline or not self.alive:
                raise TimeoutError(f"{self.name}: no {event}")
            await asyncio.sleep(0.02)
        return found[-1]

    async def kill(self) -> float:
        """kill -9; returns the moment (epoch ms)."""
        assert self.proc
        at = time.time() * 1000
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        return at

    async def stop(self) -> None:
        if self.alive:
            assert self.proc
            self.proc.send_signal(signal.SIGTERM)
            await self.proc.wait()
        if self._reader:
            await asyncio.gather(self._reader, return_exceptions=True)


async def started(configs: list[Config], names: list[str]) -> list[Replica]:
    group = [Replica(c, n) for c, n in zip(configs, names, strict=True)]
    for r in group:
        await r.start()
    for r in group:
        await r.wait("replica.started")
    await leader(group)
    return group


async def leader(group: list[Replica], timeout: float = 60) -> Replica:
    deadline = time.monotonic() + timeout
    while not (found := [r for r in group if r.syncing]):
        if time.monotonic() > deadline:
            raise TimeoutError("no replica syncs")
        await asyncio.sleep(0.02)
    return found[0]


async def answer_ts(user: ScriptedUser, room: str, source: str, timeout: float = 60) -> float:
    found = await user.wait_answers(room, [source], timeout)
    if source not in found:
        raise TimeoutError(f"no answer to {source}")
    return float(found[source]["origin_server_ts"])


async def failover(hs: LocalHomeserver, configs: list[Config], samples: int) -> None:
    group = await started(configs[:2], ["a", "b"])
    try:
        person = await ScriptedUser.log_in(
            hs.url, *_account(hs, "failover"), bot_id=configs[0].user_id
        )
        _, _, chat = await person.onboard()
        sync_s, room_s = [], []
        for i in range(samples):
            first = await leader(group)
            at = await first.kill()
            sent = await person.send(chat, f"after sync kill {i}")
            sync_s.append((await answer_ts(person, chat, sent) - at) / 1000)
            await first.start()
            await first.wait("replica.started")
            # The room: a slow answer under way, its replica killed mid-answer.
            text = f"slow {i}"
            await person.send(chat, text)
            busy = await _thinking(group, text)
            at = await busy.kill()
            sent = await person.send(chat, f"after room kill {i}")
            room_s.append((await answer_ts(person, chat, sent) - at) / 1000)
            await busy.start()
            await busy.wait("replica.started")
        print(f"failover, kill -9 of the syncing replica -> next answer: {_spread(sync_s)} s")
        print(f"failover, kill -9 of the replica answering the room -> next: {_spread(room_s)} s")
        await person.close()
    finally:
        for r in group:
            await r.stop()


async def _thinking(group: list[Replica], text: str, timeout: float = 60) -> Replica:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for r in group:
            if r.seen("test_agent.thinking", text=text):
                return r
        await asyncio.sleep(0.01)
    raise TimeoutError(f"nobody thinks about {text!r}")


def _account(hs: LocalHomeserver, name: str) -> tuple[str, str]:
    account = hs.register(name, f"{name}-pw")
    return account.user_id, account.password


def _spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.2f}, max {max(values):.2f} (n={len(values)})"


def _cpu_s(pids: list[int]) -> float:
    """CPU seconds (user + system) the processes ``pids`` have used so far (Linux /proc)."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _with_children(pid: int) -> list[int]:
    """``pid`` and its children (PostgreSQL's server processes are its postmaster's)."""
    found = [pid]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def _machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all cores, every process: the machine is
    shared, so this shows the load beside ours)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


class CpuUse:
    """The CPU time each part used between ``start`` and ``stop``, printed as one line."""

    def __init__(self, bots: list[Replica], synapse_pid: int, postgres_pid: int) -> None:
        self.bots, self.synapse_pid, self.postgres_pid = bots, synapse_pid, postgres_pid

    def _sample(self) -> dict[str, float]:
        parts = {r.name: _cpu_s([r.proc.pid]) for r in self.bots if r.proc and r.alive}
        return {
            **parts,
            "synapse": _cpu_s([self.synapse_pid]),
            "postgres": _cpu_s(_with_children(self.postgres_pid)),
            "users": _cpu_s([os.getpid()]),  # this bench: the scripted users' clients
            "machine": _machine_busy_s(),
            "wall": time.monotonic(),
        }

    def start(self) -> None:
        self._before = self._sample()

    def report(self) -> str:
        after = self._sample()
        used = {k: after[k] - self._before.get(k, after[k]) for k in after}
        bots = [k for k in used if k not in ("synapse", "postgres", "users", "machine", "wall")]
        return (
            f"cpu s over {used['wall']:.1f} s: bots {sum(used[k] for k in bots):.2f} ("
            + ", ".join(f"{k} {used[k]:.2f}" for k in bots)
            + f"), synapse {used['synapse']:.2f}, postgres {used['postgres']:.2f}, "
            f"users {used['users']:.2f}; machine {used['machine']:.2f} "
            f"({used['machine'] / used['wall']:.2f} of {os.cpu_count()} cores busy)"
        )


async def concurrency(
    hs: LocalHomeserver, pg: LocalPostgres, configs: list[Config], most: int, repeat: int = 1
) -> None:
    group = await started(configs[:3], ["a", "b", "c"])
    try:
        bot_id = configs[0].user_id
        people = [
            await ScriptedUser.log_in(hs.url, *_account(hs, f"k{i}"), bot_id=bot_id)
            for i in range(most)
        ]
        chats = [(await p.onboard())[2] for p in people]
        assert hs._process and pg._process
        cpu = CpuUse(group, hs._process.pid, pg._process.pid)
        runs: dict[tuple[int, int], list[list[float]]] = {}
        for running in (3, 2, 1):
            for r in group[running:]:
                await r.stop()
            await leader(group[:running])
            # Untimed: each room's message once through the replica that now takes it, so
            # that every count is measured warm (the order 3, 2, 1 would favour the last).
            for p in people:
                await p._drain(0)
            warm = await asyncio.gather(
                *(p.send(c, f"r{running} warm") for p, c in zip(people, chats, strict=True))
            )
            for p, c, s in zip(people, chats, warm, strict=True):
                await answer_ts(p, c, s)
            for k, n in itertools.product((8, 32, 64), range(repeat)):
                if k > most:
                    continue
                tag = f"r{running}k{k}n{n}"
                for p in people[:k]:
                    await p._drain(0)
                cpu.start()
                sent = await asyncio.gather(
                    *(p.send(c, f"{tag} go") for p, c in zip(people[:k], chats, strict=False))
                )
                ratios = []
                for p, c, s in zip(people[:k], chats, sent, strict=False):
                    asked = await p.origin_ts(c, s)
                    ratios.append((await answer_ts(p, c, s) - asked) / 1000 / AGENT_DELAY_S)
                used = cpu.report()  # read one by one: the users' syncs do not add to the burst
                print(
                    f"K={k:2d} users, {running} replica(s): latency / agent time "
                    f"median {statistics.median(ratios):.2f}, max {max(ratios):.2f}; {used}",
                    flush=True,
                )
                runs.setdefault((k, running), []).append(ratios)
        if repeat > 1:
            for (k, running), each in sorted(runs.items()):
                medians = ", ".join(f"{statistics.median(r):.2f}" for r in each)
                maxes = ", ".join(f"{max(r):.2f}" for r in each)
                print(
                    f"K={k:2d}, {running} replica(s), {repeat} runs: medians {medians}; "
                    f"maxes {maxes}"
                )
        for p in people:
            await p.close()
    finally:
        for r in group:
            await r.stop()


async def soak(hs: LocalHomeserver, configs: list[Config], seconds: float, writers: int) -> None:
    group = await started(configs[:3], ["a", "b", "c"])
    bot_id = configs[0].user_id
    people = [
        await ScriptedUser.log_in(hs.url, *_account(hs, f"s{i}"), bot_id=bot_id)
        for i in range(writers)
    ]
    chats = [(await p.onboard())[2] for p in people]
    sent: list[list[str]] = [[] for _ in people]
    end = time.monotonic() + seconds
    kills = 0

    async def write(i: int) -> None:
        n = 0
        while time.monotonic() < end:
            sent[i].append(await people[i].send(chats[i], f"soak {i}.{n}"))
            n += 1
            await asyncio.sleep(random.uniform(0.3, 1.0))

    async def kill_now_and_then() -> None:
        nonlocal kills
        while time.monotonic() < end:
            await asyncio.sleep(random.uniform(5, 12))
            victim = random.choice([r for r in group if r.alive])
            await victim.kill()
            kills += 1
            await victim.start()

    try:
        await asyncio.gather(*(write(i) for i in range(writers)), kill_now_and_then())
        lost = duplicated = disordered = total = 0
        for person, chat, sources in zip(people, chats, sent, strict=True):
            total += len(sources)
            # Read back from the room itself: a user that did not sync while it wrote gets a
            # limited timeline, which would hide answers that are there.
            await _answered_all(person, chat, sources)
            answered = [
                ev["content"][SOURCE_KEY]
                for ev in await person.history(chat, 3 * len(sources) + 50)
                if ev.get("sender") == bot_id
                and (ev.get("content") or {}).get(SOURCE_KEY) in set(sources)
            ]
            lost += len(set(sources) - set(answered))
            duplicated += len(answered) - len(set(answered))
            order = [sources.index(s) for s in dict.fromkeys(answered)]
            disordered += sum(1 for a, b in zip(order, order[1:], strict=False) if b < a)
        print(
            f"soak {seconds:.0f} s, {writers} users, 3 replicas, {kills} kill -9: sent {total}, "
            f"lost {lost}, duplicated {duplicated}, out of order {disordered}"
        )
        for p in people:
            await p.close()
    finally:
        for r in group:
            await r.stop()


async def _answered_all(person: ScriptedUser, room: str, sources: list[str]) -> None:
    """Until the room holds an answer to each of ``sources`` (at most two minutes)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        await person._drain(0)
        history = await person.history(room, 3 * len(sources) + 50)
        named = {(ev.get("content") or {}).get(SOURCE_KEY) for ev in history}
        if set(sources) <= named:
            return
        await asyncio.sleep(1)


async def main(args: argparse.Namespace) -> None:
    with throwaway_homeserver("lambda-bench-replicas-") as (hs, work), LocalPostgres() as pg:
        for part, run in (
            ("failover", lambda c: failover(hs, c, args.samples)),
            ("concurrency", lambda c: concurrency(hs, pg, c, args.users, args.repeat)),
            ("soak", lambda c: soak(hs, c, args.soak_s, args.writers)),
        ):
            if part not in args.parts:
                continue
            base = bot_config(hs, work, f"bot{part}")
            url = pg.create_database(f"bench_{part}")
            configs = [replace(base, db_url=url, store_path=work / f"{part}{i}") for i in range(3)]
            await run(configs)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--soak-s", type=float, default=90.0)
    parser.add_argument("--writers", type=int, default=6)
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=1, help="bursts of each K, in a row")
    parser.add_argument("--parts", nargs="*", default=["failover", "concurrency", "soak"])
    asyncio.run(main(parser.parse_args()))
