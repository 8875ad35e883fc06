"""Appservice mode (SPEC §10): the homeserver pushes transactions; each is recorded in the
inbox, then acknowledged. With replicas every replica listens; one runs the catch-up."""

from __future__ import annotations

import asyncio
import secrets
import time

import structlog

from adapter.matrix.delivery.inbox import Inbox, WriteFailed
from adapter.matrix.delivery.lanes import Delivery
from adapter.matrix.homeserver.client import HomeserverError
from adapter.matrix.ingest.appservice import AppserviceListener, PushedIngest
from adapter.matrix.ingest.update import Update
from adapter.matrix.modes.catching_up import CatchingUp
from adapter.matrix.modes.parts import MAX_BACKOFF_S, sleep_or_stop
from core.store import StoreRefused
from core.store.contract import Lease

log = structlog.get_logger()

CATCH_UP_LOOK_S = 1.0  # appservice replicas: how often one looks whether the catch-up is over


class Pushed(CatchingUp):
    """Listening for what the homeserver pushes."""

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
            except Exception:  # a bug: logged, and looked for again (never silently gone)
                log.exception("appservice.catch_up_look_crashed")
                continue
            if caught is not None:
                pushed.caught_up(caught.at * 1000, set(caught.rooms))
                log.info("appservice.caught_up", rooms=len(caught.rooms))
                return

    async def _pushed_catch_up(
        self, stop: asyncio.Event, inbox: Inbox, delivery: Delivery, pushed: PushedIngest
    ) -> None:
        if not await self._catch_up(stop, inbox, delivery):
            return
        rooms, backoff = set(self.ingest.deferred), 1.0
        pushed.caught_up(time.time() * 1000, rooms)  # this replica knows at once
        while not stop.is_set():  # the others know once it is recorded: until then, they
            try:  # check each pushed message's room for an answer first
                caught = await self.store.mark_appservice_caught_up(rooms)
            except StoreRefused as err:
                log.warning(
                    "store.write_failed", during="catchup", error=str(err), retry_in_s=backoff
                )
                await sleep_or_stop(stop, backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            pushed.caught_up(caught.at * 1000, rooms)
            return

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
