"""Which replica handles which room (SPEC §10, Replicas). Every replica watches the shared
inbox (woken by NOTIFY when a round is recorded, and looking every half second besides). A
room with entries is taken by acquiring its lease ``room:<id>``; its entries then go, in
order, through this replica's lanes, and the lease is given up when the lane has nothing left.

Rooms are spread without asking: each room with work has one owner among the live replicas
(rendezvous hashing over their ids, which every heartbeat brings), and only its owner tries to
take it, so a burst's rooms are taken at once and never fought over. A room that has waited
``UNCLAIMED_S`` with nobody taking it (its owner died, or is not seen live yet) is taken by
whoever looks; one found held is not asked for again before another ``UNCLAIMED_S``. A lease
that another replica took over (after a stall of ours) stops that room's lane at once."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Sequence

import structlog

from adapter.matrix.delivery.inbox import Entry, Inbox
from adapter.matrix.delivery.lanes import Delivery
from adapter.matrix.delivery.leases import Leases
from adapter.matrix.observe.health import Health
from core.store import StoreRefused
from core.store.contract import Lease

log = structlog.get_logger()

POLL_S = 0.5  # at most this long between two looks at the inbox (NOTIFY wakes sooner)
UNCLAIMED_S = 1.0  # a room seen waiting this long, not taken, is taken by whoever looks
ROOM = "room:"


def owner(room: str, replicas: Sequence[str]) -> str:
    """The replica that takes ``room`` (rendezvous hashing: the same answer on every replica
    that sees the same live ones; one replica more or less moves only its share of rooms)."""
    return max(replicas, key=lambda r: hashlib.sha256(f"{room}\0{r}".encode()).digest())


class RoomClaims:
    """Takes rooms with work from the shared inbox and hands their entries to ``delivery``;
    ``on_handed`` hears of each (what this replica knows of its rooms)."""

    def __init__(
        self,
        leases: Leases,
        inbox: Inbox,
        delivery: Delivery,
        health: Health,
        on_handed: Callable[[Entry], None] = lambda _: None,
    ) -> None:
        self._on_handed = on_handed
        self._leases = leases
        self._inbox = inbox
        self._delivery = delivery
        self._health = health
        self._held: dict[str, Lease] = {}  # room -> its lease, while its lane works
        self._pushed: dict[str, int] = {}  # room -> the last entry handed to its lane
        self._unclaimed: dict[str, float] = {}  # room -> since when seen waiting, not ours
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Look at the inbox now (a round was recorded, or a lane ended)."""
        self._wake.set()

    def lost(self, lease: Lease) -> None:
        """A room's lease is lost: stop its lane; another replica finishes the room."""
        room = lease.name.removeprefix(ROOM)
        if lease.name.startswith(ROOM) and self._held.get(room) == lease:
            del self._held[room]
            self._pushed.pop(room, None)
            self._delivery.drop(room)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self._release_idle()
                await self._claim(await self._inbox.pending())
            except StoreRefused as err:
                self._health.store_refused(str(err))
                log.info("claims.store_refused", error=str(err))
            except Exception:  # a bug: logged, and the replica keeps taking rooms
                log.exception("claims.crashed")
            await self._sleep(stop)
        await self._release_idle()

    async def _sleep(self, stop: asyncio.Event) -> None:
        waits = [
            asyncio.ensure_future(w)
            for w in (
                stop.wait(),
                self._wake.wait(),
                self._leases.coordinator.wait_inbox(POLL_S),
            )
        ]
        await asyncio.wait(waits, timeout=POLL_S, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
        self._wake.clear()

    async def _release_idle(self) -> None:
        idle = [
            (room, lease) for room, lease in self._held.items() if not self._delivery.busy(room)
        ]
        for room, _ in idle:
            del self._held[room]
            self._pushed.pop(room, None)
        if idle:
            await self._leases.release_many([lease for _, lease in idle])

    async def _claim(self, pending: list[Entry]) -> None:
        rooms: dict[str, list[Entry]] = {}
        for entry in pending:
            rooms.setdefault(entry.update.room_id, []).append(entry)
        now = time.monotonic()
        self._unclaimed = {r: t for r, t in self._unclaimed.items() if r in rooms}
        me, live = self._leases.replica, self._leases.live
        wanted = []
        for room, entries in rooms.items():  # oldest work first: entries come in order
            if room in self._held:
                self._push(room, entries)
                continue
            since = self._unclaimed.setdefault(room, now)
            if owner(room, live) == me or now - since >= UNCLAIMED_S:
                wanted.append(room)
        # Asked together: a burst's rooms are not taken one round trip after another.
        leases = await asyncio.gather(
            *(self._leases.acquire(ROOM + room) for room in wanted), return_exceptions=True
        )
        for room, lease in zip(wanted, leases, strict=True):
            if isinstance(lease, StoreRefused):
                log.info("claims.store_refused", room_id=room, error=str(lease))
            if not isinstance(lease, Lease):  # another replica has it (or the DB is away):
                self._unclaimed[room] = now  # not asked again before UNCLAIMED_S
                continue
            self._unclaimed.pop(room, None)
            self._held[room] = lease
            log.info("room.taken", room_id=room, term=lease.term, entries=len(rooms[room]))
            self._push(room, rooms[room])

    def _push(self, room: str, entries: list[Entry]) -> None:
        last = self._pushed.get(room, -1)
        new = [entry for entry in entries if entry.seq > last]
        if new:
            self._pushed[room] = new[-1].seq
            for entry in new:
                self._on_handed(entry)
            self._delivery.push(new, self._held[room])
