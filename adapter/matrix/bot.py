"""The bot: its sync loop, a start's catch-up beside it, and the wiring of the chain. Startup
does no reconciliation: missing local state is healed lazily, by the healing link of the
chain. The process around it (checks, login, exit codes) is ``run``.

An event's way: ``Bot.run`` (sync loop) -> ``ingest`` (a round's updates) -> ``inbox``
(written with the sync token) -> ``delivery`` (a worker per room) -> ``dispatcher`` (the
middleware chain) -> ``handlers``."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from contextlib import aclosing, suppress
from dataclasses import replace
from functools import partial
from typing import Any

import structlog
from aiohttp import ClientError
from nio import AsyncClient, AsyncClientConfig, SyncResponse

from adapter.matrix.chain.access import Access
from adapter.matrix.chain.context import EventData, Services
from adapter.matrix.chain.dispatcher import Dispatcher
from adapter.matrix.chain.healing import HealingMiddleware
from adapter.matrix.chain.middlewares import (
    allowed_users_only,
    answered_once,
    catchup_in_chats_only,
    owner_only,
    resolve_route,
    store_faults,
)
from adapter.matrix.chain.notices import tell_store_down
from adapter.matrix.chain.router import RoomRouter, Route
from adapter.matrix.config import Config
from adapter.matrix.conversation.history import Conversations
from adapter.matrix.delivery.claims import RoomClaims
from adapter.matrix.delivery.inbox import Entry, Inbox, WriteFailed
from adapter.matrix.delivery.lanes import Delivery
from adapter.matrix.delivery.leases import Leases
from adapter.matrix.handlers import handle_update
from adapter.matrix.healing.healer import Healer
from adapter.matrix.homeserver.client import Homeserver, HomeserverError
from adapter.matrix.homeserver.session import HomeserverUnreachable
from adapter.matrix.ingest.appservice import AppserviceListener, PushedIngest
from adapter.matrix.ingest.catchup import CatchUpReader
from adapter.matrix.ingest.sweep import TIMELINE, TIMELINE_TYPES, JoinedRoomsSweep, Sweep
from adapter.matrix.ingest.sync import Ingest, sync_token_refused
from adapter.matrix.ingest.update import Update
from adapter.matrix.observe.health import Health
from adapter.matrix.observe.metrics import Metrics
from adapter.matrix.store.records import MatrixStore
from core.agent import Agent
from core.chat import ChatManager
from core.store import Store, StoreRefused
from core.store.contract import Lease, LeaseLost
from core.store.coordination import Coordinator, SoleCoordinator

log = structlog.get_logger()

SYNC_TIMEOUT_MS = 30_000
# Only what the bot uses (SPEC §7, Scale). No presence, no account data, no ephemeral events:
# other users' typing and read receipts would each end the long poll and cost a sync round.
# Members are loaded lazily (those of the timeline's senders): a heal reads a room's members
# from its state; finding a user's Space goes by the Space markers sync shows (note_sync).
SYNC_FILTER: dict[str, Any] = {
    "presence": {"not_types": ["*"]},
    "account_data": {"not_types": ["*"]},
    "room": {
        "timeline": {"limit": 100, "lazy_load_members": True},
        "state": {"lazy_load_members": True},
        "ephemeral": {"not_types": ["*"]},
        "account_data": {"not_types": ["*"]},
    },
}
# A start without a token answers from a first sync that carries no room (a few ms at any
# size), and catches up in the background (ingest.sweep): on a homeserver without sliding
# sync, with one first sync of every room's latest events, short.
QUICK_SYNC_FILTER = {**SYNC_FILTER, "room": {**SYNC_FILTER["room"], "rooms": []}}
CATCHUP_SYNC_FILTER = {
    **SYNC_FILTER,
    "room": {
        **SYNC_FILTER["room"],
        "timeline": {**SYNC_FILTER["room"]["timeline"], "limit": TIMELINE, "types": TIMELINE_TYPES},
    },
}
MAX_BACKOFF_S = 60.0
SWEEP_YIELD_S = 1.0  # at most this long, a sweep's next window waits for busy lanes
SWEEP_SETTLE_S = 0.3  # and until they have been quiet this long: a user just answered may write
# again at once; so may the users who were waiting for the bot, once it is back: the sweep's
# second window waits until the live path has run this long too.
SYNC_LEASE = "sync"  # with replicas: the one that syncs holds it
STANDBY_POLL_S = 0.5  # how often a replica that does not sync tries to take the sync lease
CATCH_UP_LOOK_S = 1.0  # appservice replicas: how often one looks whether the catch-up is over


def client_config() -> AsyncClientConfig:
    # nio retries 429s (sleeping the full retry_after, a minute for room creation) and
    # timeouts forever by default. Rate limits are handled in Homeserver._call instead, and
    # timeouts are bounded, so a heal or a reply fails visibly rather than stalling the bot.
    return AsyncClientConfig(
        max_limit_exceeded=0,
        max_timeouts=2,
        request_timeout=30,
        max_timeout_retry_wait_time=5,
        encryption_enabled=False,
    )


class SyncTokenRefused(Exception):
    """The homeserver no longer accepts the stored sync token."""


GAVE_UP = (
    "Sorry, I could not answer this message: the homeserver kept failing for too "
    "long. Please send it again."
)
GAVE_UP_CATCHING_UP = (
    "Sorry, I could not catch up on the messages sent here while I was "
    "away: the homeserver kept failing for too long. Please send again "
    "what still needs an answer."
)


class Bot:
    """One sync loop that only ingests, and the workers that deliver what it ingested."""

    def __init__(
        self,
        client: AsyncClient,
        store: Store,
        agent: Agent,
        config: Config,
        metrics: Metrics,
        health: Health,
        coordinator: Coordinator | None = None,
    ) -> None:
        self.client = client
        self.coordinator = coordinator or SoleCoordinator()
        self.leases = Leases(self.coordinator, health)
        self.db = store
        self.config = config
        self.store = MatrixStore(store)
        self.metrics, self.health = metrics, health
        hs = Homeserver(client, config.server_name)
        conversation = Conversations(hs, config.history_turns)
        self.services = Services(
            hs=hs,
            store=self.store,
            chats=ChatManager(store),
            agent=agent,
            router=RoomRouter(self.store),
            access=Access(config.allowed_patterns, config.max_chats, config.creations_per_minute),
            conversation=conversation,
            metrics=self.metrics,
            health=self.health,
            agent_slots=asyncio.Semaphore(config.concurrency),
            shared_lock=self.leases.holding if self.coordinator.shared else None,
        )
        self.ingest = Ingest(hs, config.catchup_hours, observe=conversation.observe)
        self.catchup = CatchUpReader(hs, config.catchup_hours)
        self.sweep: Sweep | JoinedRoomsSweep = (
            Sweep(hs, lambda: self.fetch(None, False, every_room=True))
            if config.appservice is None
            else JoinedRoomsSweep(hs)  # an appservice may not sync
        )
        self._catching_up: asyncio.Task | None = None  # a start without a token's catch-up
        self._round_done = asyncio.Event()  # clear while a live round is in hand, not queued
        self._round_done.set()
        self._catching_up_since = 0.0  # when the start's catch-up began (monotonic)
        self._delivery: Delivery | None = None  # this run's lanes
        self._pushed: PushedIngest | None = None  # appservice mode: what the listener records
        self._deliver: Callable[[list[Entry]], Awaitable[None]] = self._nowhere
        self.dispatcher = Dispatcher(
            [
                store_faults,
                allowed_users_only,
                resolve_route,
                HealingMiddleware(Healer(self.services)),
                owner_only,
                catchup_in_chats_only,
                answered_once,
            ],
            handle_update,
            EventData(services=self.services),
        )

    async def fetch(
        self, since: str | None, long_poll: bool, again: bool = False, every_room: bool = False
    ) -> SyncResponse:
        """One sync request; the only part of the loop that a stop may interrupt. ``again``:
        the same ``since`` as a round that failed (the homeserver's, or the DB's), answered at
        once, so that a recovery shows (``sync.recovered``, ``/health``) without waiting out a
        long-poll. Without ``since``: no room, or (``every_room``) every room, short."""
        # Synapse caches a sync answer for ~2 min keyed by (since, timeout, filter, ...): a
        # restart (no token) or a round asked again would get a stale one and miss what came
        # since. A timeout unique to this call keeps the key unique.
        if since is None:
            timeout = 1 + secrets.randbelow(10**9)  # an initial sync is answered at once
        elif again:
            timeout = 1 + secrets.randbelow(1000)
        else:
            timeout = SYNC_TIMEOUT_MS if long_poll else 0
        sync_filter = (
            SYNC_FILTER
            if since is not None
            else (CATCHUP_SYNC_FILTER if every_room else QUICK_SYNC_FILTER)
        )
        if since is None:  # nio falls back on the last token it saw: none is meant here
            self.client.next_batch = self.client.loaded_sync_token = None
        resp = await self.client.sync(timeout=timeout, since=since, sync_filter=sync_filter)
        if isinstance(resp, SyncResponse):
            if since is not None and (resp.rooms.join or resp.rooms.invite):
                self._round_done.clear()  # until its updates are queued (the loop goes round)
            self.services.hs.note_sync(resp)
            return resp
        transport = resp.transport_response
        if since is not None and sync_token_refused(
            transport.status if transport else None, resp.status_code, resp.message
        ):
            raise SyncTokenRefused(f"{resp.status_code} {resp.message}")
        raise HomeserverUnreachable(f"sync: {resp.status_code} {resp.message}")

    async def give_up(self, update: Update) -> None:
        self.metrics.updates_given_up.inc()
        if update.kind != "invite":
            await self.services.try_reply(
                update, GAVE_UP_CATCHING_UP if update.kind == "catchup" else GAVE_UP, part="gave-up"
            )

    async def run(self, stop: asyncio.Event) -> None:
        backoff = 1.0
        while True:  # PostgreSQL may go away between the open and here: wait, like the loop
            try:
                inbox, pending = await Inbox.open(self.db, self.metrics, self.health)
                since = await self.store.get_sync_token()
                break
            except StoreRefused as fault:
                self.health.store_refused(str(fault))
                log.error(
                    "store.read_failed",
                    during="start",
                    error=str(fault),
                    remedy=fault.remedy,
                    retry_in_s=backoff,
                )
                await sleep_or_stop(stop, backoff)
                if stop.is_set():
                    return
                backoff = min(backoff * 2, MAX_BACKOFF_S)
        if self.coordinator.shared:
            await self._run_replica(stop, inbox)
            return
        delivery = Delivery(inbox, self.dispatcher.feed, self.give_up, expand=self.catchup.expand)

        async def deliver(entries: list[Entry]) -> None:
            delivery.push(entries)

        self._deliver, self._delivery = deliver, delivery
        # What an earlier run left unfinished goes first; it may have answered some of it.
        delivery.push(
            replace(entry, update=replace(entry.update, replayed=True)) for entry in pending
        )
        try:
            if self.config.appservice is not None:
                await self._serve_pushed(stop, inbox, delivery)
            else:
                log.info("sync.starting", resume=since is not None, inbox=len(pending))
                await self._sync_loop(stop, since, inbox, delivery)
        finally:
            self._round_done.set()
            if self._catching_up is not None:
                self._catching_up.cancel()  # its round stays unrecorded: the next start redoes it
                await asyncio.gather(self._catching_up, return_exceptions=True)
            await delivery.close()

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
        claims = RoomClaims(
            self.leases, inbox, delivery, self.health, on_gain=self.services.conversation.forget
        )
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

    async def _nowhere(self, entries: list[Entry]) -> None:
        raise AssertionError("recorded before the lanes run")

    async def _catch_up(self, stop: asyncio.Event, inbox: Inbox, delivery: Delivery) -> bool:
        """A start without a token, beside the sync loop: the sweep looks at every room's
        latest events, a window at a time, most recently active first, and decides which rooms
        read back (``Ingest.sweep``). Each window is recorded as it comes and handled at once,
        before the next is asked for (the homeserver's time goes to users first); once the
        last one is recorded, the token is kept again. False: stopped before."""
        backoff = 1.0
        unrecorded: list[Update] = []
        self._catching_up_since = time.monotonic()
        while not stop.is_set():
            try:
                if unrecorded:  # decided, but the file refused them: never decided again
                    await self._deliver(await inbox.add(unrecorded))
                    unrecorded = []
                give_way = partial(self._give_way, delivery)
                async with aclosing(self.sweep.windows(give_way)) as windows:
                    async for window in windows:
                        unrecorded = self.ingest.sweep(window)
                        await self._deliver(await inbox.add(unrecorded))
                        unrecorded = []
                await inbox.release()
                self.ingest.swept()
                return True
            except (
                TimeoutError,
                HomeserverUnreachable,
                HomeserverError,
                ClientError,
                OSError,
                WriteFailed,
            ) as err:
                log.warning(
                    "sync.catchup_failed", error=str(err) or type(err).__name__, retry_in_s=backoff
                )
            except LeaseLost as err:  # another replica syncs now: its start catches up
                log.info("sync.catchup_handed_over", error=str(err))
                return False
            except Exception:  # a bug: logged, retried like a fault, never silently gone
                log.exception("sync.catchup_crashed", retry_in_s=backoff)
            await sleep_or_stop(stop, backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)
        return False

    async def _serve_pushed(self, stop: asyncio.Event, inbox: Inbox, delivery: Delivery) -> None:
        """Appservice mode (SPEC §10), one process: no sync loop. The listener records each
        pushed transaction in the inbox and hands it to delivery; the homeserver is pinged so
        that it pushes at once what it holds; a DB that has not caught up as an appservice yet
        (first start, total loss, an account that synced before) runs the start's catch-up."""
        assert self.config.appservice is not None
        listener, pushed, catch_up = await self._listen(inbox, delivery)
        tasks = [asyncio.create_task(self._ping(stop, self.config.appservice.id))]
        if catch_up:
            self.ingest.start_without_token("")  # each room reads back from its own read
            tasks.append(asyncio.create_task(self._pushed_catch_up(stop, inbox, delivery, pushed)))
        try:
            await stop.wait()
        finally:
            await listener.stop()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _listen(
        self, inbox: Inbox, delivery: Delivery
    ) -> tuple[AppserviceListener, PushedIngest, bool]:
        """Listen for the transactions the homeserver pushes, each recorded in the inbox (in
        one store transaction, numbered by the store: any replica may record) and handed to
        delivery. Also whether this DB's start's catch-up is still to come: until it is
        recorded, every pushed message may be one it reads too, and is marked so."""
        registration, addr = self.config.appservice, self.config.appservice_listen
        assert registration is not None and addr is not None
        pushed = PushedIngest(self.services.hs.bot_id, self.services.conversation.observe)
        try:
            caught = await self.store.appservice_caught_up()
        except StoreRefused as fault:  # unknown: catching up again does no harm
            log.warning("store.read_failed", during="start", error=str(fault), remedy=fault.remedy)
            caught = None
        if caught is None:
            pushed.catching_up()
        else:
            pushed.caught_up(caught.at * 1000, set(caught.rooms))
        log.info("appservice.starting", catch_up=caught is None, inbox=delivery.queued)
        waiting: set[str] = set()  # while the DB refuses writes: the messages held back

        async def record(txn_id: str, updates: list[Update]) -> None:
            try:
                entries = await inbox.add_transaction(txn_id, updates)
            except WriteFailed as fault:  # answered 500: the homeserver pushes it again
                self.health.store_refused(str(fault))
                log.error(
                    "store.write_failed",
                    during="transaction",
                    txn_id=txn_id,
                    error=str(fault),
                    remedy=fault.remedy,
                    updates=len(updates),
                )
                await self._tell_held_back(updates, waiting)
                raise
            if waiting or self.health.store_refusing:
                log.info("store.recovered", waited=len(waiting))
                waiting.clear()
            self.health.synced()
            await self._deliver(entries)

        listener = await AppserviceListener.start(addr, registration.hs_token, pushed, record)
        self.health.listening()
        log.info("bot.ready", mode="appservice", listen=str(listener.addr))
        return listener, pushed, caught is None

    async def _lead_catch_up(
        self, ended: asyncio.Event, lease: Lease, inbox: Inbox, delivery: Delivery
    ) -> None:
        """Appservice mode with replicas: every replica listens, and the one that holds the
        sync lease runs the start's catch-up if the deployment has not recorded one (once per
        deployment: its windows are fenced with the lease). It keeps the lease until it stops
        or loses it, so the catch-up is not looked for again and again."""
        assert self._pushed is not None
        caught = await self.store.appservice_caught_up()
        log.info("appservice.leading", catch_up=caught is None, term=lease.term)
        if caught is None:
            self.ingest.start_without_token("")  # each room reads back from its own read
            self._catching_up = asyncio.create_task(
                self._pushed_catch_up(ended, inbox, delivery, self._pushed)
            )
        await ended.wait()

    async def _follow_catch_up(self, stop: asyncio.Event, pushed: PushedIngest) -> None:
        """With replicas: the deployment's catch-up runs on one of them; until it is recorded,
        this one marks every pushed message as one it may read too, then only those it may
        have read (in the rooms it read back, sent before it ended)."""
        while not stop.is_set():
            await sleep_or_stop(stop, CATCH_UP_LOOK_S)
            try:
                caught = await self.store.appservice_caught_up()
            except StoreRefused:
                continue  # the next look
            if caught is not None:
                pushed.caught_up(caught.at * 1000, set(caught.rooms))
                log.info("appservice.caught_up", rooms=len(caught.rooms))
                return

    async def _pushed_catch_up(
        self, stop: asyncio.Event, inbox: Inbox, delivery: Delivery, pushed: PushedIngest
    ) -> None:
        if not await self._catch_up(stop, inbox, delivery):
            return
        rooms = set(self.ingest.deferred)
        try:
            caught = await self.store.mark_appservice_caught_up(rooms)
        except StoreRefused as err:  # the next start catches up again: no harm
            log.warning("store.write_failed", during="catchup", error=str(err))
            pushed.caught_up(time.time() * 1000, rooms)
            return
        pushed.caught_up(caught.at * 1000, rooms)

    async def _ping(self, stop: asyncio.Event, appservice_id: str) -> None:
        """Have the homeserver ping the listener, and so retry at once what it holds."""
        backoff = 1.0
        while not stop.is_set():
            try:
                ms = await self.services.hs.appservice_ping(
                    appservice_id, f"lambda-start-{secrets.token_hex(6)}"
                )
                log.info("appservice.ping", duration_ms=ms)
                return
            except HomeserverError as err:
                log.warning(
                    "appservice.ping_failed",
                    error=str(err),
                    retry_in_s=backoff,
                    remedy="check that the homeserver reaches the registration's url "
                    "(LAMBDA_APPSERVICE_LISTEN is where the bot listens)",
                )
            await sleep_or_stop(stop, backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def _give_way(self, delivery: Delivery) -> None:
        """Before a sweep's next window, what users wait for goes first: a live round in hand
        (its updates not queued yet), then the lanes handling updates, and a moment after them
        (a user just answered often writes again at once), and the start's first moments (the
        users who waited for the bot write as it comes back); for at most SWEEP_YIELD_S and
        SWEEP_SETTLE_S, so that the sweep still goes on under a steady load."""
        started = time.monotonic()
        if (back := SWEEP_SETTLE_S - (started - self._catching_up_since)) > 0:
            await asyncio.sleep(back)  # the bot is just back: its first live rounds go first
        with suppress(TimeoutError):
            await asyncio.wait_for(self._round_done.wait(), SWEEP_YIELD_S)
        left = max(0.0, SWEEP_YIELD_S - (time.monotonic() - started))
        await delivery.quiet(left, settle=SWEEP_SETTLE_S)

    async def _sync_loop(
        self, stop: asyncio.Event, since: str | None, inbox: Inbox, delivery: Delivery
    ) -> None:
        ready, backoff = False, 1.0
        waiting: set[str] | None = None  # while the DB refuses writes: the messages held back
        while not stop.is_set():
            self._round_done.set()  # the last round's updates are queued, or it failed
            fetch = asyncio.ensure_future(
                self.fetch(since, ready, again=waiting is not None or backoff > 1)
            )
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait({fetch, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if not fetch.done():
                fetch.cancel()  # mid-long-poll: nothing of this round was ingested yet
                break
            try:
                resp = fetch.result()
                if since is None:  # answer from here at once; catch up beside the loop
                    self.ingest.start_without_token(resp.next_batch)
                    inbox.hold_token()
                    if self._catching_up is not None:
                        self._catching_up.cancel()
                    self._catching_up = asyncio.create_task(self._catch_up(stop, inbox, delivery))
                updates = await self.ingest.updates(resp, since)
                self.metrics.sync_rounds.inc()
                self.health.homeserver_answered()
            except SyncTokenRefused as err:
                # Start over without a token: the catch-up rules answer what was missed.
                log.warning("sync.token_refused", since=since, error=str(err))
                since = None
                continue
            except (
                TimeoutError,
                HomeserverUnreachable,
                HomeserverError,
                ClientError,
                OSError,
            ) as err:
                if stop.is_set():
                    break  # stopping; or the session was lost for good (run_bot says so)
                self.metrics.sync_failures.inc()
                self.health.homeserver_failed(str(err) or type(err).__name__)
                log.warning("sync.failed", error=str(err) or type(err).__name__, retry_in_s=backoff)
                await sleep_or_stop(stop, backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            try:
                await self._deliver(await inbox.ingest(updates, resp.next_batch))
            except WriteFailed as fault:
                # Nothing was recorded and the token stays where it was: the homeserver hands
                # these events again on the next try, so none is lost.
                self.health.store_refused(str(fault))
                log.error(
                    "store.write_failed",
                    during="sync",
                    error=str(fault),
                    remedy=fault.remedy,
                    updates=len(updates),
                    retry_in_s=backoff,
                )
                waiting = waiting if waiting is not None else set()
                await self._tell_held_back(updates, waiting)
                await sleep_or_stop(stop, backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            since = resp.next_batch
            if updates:
                log.debug("sync.ingested", updates=len(updates), queued=delivery.queued)
            if waiting is not None or self.health.store_refusing:
                # Whichever write was refused (this sync's, or a handler's), this one worked.
                log.info("store.recovered", waited=len(waiting or ()))
                waiting = None
            elif ready and backoff > 1.0:
                log.info("sync.recovered")
            self.health.synced()
            if not ready:
                ready = True
                log.info("bot.ready")
            backoff = 1.0

    async def _tell_held_back(self, updates: list[Update], waiting: set[str]) -> None:
        """Tell the owners of a round's messages, each once, that they wait for the DB."""
        for update in updates:
            if update.kind == "message" and update.event_id not in waiting:
                waiting.add(update.event_id)
                route: Route | None
                try:
                    route = await self.services.router.resolve(update.room_id)
                except StoreRefused:  # the DB cannot even be read (PostgreSQL down)
                    route = self.services.router.last_known(update.room_id)
                await tell_store_down(self.services, update, route)


async def sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass
