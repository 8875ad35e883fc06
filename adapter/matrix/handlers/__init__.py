"""The handlers at the end of the chain, chosen by the kind of update."""

from __future__ import annotations

import structlog

from adapter.matrix.context import EventData, Update
from adapter.matrix.handlers.auth import handle_invite
from adapter.matrix.handlers.commands import handle_command
from adapter.matrix.handlers.messages import handle_encrypted, handle_room_name, handle_text
from adapter.matrix.homeserver import HomeserverError

log = structlog.get_logger()

FAILED = "Sorry, the homeserver refused or did not answer that just now. Please try again."
RATE_LIMITED = "Sorry, the homeserver is rate-limiting me. Please try again in {s} s."


async def handle_update(update: Update, data: EventData) -> None:
    try:
        if update.kind == "invite":
            await handle_invite(update, data)
        elif update.kind == "room_name":
            await handle_room_name(update, data)
        elif update.kind == "encrypted":
            await handle_encrypted(update, data)
        elif data.get("command") is not None:
            await handle_command(update, data)
        else:
            await handle_text(update, data)
    except HomeserverError as err:
        log.warning("handler.homeserver_error", room_id=update.room_id, kind=update.kind,
                    event_id=update.event_id, error=str(err))
        if update.kind != "invite":
            text = (RATE_LIMITED.format(s=max(1, round(err.retry_after_ms / 1000)))
                    if err.retry_after_ms else FAILED)
            await data["services"].try_reply(update, text, part="failed")
