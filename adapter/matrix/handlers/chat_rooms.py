"""Chat rooms in a user's Space (SPEC §5), for ``!new`` and the invite bootstrap.

Creating one is idempotent per source event, across crashes: its chat id and title are
recorded first (``Creation``); the room is created, linked into the Space, and recorded
with its chat in one transaction. A replay that finds the creation unfinished looks for
the room among the bot's rooms the DB does not know (by its marker) before making one.
"""

from __future__ import annotations

import re
import time
from dataclasses import replace
from urllib.parse import quote, unquote

import structlog

from adapter.matrix.chain.context import Services
from adapter.matrix.healing.encryption import announce
from adapter.matrix.healing.room_state import (
    HealRefused,
    RoomSnapshot,
    trusted_marker,
    unreadable_room,
)
from adapter.matrix.store.records import Creation, RoomMeta
from adapter.matrix.vocabulary.markers import ChatMarker
from core.chat import Chat, new_chat_id

log = structlog.get_logger()

_MATRIX_TO = re.compile(r"https://matrix\.to/#/([^?\s\"<]+)")


def matrix_to(room_id: str, via: str) -> str:
    """A matrix.to link, percent-encoded, that works for people not yet in the room: version
    12 room ids name no server, so ``via`` says which one to ask."""
    return f"https://matrix.to/#/{quote(room_id, safe='')}?via={quote(via, safe='')}"


def linked_rooms(text: str) -> list[str]:
    """The room ids of the ``matrix_to`` links in a text, in order (what a client reads)."""
    return [unquote(encoded) for encoded in _MATRIX_TO.findall(text)]


async def create_chat(
    svc: Services,
    owner: str,
    space_id: str,
    title: str,
    source_event_id: str,
    *,
    adopt_orphan: bool = False,
) -> tuple[str, Chat]:
    """The chat room that ``source_event_id`` creates in the owner's Space: made once.

    ``adopt_orphan`` (a first chat): a room the bot made for the owner that no record knows
    (a crash between ``createRoom`` and the records, then a loss of the DB) is taken instead."""
    creation = await svc.store.get_created(source_event_id)
    if creation is not None and creation.room_id is not None:
        return creation.room_id, await svc.chats.get_or_create(
            owner, creation.chat_id, creation.title
        )
    orphan = None
    if creation is not None or adopt_orphan:
        orphan = await _find_unrecorded(
            svc, owner, space_id, creation.chat_id if creation else None
        )
    if orphan is not None:
        room_id, creation = orphan
    else:
        if creation is None:
            creation = Creation(new_chat_id(), title)
            await svc.store.set_created(source_event_id, creation)
        room_id = await svc.hs.create_chat_room(owner, space_id, creation.chat_id, creation.title)
    await svc.hs.link_child(space_id, room_id)
    # Its state says whether the homeserver encrypted it (then the bot cannot read it).
    snap = RoomSnapshot.from_events(room_id, await svc.hs.get_state(room_id))
    unreadable = unreadable_room(snap, "chat", owner)
    if unreadable is not None and await svc.store.get_encrypted(room_id) is not None:
        unreadable = None  # an adopted room, recorded and told before
    chat = Chat(creation.chat_id, owner, creation.title, "active", time.time())
    async with svc.store.transaction() as tx:
        await svc.store.set_room(room_id, RoomMeta("chat", owner, chat.chat_id, space_id), tx)
        svc.chats.restore(chat, tx)
        await svc.store.set_created(source_event_id, replace(creation, room_id=room_id), tx)
        if unreadable is not None:
            await svc.store.set_encrypted(room_id, unreadable, tx)
    log.info(
        "chat.created",
        room_id=room_id,
        chat_id=chat.chat_id,
        owner=owner,
        resumed=orphan is not None,
        encrypted=snap.encrypted,
    )
    if unreadable is not None:
        announce(room_id, unreadable, svc.metrics)
    return room_id, chat


async def _find_unrecorded(
    svc: Services, owner: str, space_id: str, chat_id: str | None
) -> tuple[str, Creation] | None:
    """An active chat room of the owner in this Space that the bot made but the DB does not
    know (``chat_id``: that one): a crash right after ``createRoom``, or its answer lost on
    the way. Reads the state of each unknown joined room, so it runs only when resuming."""
    known = {room_id for room_id, _ in await svc.store.rooms()}
    for room_id in await svc.hs.joined_rooms():
        if room_id in known:
            continue
        snap = RoomSnapshot.from_events(room_id, await svc.hs.get_state(room_id))
        if snap.creator != svc.bot_id or snap.parents(svc.bot_id) != [space_id]:
            continue
        try:
            found = trusted_marker(snap, ChatMarker, svc.bot_id)
        except HealRefused:
            continue  # a marker someone else wrote, or a malformed one: not this creation
        if (
            found is not None
            and found.owner == owner
            and found.status == "active"
            and chat_id in (None, found.chat_id)
        ):
            log.info("chat.creation_resumed", room_id=room_id, chat_id=found.chat_id)
            return room_id, Creation(found.chat_id, snap.name or "Chat")
    return None
