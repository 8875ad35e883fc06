"""Rooms the bot made that the homeserver encrypted (Synapse's
``encryption_enabled_by_default_for_room_type``). The bot does not do end-to-end encryption, so
it cannot read them: the operator is told once per room (an error line, and a metric), the
owner is told the truth (what is written here, once), and no more rooms are made for an owner
while the last one came back encrypted (``room_state.encryption_hold``)."""

from __future__ import annotations

import structlog

from adapter.matrix.healing.room_state import encryption_hold
from adapter.matrix.ingest.update import Update
from adapter.matrix.observe.metrics import Metrics
from adapter.matrix.store.records import EncryptedRoom, MatrixStore, active_chat_rooms
from core.chat import ChatManager

log = structlog.get_logger()

SETTING = "encryption_enabled_by_default_for_room_type"
# The bot creates every room with the private_chat preset: Synapse encrypts it for `invite`
# (private presets) and `all`; only `off` (Synapse's default) leaves it readable.
REMEDY = (
    f"set {SETTING}: off in Synapse's config (its default; `invite` and `all` both encrypt the "
    "rooms this bot creates, which use the private_chat preset) and restart Synapse: this bot "
    "does not do end-to-end encryption, so it cannot read an encrypted room. Rooms already "
    "encrypted stay encrypted; after the change, the owner's next invite or lobby message gets "
    "them a readable chat room"
)

CANNOT_READ = "I can't read encrypted rooms (I don't do end-to-end encryption)"
ADMIN_CAN_FIX = (
    f"The homeserver's admin can change that: in Synapse, set {SETTING} to off, and restart "
    "it. Then write to me {where}, or invite me again, and I'll make you a chat room I can read."
)
SPACE_ENCRYPTED = (
    "Welcome to Lambda! I made you a Space, “Lambda”: {space_link}\n"
    f"But this homeserver encrypts every room I create, and {CANNOT_READ}, so I haven't made "
    "you a chat room: I could not read what you write there."
)
CHAT_ENCRYPTED = (
    "I made you a chat room, “{title}”: {chat_link}\n"
    f"But the homeserver encrypted it, and {CANNOT_READ}, so I can't chat with you there."
)
NEW_HELD = (
    f"I can't make you a new chat room: this homeserver encrypts the rooms I create, and "
    f"{CANNOT_READ}."
)
ROOM_ENCRYPTED = (
    "I can't read this room: the homeserver encrypted it when I created it, and I don't do "
    "end-to-end encryption, so I can't see your messages here (it stays encrypted)."
)
CANNOT_READ_MESSAGES = "I can't read encrypted messages (I don't do end-to-end encryption)."
WRITE_IN_CHAT = " Please write to me in your chat room “{title}”: {chat_link}"
WITHOUT_ENCRYPTION = " Please write to me in a room without encryption."


def retries(hold: tuple[str, EncryptedRoom], update: Update) -> bool:
    """Whether an invite or a lobby message tries once more to make a chat room for an owner
    held back: a new invite, or a message sent after the room that holds them was made. An
    update that may have made that room (a replay, a retry) or came before it builds nothing."""
    if update.may_be_answered:
        return False
    return update.ts == 0 or update.ts > hold[1].created_at * 1000  # an invite has no ts


def admin_can_fix(in_lobby: bool) -> str:
    return ADMIN_CAN_FIX.format(where="here" if in_lobby else "in your lobby")


def announce(room_id: str, record: EncryptedRoom, metrics: Metrics) -> None:
    """The operator's line, once per room (when the DB first records it), and the metric."""
    log.error(
        "room.encrypted_by_server",
        room_id=room_id,
        owner=record.owner,
        kind=record.kind,
        remedy=REMEDY,
    )
    metrics.encrypted_rooms.labels(kind=record.kind).inc()


async def holding_room(
    store: MatrixStore, chats: ChatManager, owner: str
) -> tuple[str, EncryptedRoom] | None:
    """The encrypted room that holds back room creation for ``owner`` (None: not held)."""
    encrypted = await store.encrypted_rooms_of(owner)
    if not encrypted:
        return None
    unreadable = {room_id for room_id, _ in encrypted}
    rooms = await store.chat_rooms_of(owner)
    made = [
        chat.created_at
        for chat in await chats.list_all(owner)
        if chat.chat_id in rooms and rooms[chat.chat_id] not in unreadable
    ]
    return encryption_hold(encrypted, made)


async def readable_active_chats(
    store: MatrixStore, chats: ChatManager, owner: str
) -> dict[str, str]:
    """chat_id -> room_id of the owner's active chats whose rooms are not encrypted."""
    active = await active_chat_rooms(store, chats, owner)
    if not active:
        return active
    unreadable = {room_id for room_id, _ in await store.encrypted_rooms_of(owner)}
    return {chat_id: room_id for chat_id, room_id in active.items() if room_id not in unreadable}
