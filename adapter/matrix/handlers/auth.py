"""Onboarding (SPEC §5): join on invite, then one Space per user, never two, with a usable
first chat. Every step is safe to run again, so a crash at any point is completed by the
replayed invite (it stays in the inbox until handled), or by the user's next message in
the lobby."""

from __future__ import annotations

from contextlib import suppress

import structlog

from adapter.matrix.chain.context import EventData, Services
from adapter.matrix.handlers.chat_rooms import create_chat, matrix_to
from adapter.matrix.healing.encryption import (
    CHAT_ENCRYPTED,
    SPACE_ENCRYPTED,
    admin_can_fix,
    announce,
    holding_room,
    readable_active_chats,
    retries,
)
from adapter.matrix.healing.room_state import RoomSnapshot, unreadable_room
from adapter.matrix.homeserver.client import HomeserverError
from adapter.matrix.ingest.update import Update
from adapter.matrix.store.records import EncryptedRoom, RoomMeta, UserMeta, knows_a_chat
from core.chat import ChatNotFound

log = structlog.get_logger()

FIRST_CHAT_TITLE = "Chat 1"


async def handle_invite(update: Update, data: EventData) -> None:
    """``data["user"]`` is the inviter's Space as healed from the server (None: they have none)."""
    async with data["services"].one_at_a_time(update.sender):
        await data["services"].hs.join(update.room_id)
        await _onboard(update, data)


async def onboarded(update: Update, data: EventData) -> bool:
    """Whether the sender has a Space with a chat room, active or archived (the healing link
    has looked on the server when the DB knew none), and the last room made for them did not
    come back encrypted (then their next lobby message tries again)."""
    svc = data["services"]
    return (
        data.get("user") is not None
        and await knows_a_chat(svc.store, svc.chats, update.sender)
        and await holding_room(svc.store, svc.chats, update.sender) is None
    )


async def complete_onboarding(update: Update, data: EventData) -> None:
    """A message in the lobby from a user whose onboarding was cut short: finish it."""
    log.info(
        "onboarding.resumed",
        room_id=update.room_id,
        owner=update.sender,
        has_space=data.get("user") is not None,
    )
    async with data["services"].one_at_a_time(update.sender):
        await _onboard(update, data)


async def _onboard(update: Update, data: EventData) -> None:
    svc, owner, lobby_id = data["services"], update.sender, update.room_id
    # A concurrent invite of the same user may have made the Space while this one waited.
    user = data.get("user") or await svc.store.get_user(owner)
    new_space = user is None
    if user is None:
        space_id = await svc.hs.create_space(owner)
        # Its state says whether the homeserver encrypts the rooms the bot makes.
        snap = RoomSnapshot.from_events(space_id, await svc.hs.get_state(space_id))
        unreadable = unreadable_room(snap, "space", owner)
        user = UserMeta(space_id=space_id, lobby_room_id=lobby_id)
        async with svc.store.transaction() as tx:
            await svc.store.set_room(space_id, RoomMeta("space", owner), tx)
            await svc.store.set_user(owner, user, tx)
            if unreadable is not None:
                await svc.store.set_encrypted(space_id, unreadable, tx)
        log.info("space.created", room_id=space_id, owner=owner, encrypted=snap.encrypted)
        if unreadable is not None:
            announce(space_id, unreadable, svc.metrics)
        greeting = "Welcome to Lambda! I made you a Space"
    else:
        await _reinvite(svc, user.space_id, owner)
        if user.lobby_room_id is None:
            user = UserMeta(user.space_id, lobby_id)
            await svc.store.set_user(owner, user)
        greeting = None
    data["user"] = user
    if await svc.store.get_room(lobby_id) is None:
        await svc.store.set_room(lobby_id, RoomMeta("lobby", owner))
    hold = await holding_room(svc.store, svc.chats, owner)
    if hold is not None:
        # This update made (or came before) the room that came back encrypted: build no more.
        # A later one tries once more, within the creation throttle (a user writing again and
        # again while the homeserver still encrypts makes a few rooms a minute at most).
        if new_space or not retries(hold, update) or _throttled(svc, owner, update):
            await _tell_held(update, data, *hold)
            return
        svc.access.record_creation(owner)
    first, made_now = await _first_chat(
        svc, owner, user.space_id, update.event_id, new_space, retry=hold is not None
    )
    if made_now and (unreadable := await svc.store.get_encrypted(first)) is not None:
        await _tell_held(update, data, first, unreadable)
        return
    # A Space found with no chat in it: maybe a returning user, maybe onboarding cut short.
    greeting = greeting or ("Welcome! Your Space is" if made_now else "Welcome back! Your Space is")
    space_link, chat_link = (matrix_to(room, svc.hs.server_name) for room in (user.space_id, first))
    await svc.reply(
        update,
        f"{greeting} “Lambda”: {space_link}\nStart chatting in {chat_link} — or send !help here.",
        html=f'{greeting} <a href="{space_link}">Lambda</a>. '
        f'Start chatting in <a href="{chat_link}">your chat</a>, '
        "or send <code>!help</code> here.",
        part="welcome",
        # A lobby command still runs after it: the welcome is not its answer.
        provisional=data.get("command") is not None,
    )


def _throttled(svc: Services, owner: str, update: Update) -> bool:
    """Whether the creation throttle stops a retry now (the chat limit does not: this is the
    chat room that onboarding owes the owner)."""
    refusal = svc.access.creation_refused(owner, 0)
    if refusal is not None:
        log.info("onboarding.retry_throttled", room_id=update.room_id, owner=owner)
    return refusal is not None


async def _tell_held(
    update: Update, data: EventData, room_id: str, unreadable: EncryptedRoom
) -> None:
    """Tell the owner, in the lobby, that the room made for them came back encrypted."""
    svc = data["services"]
    if unreadable.kind == "space":
        told = SPACE_ENCRYPTED.format(space_link=matrix_to(room_id, svc.hs.server_name))
    else:
        meta = await svc.store.get_room(room_id)
        title = "Chat"
        if meta is not None and meta.chat_id is not None:
            with suppress(ChatNotFound):
                title = (await svc.chats.get(meta.owner, meta.chat_id)).title
        told = CHAT_ENCRYPTED.format(title=title, chat_link=matrix_to(room_id, svc.hs.server_name))
    await svc.reply(
        update,
        f"{told}\n{admin_can_fix(in_lobby=True)}",
        part="welcome",
        provisional=data.get("command") is not None,
    )


async def _reinvite(svc: Services, room_id: str, owner: str) -> None:
    """Invite the owner back; "already in the room" (403) is the usual, harmless answer."""
    try:
        await svc.hs.invite(room_id, owner)
    except HomeserverError as err:
        (log.debug if err.status == "M_FORBIDDEN" else log.warning)(
            "room.reinvite_skipped", room_id=room_id, owner=owner, error=str(err)
        )


async def _first_chat(
    svc: Services,
    owner: str,
    space_id: str,
    source_event_id: str,
    new_space: bool,
    retry: bool = False,
) -> tuple[str, bool]:
    """An active chat room of the owner that the bot can read, created if they have none (also
    after a crash between creating the Space and its first chat), or if ``retry`` (the last
    room made for them came back encrypted); and whether it was made now."""
    readable = await readable_active_chats(svc.store, svc.chats, owner)
    room_id = next(iter(readable.values()), None)
    if room_id is not None and not retry:
        await _reinvite(svc, room_id, owner)
        return room_id, False
    # No chat at all: a crash may have left one unrecorded, and a loss of the DB its intent.
    # Not in a Space made just now: no room names it as parent yet, and looking reads the
    # state of every room the DB does not know (all of them, after a total loss).
    adopt = not new_space and not await knows_a_chat(svc.store, svc.chats, owner)
    made = len(await svc.chats.list_all(owner))
    title = f"Chat {made + 1}" if made else FIRST_CHAT_TITLE
    room_id, _ = await create_chat(svc, owner, space_id, title, source_event_id, adopt_orphan=adopt)
    return room_id, True
