"""The leases this replica holds (SPEC §10, Replicas), kept alive together: one heartbeat and
one renewal a second. A lease the database no longer gives us (another replica took it after
a stall of ours) is reported lost at once.

``current_lease`` is the lease under which the running task works (a room's lane, the sync
loop): ``guard`` checks it at the database before each send, so a replica that wakes from a
stall after its room was taken over sends nothing for it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar

import structlog

from adapter.matrix.ingest.update import RetryLater
from adapter.matrix.observe.health import Health
from core.store import StoreRefused
from core.store.contract import Lease, LeaseLost
from core.store.coordination import RENEW_EVERY_S, Coordinator

log = structlog.get_logger()

HOLD_WAIT_S = 30.0  # how long ``holding`` waits for a lease another replica holds
HOLD_POLL_S = 0.2
current_lease: ContextVar[Lease | None] = ContextVar("current_lease", default=None)


class Leases:
    """Acquire, renew, check and release this replica's leases; ``on_lost`` hears of each
    one lost."""

    def __init__(
        self,
        coordinator: Coordinator,
        health: Health,
        on_lost: Callable[[Lease], None] = lambda _: None,
    ) -> None:
        self.coordinator = coordinator
        self._health = health
        self._held: dict[str, Lease] = {}
        self.on_lost = on_lost
        self.rooms = lambda: sum(1 for name in self._held if name.startswith("room:"))
        self.live: list[str] = [coordinator.replica]  # the live replicas, at the last heartbeat

    @property
    def replica(self) -> str:
        return self.coordinator.replica

    def held(self, name: str) -> Lease | None:
        return self._held.get(name)

    async def acquire(self, name: str) -> Lease | None:
        lease = await self.coordinator.acquire(name)
        if lease is not None:
            self._held[name] = lease
            log.debug("lease.acquired", lease=name, term=lease.term)
        return lease

    @asynccontextmanager
    async def holding(self, name: str) -> AsyncIterator[None]:
        """Hold lease ``name`` for the block, waiting while another replica holds it (what
        must happen one at a time across replicas, one user's onboarding say). Raises
        ``RetryLater`` if it stays taken."""
        deadline = time.monotonic() + HOLD_WAIT_S
        while (lease := await self.acquire(name)) is None:
            if time.monotonic() > deadline:
                raise RetryLater(f"{name} is held by another replica")
            await asyncio.sleep(HOLD_POLL_S)
        try:
            yield
        finally:
            await self.release(lease)

    async def release(self, lease: Lease) -> None:
        """Given up on purpose; a release the database refuses expires by itself."""
        await self.release_many([lease])

    async def release_many(self, leases: list[Lease]) -> None:
        for lease in leases:
            if self._held.get(lease.name) == lease:
                del self._held[lease.name]
        try:
            await self.coordinator.release(leases)
        except StoreRefused as err:
            log.info("lease.release_failed", leases=len(leases), error=str(err))

    async def release_all(self) -> None:
        held, self._held = list(self._held.values()), {}
        try:
            await self.coordinator.release(held)
        except StoreRefused as err:
            log.info("lease.release_failed", leases=len(held), error=str(err))

    async def guard(self) -> None:
        """Raise ``LeaseLost`` unless the running task's lease is still ours (no lease: one
        process, or work outside any lease)."""
        lease = current_lease.get()
        if lease is not None and self.coordinator.shared:
            if not await self.coordinator.holds(lease):
                self._lose(lease)
                raise LeaseLost(lease)

    async def keep(self, stop: asyncio.Event, syncing: Callable[[], bool]) -> None:
        """Heartbeat and renew every second until ``stop``."""
        while not stop.is_set():
            await self.renew_now(syncing())
            try:
                await asyncio.wait_for(stop.wait(), RENEW_EVERY_S)
            except TimeoutError:
                pass

    async def renew_now(self, syncing: bool) -> None:
        held = list(self._held.values())
        try:
            self.live = await self.coordinator.heartbeat(syncing, self.rooms())
            kept = await self.coordinator.renew(held)
        except StoreRefused as err:
            # Nothing is given up for a database we cannot reach: whatever a lease guards is
            # fenced at that database (writes, and the check before each send), so it can
            # do nothing there; the next renewal that gets through says what is still ours.
            self._health.store_refused(str(err))
            return
        if not syncing:
            self._health.standing_by()
        for lease in held:
            if lease.name not in kept:
                self._lose(lease)

    def _lose(self, lease: Lease) -> None:
        if self._held.get(lease.name) == lease:
            del self._held[lease.name]
            log.warning("lease.lost", lease=lease.name, term=lease.term)
            self.on_lost(lease)
