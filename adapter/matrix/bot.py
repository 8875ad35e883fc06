"""The bot: the chain assembled, and the way events come in. Startup does no reconciliation:
missing local state is healed lazily, by the healing link of the chain. The process around it
(checks, login, exit codes) is ``run``; the ways it runs are in ``modes/`` (sync, appservice,
replicas, and a start's catch-up beside any of them).

An event's way: ``modes`` (the sync loop, or the appservice listener) -> ``ingest`` (a
round's updates) -> ``inbox`` (written with the sync token) -> ``delivery`` (a worker per
room) -> ``dispatcher`` (the middleware chain) -> ``handlers``."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace

import structlog
from nio import AsyncClient, AsyncClientConfig

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
from adapter.matrix.chain.router import RoomRouter
from adapter.matrix.config import Config
from adapter.matrix.conversation.history import Conversations
from adapter.matrix.delivery.inbox import Entry, Inbox
from adapter.matrix.delivery.lanes import Delivery
from adapter.matrix.delivery.leases import Leases
from adapter.matrix.handlers import handle_update
from adapter.matrix.healing.healer import Healer
from adapter.matrix.homeserver.client import Homeserver
from adapter.matrix.ingest.appservice import PushedIngest
from adapter.matrix.ingest.catchup import CatchUpReader
from adapter.matrix.ingest.sweep import JoinedRoomsSweep, Sweep
from adapter.matrix.ingest.sync import Ingest
from adapter.matrix.ingest.update import Update
from adapter.matrix.modes.parts import MAX_BACKOFF_S, sleep_or_stop
from adapter.matrix.modes.replicas import Replicated
from adapter.matrix.observe.health import Health
from adapter.matrix.observe.metrics import Metrics
from adapter.matrix.store.records import MatrixStore
from core.agent import Agent
from core.chat import ChatManager
from core.store import Store, StoreRefused
from core.store.coordination import Coordinator, SoleCoordinator

log = structlog.get_logger()


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


GAVE_UP = (
    "Sorry, I could not answer this message: the homeserver kept failing for too "
    "long. Please send it again."
)
GAVE_UP_CATCHING_UP = (
    "Sorry, I could not catch up on the messages sent here while I was "
    "away: the homeserver kept failing for too long. Please send again "
    "what still needs an answer."
)


class Bot(Replicated):
    """The bot's parts, assembled once; ``run`` picks the way it runs (``modes``)."""

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
        # With replicas no sync feeds every room here: each answer reads its room (history.py).
        conversation = Conversations(hs, config.history_turns, fed=not self.coordinator.shared)
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
