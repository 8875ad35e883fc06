"""The handlers at the end of the chain, chosen by the kind of update."""

from __future__ import annotations

import structlog

from adapter.matrix.chain.context import EventData
from adapter.matrix.chain.notices import postpone
from adapter.matrix.chain.router import LobbyRoute
from adapter.matrix.handlers.auth import complete_onboarding, handle_invite, onboarded
from adapter.matrix.handlers.commands import handle_command
from adapter.matrix.handlers.messages import (
    handle_encrypted,
    handle_missed,
    handle_room_name,
    handle_text,
)
from adapter.matrix.homeserver.client import HomeserverError
from adapter.matrix.ingest.update import Update

log = structlog.get_logger()

FAILED = "Sorry, the homeserver refused that just now. Please try again."
TOO_LARGE = (
    "Sorry, my answer is too large for the homeserver to carry (over its event size "
    "limit), so I can't send it. Please ask for something shorter."
)
WILL_RETRY = "The homeserver is not answering me just now. I'll retry and answer you then."


async def handle_update(update: Update, data: EventData) -> None:
    try:
        if update.kind == "invite":
            await handle_invite(update, data)
        elif update.kind == "room_name":
            await handle_room_name(update, data)
        elif update.kind == "missed":
            await handle_missed(update, data)
        elif isinstance(data["route"], LobbyRoute) and not await onboarded(update, data):
            # Its welcome answers a plain message, and an encrypted one (a lobby that its
            # owner's client encrypts): the bot does not need to read it to finish onboarding.
            await complete_onboarding(update, data)
            if data.get("command") is not None:
                await handle_command(update, data)
        elif update.kind == "encrypted":
            await handle_encrypted(update, data)
        elif data.get("command") is not None:
            await handle_command(update, data)
        else:
            await handle_text(update, data)
    except HomeserverError as err:
        log.warning(
            "handler.homeserver_error",
            room_id=update.room_id,
            kind=update.kind,
            event_id=update.event_id,
            error=str(err),
            will_retry=err.transient,
        )
        svc = data["services"]
        if not err.transient:  # refused for good: say so, and the update is done
            if update.kind != "invite":
                await svc.try_reply(
                    update, TOO_LARGE if err.status == "M_TOO_LARGE" else FAILED, part="failed"
                )
            return
        await postpone(update, err, svc, WILL_RETRY)
