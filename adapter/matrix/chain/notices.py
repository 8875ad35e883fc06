"""What the bot tells a user whose update it cannot act on now: a notice about a room it
refuses to heal (at most one an hour per room), the one notice before an update is
postponed after a homeserver failure, and the one notice per message while the DB refuses
writes."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NoReturn

import structlog

from adapter.matrix.chain.context import Services
from adapter.matrix.chain.router import ChatRoute, LobbyRoute, Route
from adapter.matrix.healing.room_state import HealRefused
from adapter.matrix.homeserver.client import HomeserverError
from adapter.matrix.ingest.update import RetryLater, Update

log = structlog.get_logger()

REFUSAL_NOTICE_EVERY_S = 3600.0
RATE_LIMITED = "The homeserver is rate-limiting me. I'll retry in {s} s and answer you then."
STORE_DOWN = (
    "I can't save anything just now: my local storage is full or read-only. Your "
    "message is not lost; I'll answer it as soon as that is fixed."
)
DATABASE_DOWN = (
    "I can't reach my database just now. Your message is not lost; I'll answer it as "
    "soon as the database is back."
)


class RefusalNotices:
    """At most one notice per room and hour about a room the bot cannot heal. An invite or a
    catch-up message (history that may have been answered already) gets none."""

    def __init__(
        self, every_s: float = REFUSAL_NOTICE_EVERY_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.every_s = every_s
        self._clock = clock
        self._last: dict[str, float] = {}

    def due(self, update: Update) -> bool:
        """Whether ``update`` gets the notice; if it does, the room's hour starts now."""
        if update.kind == "invite" or update.catchup:
            return False
        now = self._clock()
        if now - self._last.get(update.room_id, float("-inf")) < self.every_s:
            return False
        self._last[update.room_id] = now
        return True

    async def tell(self, update: Update, refusal: HealRefused, svc: Services) -> None:
        if not self.due(update):
            log.info(
                "event.ignored",
                reason=refusal.reason,
                room_id=update.room_id,
                event_id=update.event_id,
            )
            return
        await svc.try_reply(update, refusal.user_message, part="refusal")


async def postpone(update: Update, err: HomeserverError, svc: Services, notice: str) -> NoReturn:
    """The homeserver failed: tell the user once (on the first attempt, and never for an
    invite), then hand the update back to the inbox, which retries it with backoff.
    ``notice`` is for a homeserver that failed; one that rate-limits says when instead."""
    if update.attempt == 0 and update.kind != "invite":
        if err.retry_after_ms:
            notice = RATE_LIMITED.format(s=max(1, round(err.retry_after_ms / 1000)))
        await svc.try_reply(update, notice, part="retry-notice", provisional=True)
    raise RetryLater(str(err), err.retry_after_ms) from err


async def tell_store_down(svc: Services, update: Update, route: Route | None) -> None:
    """Tell a room's owner that their message waits for the DB to take writes again. The
    transaction id makes it one notice per message, however often it is retried."""
    if (
        update.kind == "message"
        and isinstance(route, ChatRoute | LobbyRoute)
        and update.sender == route.owner
    ):
        notice = DATABASE_DOWN if svc.store.db.engine == "postgresql" else STORE_DOWN
        await svc.try_reply(update, notice, part="store-down", provisional=True)
