"""Invite bootstrap (SPEC §5): join, then one Space per user, never two."""

from __future__ import annotations

import structlog

from adapter.matrix.context import EventData, Services, Update
from adapter.matrix.handlers.commands import create_chat, matrix_to
from adapter.matrix.homeserver import HomeserverError
from adapter.matrix.store import RoomMeta, UserMeta

log = structlog.get_logger()

FIRST_CHAT_TITLE = "Chat 1"


async def handle_invite(update: Update, data: EventData) -> None:
    """``data["user"]`` is the inviter's Space as healed from the server (None: they have none)."""
    async with data["services"].bootstrap_locks[update.sender]:
        await _bootstrap(update, data)


async def _bootstrap(update: Update, data: EventData) -> None:
    svc, owner, lobby_id = data["services"], update.sender, update.room_id
    await svc.hs.join(lobby_id)
    # A concurrent invite of the same user may have made the Space while this one waited.
    user = data.get("user") or await svc.store.get_user(owner)
    if user is None:
        space_id = await svc.hs.create_space(owner)
        user = UserMeta(space_id=space_id, lobby_room_id=lobby_id)
        async with svc.store.db.transaction() as tx:
            await svc.store.set_room(space_id, RoomMeta("space", owner), tx)
            await svc.store.set_user(owner, user, tx)
        log.info("space.created", room_id=space_id, owner=owner)
        greeting = "Welcome to Lambda! I made you a Space"
    else:
        await _reinvite(svc, user.space_id, owner)
        if user.lobby_room_id is None:
            user = UserMeta(user.space_id, lobby_id)
            await svc.store.set_user(owner, user)
        greeting = "Welcome back! Your Space is"
    if await svc.store.get_room(lobby_id) is None:
        await svc.store.set_room(lobby_id, RoomMeta("lobby", owner))
    first = await _first_chat(svc, owner, user.space_id, update.event_id)
    await svc.reply(update,
                    f"{greeting} “Lambda”: {matrix_to(user.space_id)}\n"
                    f"Start chatting in {matrix_to(first)} — or send !help here.",
                    html=f'{greeting} <a href="{matrix_to(user.space_id)}">Lambda</a>. '
                         f'Start chatting in <a href="{matrix_to(first)}">your chat</a>, '
                         "or send <code>!help</code> here.")


async def _reinvite(svc: Services, room_id: str, owner: str) -> None:
    """Invite the owner back; "already in the room" (403) is the usual, harmless answer."""
    try:
        await svc.hs.invite(room_id, owner)
    except HomeserverError as err:
        (log.debug if err.status == "M_FORBIDDEN" else log.warning)(
            "room.reinvite_skipped", room_id=room_id, owner=owner, error=str(err))


async def _first_chat(svc: Services, owner: str, space_id: str, source_event_id: str) -> str:
    """An active chat room of the owner, created if they have none (also after a crash
    between creating the Space and its first chat)."""
    rooms = await svc.store.chat_rooms_of(owner)
    for chat in await svc.chats.list_active(owner):
        if chat.chat_id in rooms:
            await _reinvite(svc, rooms[chat.chat_id], owner)
            return rooms[chat.chat_id]
    room_id, _ = await create_chat(svc, owner, space_id, FIRST_CHAT_TITLE, source_event_id)
    return room_id

