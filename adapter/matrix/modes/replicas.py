"""Replicas (SPEC §10): several processes on one PostgreSQL. Rooms are taken from the shared
inbox under leases; the replica holding the sync lease syncs (or, as an appservice, runs
the start's catch-up); the others stand by to take over."""

from __future__ import annotations

import asyncio

import structlog

from adapter.matrix.delivery.claims import RoomClaims
from adapter.matrix.delivery.inbox import Entry, Inbox
from adapter.matrix.delivery.lanes import Delivery
from adapter.matrix.ingest.appservice import AppserviceListener
from adapter.matrix.modes.parts import sleep_or_stop
from adapter.matrix.modes.pushed import Pushed
from adapter.matrix.modes.syncing import Syncing
from core.store import StoreRefused
from core.store.contract import Lease, LeaseLost

log = structlog.get_logger()

SYNC_LEASE = "sync"  # with replicas: the one that syncs holds it
STANDBY_POLL_S = 0.5  # how often a replica that does not sync tries to take the sync lease


class Replicated(Syncing, Pushed):
    """One replica of several."""

    async def _run_replica(self, stop: asyncio.Event, inbox: Inbox) -> None:
        """One of several processes on one PostgreSQL (SPEC §10, Replicas): rooms are taken
        from the shared inbox under leases (``RoomClaims``), and the replica that holds the
        sync lease syncs, its rounds fenced with it; the others stand by to take over."""
        delivery = Delivery(
            inbox,
            self.dispatcher.feed,
            self.give_up,
            expand=self.catchup.expand,
            on_idle=lambda: claims.wake(),
        )

        def handed(entry: Entry) -> None:  # the room's latest message, as far as it knows
            if entry.update.is_event:
                self.services.conversation.arrived(entry.update.room_id, entry.update.event_id)

        claims = RoomClaims(self.leases, inbox, delivery, self.health, on_handed=handed)
        leading = asyncio.Event()  # set while this replica syncs; cleared when the lease is lost

        def lost(lease: Lease) -> None:
            if lease.name == SYNC_LEASE:
                leading.clear()
            else:
                claims.lost(lease)

        async def deliver(entries: list[Entry]) -> None:
            if entries:
                claims.wake()
                try:
                    await self.coordinator.notify_inbox()
                except StoreRefused:
                    pass  # the others find the entries at their next look

        self._deliver, self._delivery = deliver, delivery
        self.leases.on_lost = lost
        self.services.hs.guard = self.leases.guard
        await self.coordinator.start()
        keeper = asyncio.create_task(
            self.leases.keep(stop, lambda: self.leases.held(SYNC_LEASE) is not None)
        )
        claiming = asyncio.create_task(claims.run(stop))
        log.info("replica.started", replica=self.coordinator.replica)
        listener: AppserviceListener | None = None
        beside: list[asyncio.Task] = []
        try:
            if self.config.appservice is not None:
                # Every replica listens (SPEC §10): behind a load balancer, any of them may be
                # pushed any transaction; the store numbers the entries, whoever records.
                listener, self._pushed, catch_up = await self._listen(inbox, delivery)
                beside.append(asyncio.create_task(self._ping(stop, self.config.appservice.id)))
                if catch_up:
                    beside.append(asyncio.create_task(self._follow_catch_up(stop, self._pushed)))
            while not stop.is_set():
                try:
                    lease = await self.leases.acquire(SYNC_LEASE)
                except StoreRefused as err:
                    self.health.store_refused(str(err))
                    lease = None
                if lease is None:
                    await sleep_or_stop(stop, STANDBY_POLL_S)
                    continue
                leading.set()
                await self._lead(stop, leading, lease, inbox)
        finally:
            if listener is not None:
                await listener.stop()
            for task in beside:
                task.cancel()
            await asyncio.gather(*beside, return_exceptions=True)
            if not stop.is_set():  # a bug: the claims would wait for a stop forever
                claiming.cancel()
            await asyncio.gather(claiming, return_exceptions=True)
            await delivery.close()
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
            await self.leases.release_all()
            await self.coordinator.close()

    async def _lead(
        self, stop: asyncio.Event, leading: asyncio.Event, lease: Lease, inbox: Inbox
    ) -> None:
        """Sync while this replica holds the sync lease ``lease``; from the recorded token."""
        ended = asyncio.Event()  # the process stops, or the lease is lost

        async def watch() -> None:
            stopping = asyncio.ensure_future(stop.wait())
            while not ended.is_set() and leading.is_set() and not stopping.done():
                await asyncio.wait({stopping}, timeout=0.2)
            stopping.cancel()
            ended.set()

        watcher = asyncio.create_task(watch())
        try:
            await inbox.lead(lease)
            assert self._delivery is not None
            if self.config.appservice is not None:
                await self._lead_catch_up(ended, lease, inbox, self._delivery)
                return
            since = await self.store.get_sync_token()
            log.info("sync.starting", resume=since is not None, inbox=inbox.depth, term=lease.term)
            await self._sync_loop(ended, since, inbox, self._delivery)
        except LeaseLost as err:
            log.warning("sync.lease_lost", error=str(err))
        except StoreRefused as err:
            self.health.store_refused(str(err))
            log.warning("sync.store_refused", error=str(err))
            await sleep_or_stop(stop, STANDBY_POLL_S)
        finally:
            ended.set()
            await asyncio.gather(watcher, return_exceptions=True)
            if self._catching_up is not None:
                self._catching_up.cancel()  # unrecorded: the next leader without a token redoes it
                await asyncio.gather(self._catching_up, return_exceptions=True)
                self._catching_up = None
            if self.leases.held(SYNC_LEASE) == lease:
                await self.leases.release(lease)
            leading.clear()
            log.info("sync.stopped_leading", term=lease.term)
