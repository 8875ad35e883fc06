"""The plain links of the chain: store faults, who may use the bot, routing and command
parsing, the owner check, the catch-up scope, and exactly once. (The bot's own events never
reach the chain: ``ingest`` drops them.)"""

from __future__ import annotations

import structlog

from adapter.matrix.chain.command_table import parse_command
from adapter.matrix.chain.context import EventData
from adapter.matrix.chain.dispatcher import Handler
from adapter.matrix.chain.notices import tell_store_down
from adapter.matrix.chain.router import ChatRoute, LobbyRoute, SpaceRoute
from adapter.matrix.homeserver.client import HomeserverError
from adapter.matrix.ingest.update import RetryLater, Update
from core.store import StoreRefused

log = structlog.get_logger()


async def store_faults(handler: Handler, update: Update, data: EventData) -> None:
    """The outermost link: a read or write the DB refuses (disk full, read-only, PostgreSQL
    down) is a fault of the machine, not of the update. The update stays in the inbox and is
    retried with backoff, so it is answered once the DB takes writes again."""
    try:
        await handler(update, data)
    except StoreRefused as fault:
        svc = data["services"]
        svc.health.store_refused(str(fault))
        log.error(
            "store.write_failed",
            during="handling",
            room_id=update.room_id,
            event_id=update.event_id,
            error=str(fault),
            remedy=fault.remedy,
        )
        route = data.get("route") or svc.router.last_known(update.room_id)
        await tell_store_down(svc, update, route)
        raise RetryLater(f"store: {fault}") from fault


async def allowed_users_only(handler: Handler, update: Update, data: EventData) -> None:
    """Only users ``LAMBDA_ALLOWED_USERS`` allows get anything from the bot: an invite from
    anyone else is rejected before anything is created, their messages are dropped unread."""
    svc = data["services"]
    if svc.access.allows(update.sender):
        await handler(update, data)
        return
    if update.kind == "invite":
        log.warning("invite.refused", room_id=update.room_id, sender=update.sender)
        try:
            await svc.hs.leave(update.room_id)  # leaving an invited room rejects the invite
        except HomeserverError as err:
            if err.transient:
                raise RetryLater(str(err), err.retry_after_ms) from err
            log.info("invite.reject_failed", room_id=update.room_id, error=str(err))
        return
    log.info(
        "event.ignored",
        reason="not_allowed",
        room_id=update.room_id,
        sender=update.sender,
        event_id=update.event_id,
    )


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
        log.info("event.ignored", reason="space_room", room_id=update.room_id, sender=update.sender)
        return
    if isinstance(route, ChatRoute | LobbyRoute) and update.sender != route.owner:
        log.info(
            "event.ignored",
            reason="not_owner",
            room_id=update.room_id,
            sender=update.sender,
            owner=route.owner,
        )
        return
    await handler(update, data)


async def catchup_in_chats_only(handler: Handler, update: Update, data: EventData) -> None:
    """After a start without a sync token, only chat rooms' unanswered messages are answered;
    elsewhere they stay history (SPEC §5)."""
    if update.catchup and not isinstance(data["route"], ChatRoute):
        log.info(
            "event.ignored",
            reason="catchup_outside_chat",
            room_id=update.room_id,
            event_id=update.event_id,
        )
        return
    await handler(update, data)


async def answered_once(handler: Handler, update: Update, data: EventData) -> None:
    """Exactly once from the room itself (SPEC §5): an update that an earlier attempt or run
    may have answered is done if the room holds the bot's answer naming it, whatever the
    homeserver remembers of transaction ids (a day, per device)."""
    if update.is_event and update.may_be_answered:
        try:
            answered = await data["services"].conversation.answered(update.room_id, update.event_id)
        except HomeserverError as err:
            if err.transient:
                raise RetryLater(str(err), err.retry_after_ms) from err
            answered = False  # the room cannot say: the transaction id is the fallback
            log.info(
                "answer.lookup_failed",
                room_id=update.room_id,
                event_id=update.event_id,
                error=str(err),
            )
        if answered:
            log.info(
                "event.already_answered",
                room_id=update.room_id,
                event_id=update.event_id,
                attempt=update.attempt,
            )
            return
    await handler(update, data)
