"""One dispatcher, one middleware chain (the aiogram shape): each link awaits the next or stops."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Protocol

import structlog

from adapter.matrix.chain.context import EventData
from adapter.matrix.ingest.update import RetryLater, Update
from core.store.contract import LeaseLost

log = structlog.get_logger()

Handler = Callable[[Update, EventData], Awaitable[None]]
CRASHED = "Sorry, something went wrong on my side. It has been logged; please try again."


class Middleware(Protocol):
    async def __call__(self, handler: Handler, update: Update, data: EventData) -> None: ...


def build_chain(middlewares: Sequence[Middleware], handler: Handler) -> Handler:
    """Wrap ``handler`` in ``middlewares``, the first one outermost."""
    for middleware in reversed(middlewares):
        handler = partial(middleware, handler)
    return handler


class Dispatcher:
    def __init__(
        self, middlewares: Sequence[Middleware], handler: Handler, base_data: EventData
    ) -> None:
        self._chain = build_chain(middlewares, handler)
        self._base = base_data

    async def feed(self, update: Update) -> None:
        """Run one update through the chain. A bug is logged and the sender told, never
        re-raised: one bad event must not stop delivery or be retried forever. Only
        ``RetryLater`` goes back to the inbox, and ``LeaseLost`` (another replica has the room
        now) stops the lane."""
        try:
            await self._chain(update, EventData(**self._base))
        except (RetryLater, LeaseLost):
            raise
        except Exception:
            log.exception(
                "event.handler_crashed",
                room_id=update.room_id,
                event_id=update.event_id,
                kind=update.kind,
            )
            if update.kind == "message":
                await self._base["services"].try_reply(update, CRASHED, part="crashed")
