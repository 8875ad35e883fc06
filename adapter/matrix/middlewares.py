"""The plain links of the chain: own echo, history, routing, owner check, command parsing."""

from __future__ import annotations

import structlog

from adapter.matrix.context import EventData, Update
from adapter.matrix.dispatcher import Handler
from adapter.matrix.handlers.commands import parse_command
from adapter.matrix.room_router import ChatRoute, LobbyRoute, SpaceRoute

log = structlog.get_logger()


async def ignore_own_events(handler: Handler, update: Update, data: EventData) -> None:
    if update.sender != data["services"].bot_id:
        await handler(update, data)


class SkipHistory:
    """Drops the timeline of a first sync without a token; counts what it skipped."""

    def __init__(self) -> None:
        self.skipped = 0

    async def __call__(self, handler: Handler, update: Update, data: EventData) -> None:
        if update.history:
            self.skipped += 1
            return
        await handler(update, data)


async def resolve_route(handler: Handler, update: Update, data: EventData) -> None:
    data["route"] = await data["services"].router.resolve(update.room_id)
    data["command"] = parse_command(update.body) if update.is_command else None
    await handler(update, data)


async def owner_only(handler: Handler, update: Update, data: EventData) -> None:
    """Only a room's owner is answered; a Space takes no messages at all."""
    route = data["route"]
    if update.kind == "invite":
        await handler(update, data)
        return
    if isinstance(route, SpaceRoute):
        log.info("event.ignored", reason="space_room", room_id=update.room_id,
                 sender=update.sender)
        return
    if isinstance(route, ChatRoute | LobbyRoute) and update.sender != route.owner:
        log.info("event.ignored", reason="not_owner", room_id=update.room_id,
                 sender=update.sender, owner=route.owner)
        return
    await handler(update, data)
