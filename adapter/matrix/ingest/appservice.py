"""The appservice way in (SPEC §10): the homeserver pushes transactions of events to
``PUT /_matrix/app/v1/transactions/{txnId}``, retries each until it is answered 200, and keeps
what the bot was not there for. A transaction is answered 200 only once its updates are
recorded (``Record``, the inbox's, handed in by the wiring); one the store refuses gets a 500,
so the homeserver pushes it again.

``pushed_updates`` is the pure rule over a transaction's events (the same rules as sync's,
``ingest.events``); ``AppserviceListener`` is the thin aiohttp shell around it.
"""

from __future__ import annotations

import hmac
import json
import math
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from adapter.matrix.config import ListenAddr
from adapter.matrix.ingest.events import to_update
from adapter.matrix.ingest.update import Update
from adapter.matrix.observe.listener import serve
from core.store import StoreError

log = structlog.get_logger()

API = "/_matrix/app/v1"
MAX_BODY = 16 * 1024 * 1024  # a transaction holds at most 100 events of at most 64 KiB
# An event this much younger than the end of a start's sweep may still be one a read back of
# the sweep reads (the clocks of the bot and the homeserver may differ a bit).
CATCHUP_MARGIN_MS = 30_000

# Records a transaction's updates (its id, and the updates), atomically; raises StoreError
# when the store refuses them.
Record = Callable[[str, list[Update]], Awaitable[None]]
Observer = Callable[[str, Iterable[dict], bool], None]


def pushed_invite(ev: dict, bot_id: str) -> tuple[str, str] | None:
    """(room id, inviter) when the event invites the bot."""
    content, sender = ev.get("content"), ev.get("sender")
    if (
        ev.get("type") == "m.room.member"
        and ev.get("state_key") == bot_id
        and isinstance(content, dict)
        and content.get("membership") == "invite"
        and isinstance(sender, str)
        and sender != bot_id
    ):
        return ev["room_id"], sender
    return None


def pushed_updates(
    events: Iterable[object], bot_id: str, replayed: Callable[[Update], bool] = lambda u: False
) -> list[Update]:
    """A transaction's updates, in order. An update that a start's catch-up may also have
    read (``replayed``) is marked so, and the chain looks for an answer before giving one."""
    updates = []
    for ev in events:
        if not isinstance(ev, dict) or not isinstance(ev.get("room_id"), str):
            continue
        if (invite := pushed_invite(ev, bot_id)) is not None:
            room_id, inviter = invite
            updates.append(
                Update("invite", room_id, inviter, f"invite|{room_id}|{ev.get('event_id')}")
            )
        elif (update := to_update(ev, bot_id)) is not None:
            updates.append(replace(update, replayed=True) if replayed(update) else update)
    return updates


def rooms_of(events: Iterable[object]) -> dict[str, list[dict]]:
    """A transaction's room events, by room, in order."""
    rooms: dict[str, list[dict]] = {}
    for ev in events:
        if isinstance(ev, dict) and isinstance(ev.get("room_id"), str):
            rooms.setdefault(ev["room_id"], []).append(ev)
    return rooms


class PushedIngest:
    """Turns pushed transactions into updates, and keeps the conversation in step with them.

    After a start's catch-up, the homeserver may push events that the catch-up also read (it
    held them while the bot was down): while the sweep runs, every pushed message may be one;
    after it, those of the rooms it gave a read back, up to its end (plus a margin for the
    clocks of the bot and the homeserver)."""

    def __init__(self, bot_id: str, observe: Observer | None = None) -> None:
        self.bot_id = bot_id
        self.observe = observe or (lambda room_id, events, limited: None)
        self._before_ms = 0.0
        self._rooms: set[str] | None = set()  # None: every room

    def catching_up(self) -> None:
        """A start's catch-up begins."""
        self._before_ms, self._rooms = math.inf, None

    def caught_up(self, now_ms: float, rooms: set[str]) -> None:
        """The catch-up's sweep is recorded; ``rooms`` read back from what it saw."""
        self._before_ms, self._rooms = now_ms + CATCHUP_MARGIN_MS, set(rooms)

    def replayed(self, update: Update) -> bool:
        return update.ts < self._before_ms and (
            self._rooms is None or update.room_id in self._rooms
        )

    def updates(self, events: list[object]) -> list[Update]:
        for room_id, room_events in rooms_of(events).items():
            self.observe(room_id, room_events, False)
        return pushed_updates(events, self.bot_id, self.replayed)


def _error(status: int, errcode: str, error: str) -> web.Response:
    return web.json_response({"errcode": errcode, "error": error}, status=status)


class AppserviceListener:
    """Serves the appservice API for one bot until ``stop``. Open it with ``start``."""

    def __init__(self, runner: web.AppRunner, addr: ListenAddr) -> None:
        self._runner = runner
        self.addr = addr  # as bound: port 0 became a free port

    @classmethod
    async def start(
        cls,
        addr: ListenAddr,
        hs_token: str,
        ingest: PushedIngest,
        record: Record,
    ) -> AppserviceListener:
        """Listen on ``addr``; raises ``ListenerUnavailable`` when that is impossible."""

        @web.middleware
        async def authorized(request: web.Request, handler: Handler) -> web.StreamResponse:
            header = request.headers.get("Authorization", "")
            given = (
                header.removeprefix("Bearer ").strip()
                if header.startswith("Bearer ")
                else request.query.get("access_token")  # the legacy way
            )
            if not given or not hmac.compare_digest(given.encode(), hs_token.encode()):
                reason = "missing" if not given else "wrong"
                log.warning(
                    "appservice.unauthorized",
                    reason=reason,
                    method=request.method,
                    path=request.path,
                    remote=request.remote,
                )
                if not given:
                    return _error(401, "M_UNAUTHORIZED", "no hs_token given")
                return _error(403, "M_FORBIDDEN", "wrong hs_token")
            return await handler(request)

        async def transaction(request: web.Request) -> web.Response:
            txn_id = request.match_info["txn_id"]
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                return _error(400, "M_NOT_JSON", "the body is not JSON")
            events = body.get("events") if isinstance(body, dict) else None
            if not isinstance(events, list):
                return _error(400, "M_BAD_JSON", "events must be a list")
            try:
                await record(txn_id, ingest.updates(events))
            except StoreError as err:  # logged by whoever met it; the homeserver retries
                return _error(500, "M_UNKNOWN", f"the bot cannot record this now: {err}")
            except Exception:
                log.exception("appservice.transaction_failed", txn_id=txn_id, events=len(events))
                return _error(500, "M_UNKNOWN", "the bot failed to record this transaction")
            log.debug("appservice.transaction", txn_id=txn_id, events=len(events))
            return web.json_response({})

        async def ping(request: web.Request) -> web.Response:
            log.debug("appservice.pinged", remote=request.remote)
            return web.json_response({})

        async def unknown(request: web.Request) -> web.Response:
            return _error(404, "M_UNRECOGNIZED", "Unrecognized request")

        app = web.Application(middlewares=[authorized], client_max_size=MAX_BODY)
        app.router.add_put(API + "/transactions/{txn_id}", transaction)
        app.router.add_post(API + "/ping", ping)
        app.router.add_route("*", "/{tail:.*}", unknown)
        listener = cls(*await serve(app, addr, "LAMBDA_APPSERVICE_LISTEN"))
        log.info("appservice.listening", addr=str(listener.addr))
        return listener

    async def stop(self) -> None:
        await self._runner.cleanup()
