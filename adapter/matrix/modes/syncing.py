"""Sync mode: one loop that only ingests. Each round is recorded with its token in the inbox
and handed to the lanes; a start without a token answers at once and catches up beside."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import structlog
from nio import SyncResponse

from adapter.matrix.delivery.inbox import Inbox, WriteFailed
from adapter.matrix.delivery.lanes import Delivery
from adapter.matrix.homeserver.session import HomeserverUnreachable
from adapter.matrix.ingest.sweep import TIMELINE, TIMELINE_TYPES
from adapter.matrix.ingest.sync import sync_token_refused
from adapter.matrix.modes.catching_up import CatchingUp
from adapter.matrix.modes.parts import HOMESERVER_FAULTS, MAX_BACKOFF_S, sleep_or_stop

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


class SyncTokenRefused(Exception):
    """The homeserver no longer accepts the stored sync token."""


class Syncing(CatchingUp):
    """The sync loop and its requests."""

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
            except HOMESERVER_FAULTS as err:
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
