"""What the ways the bot runs share: the parts ``Bot.__init__`` assembles (declared here, so
that each mode reads as plain methods on them), and the small helpers they all use."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import ClientError
from nio import AsyncClient

from adapter.matrix.chain.context import Services
from adapter.matrix.chain.dispatcher import Dispatcher
from adapter.matrix.chain.notices import tell_store_down
from adapter.matrix.chain.router import Route
from adapter.matrix.config import Config
from adapter.matrix.delivery.inbox import Entry
from adapter.matrix.delivery.lanes import Delivery
from adapter.matrix.delivery.leases import Leases
from adapter.matrix.homeserver.client import HomeserverError
from adapter.matrix.homeserver.session import HomeserverUnreachable
from adapter.matrix.ingest.appservice import PushedIngest
from adapter.matrix.ingest.catchup import CatchUpReader
from adapter.matrix.ingest.sweep import JoinedRoomsSweep, Sweep
from adapter.matrix.ingest.sync import Ingest
from adapter.matrix.ingest.update import Update
from adapter.matrix.observe.health import Health
from adapter.matrix.observe.metrics import Metrics
from adapter.matrix.store.records import MatrixStore
from core.store import Store, StoreRefused
from core.store.coordination import Coordinator

log = structlog.get_logger()

MAX_BACKOFF_S = 60.0
# A request to the homeserver that failed for a reason of the moment: retried with backoff.
HOMESERVER_FAULTS = (TimeoutError, HomeserverUnreachable, HomeserverError, ClientError, OSError)


class BotParts:
    """The bot's parts, as the modes below use them (set by ``Bot.__init__``)."""

    client: AsyncClient
    coordinator: Coordinator
    leases: Leases
    db: Store
    config: Config
    store: MatrixStore
    metrics: Metrics
    health: Health
    services: Services
    ingest: Ingest
    catchup: CatchUpReader
    sweep: Sweep | JoinedRoomsSweep
    dispatcher: Dispatcher
    _catching_up: asyncio.Task | None  # a start without a token's catch-up
    _round_done: asyncio.Event  # clear while a live round is in hand, not queued
    _catching_up_since: float  # when the start's catch-up began (monotonic)
    _delivery: Delivery | None  # this run's lanes
    _pushed: PushedIngest | None  # appservice mode: what the listener records
    _deliver: Callable[[list[Entry]], Awaitable[None]]  # hands recorded entries to the lanes

    async def give_up(self, update: Update) -> None:
        """An update its lane gave up on (``Bot.give_up``)."""
        raise NotImplementedError

    async def _nowhere(self, entries: list[Entry]) -> None:
        raise AssertionError("recorded before the lanes run")

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
