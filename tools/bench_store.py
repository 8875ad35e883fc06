"""Benchmark: the store's two backends side by side, SQLite and PostgreSQL (`make bench`).

One run, one machine, a throwaway Synapse and a throwaway PostgreSQL (fsync off, as in the
tests: compare the ratios, not the absolute numbers). Prints, for each backend, and the
PostgreSQL / SQLite ratio:
- a warm reply, through Synapse: the bot in-process, a scripted user asking in a chat room
  (the two bots are asked in turn, so that a drift of the machine weighs on both alike);
- a heal after a total loss: the first reply in a chat room after the bot lost everything
  (the SQLite file, or its PostgreSQL tables, and its session) and restarted;
- recording a sync round of 100 events: ``Inbox.ingest``, the events and the token in one
  transaction, the store alone;
- the inbox under 64 users writing at once, the store alone: 64 lanes each reading a room
  record, writing a chat record and finishing an inbox entry, concurrently.
The target is PostgreSQL within 1.2x of SQLite on the first three.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import asyncpg
import structlog

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from postgres import LocalPostgres  # noqa: E402
from sandbox import bot_config, throwaway_homeserver  # noqa: E402
from scripted_user import ScriptedUser  # noqa: E402

from adapter.matrix import run as run_module  # noqa: E402
from adapter.matrix.config import Config  # noqa: E402
from adapter.matrix.delivery.inbox import Inbox  # noqa: E402
from adapter.matrix.ingest.update import Update  # noqa: E402
from adapter.matrix.run import run_bot  # noqa: E402
from core.store import Store, open_store  # noqa: E402
from core.store.contract import SerialWork  # noqa: E402
from core.store.postgres import drop_bot_tables  # noqa: E402

T = TypeVar("T")

BACKENDS = ("sqlite", "postgresql")
TARGET = 1.2


class StoreClock:
    """Seconds and calls spent in each backend's store, by the bots of this run (their
    ``open_store`` is wrapped): how much of a reply is the store's."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {b: 0.0 for b in BACKENDS}
        self.calls: dict[str, int] = {b: 0 for b in BACKENDS}

    def wrap(self, store: Store) -> Store:
        return TimedStore(store, self)

    def read(self, backend: str) -> tuple[float, int]:
        return self.seconds[backend], self.calls[backend]


class TimedStore:
    """A store that adds the time of each call to a ``StoreClock``; otherwise the store."""

    def __init__(self, store: Store, clock: StoreClock) -> None:
        self._store, self._clock = store, clock
        self.engine, self.where = store.engine, store.where
        self.created, self.birth = store.created, store.birth

    def _add(self, started: float) -> None:
        self._clock.seconds[self.engine] += time.perf_counter() - started
        self._clock.calls[self.engine] += 1

    async def close(self) -> None:
        await self._store.close()

    async def get(self, key: str):
        started = time.perf_counter()
        try:
            return await self._store.get(key)
        finally:
            self._add(started)

    async def scan(self, prefix: str):
        started = time.perf_counter()
        try:
            return await self._store.scan(prefix)
        finally:
            self._add(started)

    async def set(self, key: str, value) -> None:
        async with self.transaction() as tx:
            tx.set(key, value)

    async def delete(self, key: str) -> None:
        async with self.transaction() as tx:
            tx.delete(key)

    @asynccontextmanager
    async def transaction(self):
        started = time.perf_counter()
        try:
            async with self._store.transaction() as tx:
                yield tx
        finally:
            self._add(started)

    async def serialized(self, lock: str, work: SerialWork[T]) -> T:
        started = time.perf_counter()
        try:
            return await self._store.serialized(lock, work)
        finally:
            self._add(started)


class InProcessBot:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.task: asyncio.Task | None = None
        self.stop_event = asyncio.Event()

    async def start(self, logs: list) -> None:
        seen = sum(e["event"] == "bot.ready" for e in logs)
        self.stop_event = asyncio.Event()
        self.task = asyncio.create_task(run_bot(self.config, self.stop_event))
        while sum(e["event"] == "bot.ready" for e in logs) <= seen:
            if self.task.done():
                raise RuntimeError(f"the bot exited with {self.task.result()} before bot.ready")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self.stop_event.set()
        assert self.task is not None
        await self.task

    async def lose_everything(self) -> None:
        if self.config.db_url is not None:
            conn = await asyncpg.connect(self.config.db_url)
            try:
                await drop_bot_tables(conn)
            finally:
                await conn.close()
        else:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.config.db_path}{suffix}").unlink(missing_ok=True)
        shutil.rmtree(self.config.store_path, ignore_errors=True)


async def through_synapse(
    configs: dict[str, Config], hs_url: str, register, samples: int, heals: int
) -> dict[str, dict[str, list[float]]]:
    """Warm replies and first replies after a total loss, per backend, asked in turn; and
    the seconds and calls each of those replies spent in the store."""
    found: dict[str, dict[str, list[float]]] = {
        b: {k: [] for k in ("warm", "heal", "warm_store", "heal_store", "warm_calls", "heal_calls")}
        for b in configs
    }
    clock = StoreClock()
    opener = run_module.open_store

    async def timed_open(location, birth_cause="store_missing"):
        return clock.wrap(await opener(location, birth_cause))

    run_module.open_store = timed_open

    async def ask(backend: str, phase: str, text: str) -> None:
        spent, calls = clock.read(backend)
        seconds, _ = await people[backend].ask(rooms[backend], text, f"Echo: {text}")
        found[backend][phase].append(seconds)
        found[backend][f"{phase}_store"].append(clock.read(backend)[0] - spent)
        found[backend][f"{phase}_calls"].append(clock.read(backend)[1] - calls)

    bots: dict[str, InProcessBot] = {}
    people: dict[str, ScriptedUser] = {}
    rooms: dict[str, str] = {}
    with structlog.testing.capture_logs() as logs:
        for backend, config in configs.items():
            account = register(f"user{backend}", "user-pw")
            bots[backend] = InProcessBot(config)
            await bots[backend].start(logs)
            people[backend] = await ScriptedUser.log_in(
                hs_url, account.user_id, account.password, config.user_id
            )
            _, _, chat = await people[backend].onboard()
            rooms[backend] = chat
            await people[backend].ask(chat, "warm-up", "Echo: warm-up")
        for i in range(samples):
            for backend in _in_turn(configs, i):
                await ask(backend, "warm", f"warm {i}")
        for i in range(heals):
            for backend in _in_turn(configs, i):
                await bots[backend].stop()
                await bots[backend].lose_everything()
                await bots[backend].start(logs)
                await ask(backend, "heal", f"after loss {i}")
        for backend in configs:
            await bots[backend].stop()
            await people[backend].close()
    run_module.open_store = opener
    return found


def _in_turn(configs: dict[str, Config], i: int) -> list[str]:
    names = list(configs)
    return names if i % 2 == 0 else names[::-1]


_rounds = itertools.count()


def round_of(size: int = 100) -> list[Update]:
    """A sync round's events, new ones at each call (the inbox records an event once)."""
    n = next(_rounds)
    return [
        Update("message", f"!room{j % 10}:x", "@user:x", f"$r{n}e{j}", f"message {j}", ts=j)
        for j in range(size)
    ]


async def sync_rounds(store: Store, rounds: int) -> list[float]:
    """Seconds to record each of ``rounds`` sync rounds of 100 events with their token."""
    inbox, _ = await Inbox.open(store)
    times = []
    for n in range(rounds):
        updates = round_of()
        started = time.perf_counter()
        await inbox.ingest(updates, f"token {n}")
        times.append(time.perf_counter() - started)
    return times


async def writers(store: Store, lanes: int = 64, each: int = 20) -> tuple[float, list[float]]:
    """``lanes`` concurrent lanes, each ``each`` times: read a room record, write a chat
    record, finish an inbox entry. Returns (operations a second, seconds per step)."""
    inbox, _ = await Inbox.open(store)
    entries = await inbox.ingest(
        [
            Update("message", f"!lane{lane}:x", "@u:x", f"$w{lane}.{k}", "hi")
            for lane in range(lanes)
            for k in range(each)
        ],
        "token",
    )
    async with store.transaction() as tx:
        for lane in range(lanes):
            tx.set(f"matrix_room:!lane{lane}:x", {"kind": "chat", "owner": "@u:x"})
    steps: list[float] = []

    async def run_lane(n: int) -> None:
        for entry in entries[n * each : (n + 1) * each]:
            started = time.perf_counter()
            await store.get(f"matrix_room:!lane{n}:x")
            await store.set(f"chat:@u:x:{n}", {"title": entry.update.event_id})
            await inbox.done(entry)
            steps.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(run_lane(n) for n in range(lanes)))
    elapsed = time.perf_counter() - started
    return lanes * each * 3 / elapsed, steps


@dataclass
class StoreFigures:
    rounds: list[float]  # seconds to record each sync round of 100
    rate: float  # operations a second, 64 lanes at once
    steps: list[float]  # seconds per lane step (get + set + done)


async def store_alone(locations: dict[str, str], rounds: int) -> dict[str, StoreFigures]:
    found: dict[str, StoreFigures] = {}
    for backend, location in locations.items():
        store = await open_store(location)
        try:
            await sync_rounds(store, 5)  # warm-up: statements prepared, pages in cache
            rate, steps = await writers(store)
            found[backend] = StoreFigures(await sync_rounds(store, rounds), rate, steps)
        finally:
            await store.close()
    return found


def ms(values: list[float]) -> str:
    return f"median {statistics.median(values) * 1000:7.2f} ms  p90 {_p90(values) * 1000:7.2f} ms"


def _p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1] if len(values) > 1 else values[0]


def ratio(pg: list[float], sqlite: list[float], target: float | None = TARGET) -> str:
    value = statistics.median(pg) / statistics.median(sqlite)
    verdict = "" if target is None else ("  (within target)" if value <= target else "  (OVER)")
    return f"{value:.2f}x{verdict}"


async def bench(samples: int, heals: int, rounds: int) -> None:
    with throwaway_homeserver("lambda-bench-store-") as (hs, work), LocalPostgres() as pg:
        configs = {
            "sqlite": bot_config(hs, work, "sqlitebot"),
            "postgresql": replace(
                bot_config(hs, work, "pgbot"), db_url=pg.create_database("bench_bot")
            ),
        }
        replies = await through_synapse(configs, hs.url, hs.register, samples, heals)
        alone = await store_alone(
            {"sqlite": str(work / "alone.db"), "postgresql": pg.create_database("bench_alone")},
            rounds,
        )
        pg_version = pg.sql("SHOW server_version")

    print(
        f"Lambda store benchmark: SQLite (WAL, synchronous=NORMAL) vs PostgreSQL {pg_version} "
        f"(local, fsync off), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    rows: list[tuple[str, Callable[[str], list[float]]]] = [
        (f"warm reply via Synapse (n={samples})", lambda b: replies[b]["warm"]),
        (f"first reply after a total loss (n={heals})", lambda b: replies[b]["heal"]),
        (f"record a sync round of 100 (n={rounds})", lambda b: alone[b].rounds),
    ]
    for what, values in rows:
        print(f"  {what}")
        for backend in BACKENDS:
            print(f"    {backend:10} {ms(values(backend))}")
        print(f"    PostgreSQL / SQLite {ratio(values('postgresql'), values('sqlite'))}")
    print("  of which in the store, per reply (the bots' own store calls, timed)")
    for phase, what in (("warm", "warm reply"), ("heal", "after a total loss")):
        for backend in BACKENDS:
            spent, calls = replies[backend][f"{phase}_store"], replies[backend][f"{phase}_calls"]
            share = statistics.median(spent) / statistics.median(replies[backend][phase])
            print(
                f"    {what:18} {backend:10} {ms(spent)}  "
                f"{statistics.median(calls):4.0f} calls  {share:5.1%} of the reply"
            )
        pg_store, lite_store = (
            replies["postgresql"][f"{phase}_store"],
            replies["sqlite"][f"{phase}_store"],
        )
        print(f"    {what:18} PostgreSQL / SQLite {ratio(pg_store, lite_store, None)}")
    print("  the inbox under 64 lanes at once (get + set + done, each lane 20 times)")
    for backend in BACKENDS:
        figures = alone[backend]
        print(f"    {backend:10} {figures.rate:8.0f} ops/s  per step {ms(figures.steps)}")
    print(
        f"    PostgreSQL / SQLite throughput {alone['postgresql'].rate / alone['sqlite'].rate:.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=20, help="warm replies per backend")
    parser.add_argument("--heals", type=int, default=5, help="total losses per backend")
    parser.add_argument("--rounds", type=int, default=50, help="sync rounds of 100 per backend")
    args = parser.parse_args()
    asyncio.run(bench(args.samples, args.heals, args.rounds))


if __name__ == "__main__":
    main()
