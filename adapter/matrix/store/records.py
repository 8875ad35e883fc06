"""Matrix metadata records in the local cache (SPEC §4), typed and serialised here only."""

from __future__ import annotations

import time
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict, dataclass
from typing import Any, Literal

from core.chat import ChatManager
from core.store import Birth, Store, Transaction

RoomKind = Literal["space", "chat", "lobby"]
SYNC_TOKEN_KEY = "sync_token"
# Appservice mode: when this DB's catch-up was recorded (a start without it catches up, like a
# start without a sync token: first start, total loss, or an account that synced before).
APPSERVICE_KEY = "appservice_caught_up"


@dataclass(frozen=True)
class UserMeta:
    space_id: str
    lobby_room_id: str | None = None


@dataclass(frozen=True)
class RoomMeta:
    kind: RoomKind
    owner: str
    chat_id: str | None = None
    space_id: str | None = None


@dataclass(frozen=True)
class CaughtUp:
    """Appservice mode: the start's catch-up was recorded at ``at`` (Unix seconds), and read
    back ``rooms`` (every replica marks the events pushed there before then as replayed)."""

    at: float
    rooms: tuple[str, ...] = ()


@dataclass(frozen=True)
class Creation:
    """A chat room an event creates: its id and title are chosen (and recorded) before the
    room exists, so a replay after a crash finds the room instead of making a second one."""

    chat_id: str
    title: str
    room_id: str | None = None  # None until the room is created, linked and recorded


@dataclass(frozen=True)
class EncryptedRoom:
    """A room the bot made for ``owner`` that the homeserver encrypted: the bot, which does not
    do end-to-end encryption, cannot read it. Recorded when first seen (the operator's error
    line is logged then, once); ``created_at`` is the room's creation (``m.room.create``), which
    orders it among the owner's rooms; ``user_told``: the owner was told so in the room."""

    owner: str
    kind: RoomKind
    created_at: float
    user_told: bool = False


@dataclass(frozen=True)
class Pending:
    action: Literal["archive"]
    chat_id: str
    expires_at: float

    @property
    def expired(self) -> bool:
        return time.time() >= self.expires_at


def _strip_none(record: Any) -> dict:
    return {k: v for k, v in asdict(record).items() if v is not None}


class MatrixStore:
    """Typed accessors over ``matrix_user:*``, ``matrix_room:*``, ``pending:*``,
    ``encrypted_room:*`` and the sync token
    (written only by the inbox, with the updates of its round).

    Writers take an optional transaction: with one they buffer, without one they write now.
    """

    def __init__(self, store: Store) -> None:
        self.db = store

    async def _write(self, key: str, value: Any | None, tx: Transaction | None) -> None:
        if tx is not None:
            tx.set(key, value) if value is not None else tx.delete(key)
        elif value is None:
            await self.db.delete(key)
        else:
            await self.db.set(key, value)

    def transaction(self) -> AbstractAsyncContextManager[Transaction]:
        """Several records written at once (the writers below take it as ``tx``)."""
        return self.db.transaction()

    @property
    def where(self) -> str:
        """The store as messages name it (the file, or the URL without its password)."""
        return self.db.where

    @property
    def birth(self) -> Birth | None:
        """When and why the DB file was created (None: older than birth records)."""
        return self.db.birth

    async def get_user(self, user_id: str) -> UserMeta | None:
        data = await self.db.get(f"matrix_user:{user_id}")
        return UserMeta(**data) if data else None

    async def set_user(self, user_id: str, meta: UserMeta, tx: Transaction | None = None) -> None:
        await self._write(f"matrix_user:{user_id}", asdict(meta), tx)

    async def get_room(self, room_id: str) -> RoomMeta | None:
        data = await self.db.get(f"matrix_room:{room_id}")
        return RoomMeta(**data) if data else None

    async def set_room(self, room_id: str, meta: RoomMeta, tx: Transaction | None = None) -> None:
        await self._write(f"matrix_room:{room_id}", _strip_none(meta), tx)

    async def rooms(self) -> list[tuple[str, RoomMeta]]:
        rows = await self.db.scan("matrix_room:")
        return [(key.removeprefix("matrix_room:"), RoomMeta(**v)) for key, v in rows]

    async def rooms_of(self, owner: str, kind: RoomKind) -> list[tuple[str, RoomMeta]]:
        return [(rid, m) for rid, m in await self.rooms() if m.owner == owner and m.kind == kind]

    async def chat_rooms_of(self, owner: str) -> dict[str, str]:
        """chat_id -> room_id of the owner's chat rooms."""
        return {m.chat_id: rid for rid, m in await self.rooms_of(owner, "chat") if m.chat_id}

    async def get_pending(self, room_id: str) -> Pending | None:
        data = await self.db.get(f"pending:{room_id}")
        return Pending(**data) if data else None

    async def set_pending(self, room_id: str, pending: Pending | None) -> None:
        await self._write(f"pending:{room_id}", asdict(pending) if pending else None, None)

    async def get_created(self, source_event_id: str) -> Creation | None:
        """What the chat room that an event creates is (to be): see ``chat_rooms``."""
        data = await self.db.get(f"created_by:{source_event_id}")
        return (
            Creation(data["chat_id"], data.get("title", "Chat"), data.get("room_id"))
            if data
            else None
        )

    async def set_created(
        self, source_event_id: str, creation: Creation, tx: Transaction | None = None
    ) -> None:
        await self._write(f"created_by:{source_event_id}", _strip_none(creation), tx)

    async def get_encrypted(self, room_id: str) -> EncryptedRoom | None:
        data = await self.db.get(f"encrypted_room:{room_id}")
        return EncryptedRoom(**data) if data else None

    async def set_encrypted(
        self, room_id: str, record: EncryptedRoom, tx: Transaction | None = None
    ) -> None:
        await self._write(f"encrypted_room:{room_id}", asdict(record), tx)

    async def encrypted_rooms_of(self, owner: str) -> list[tuple[str, EncryptedRoom]]:
        """The owner's rooms that the homeserver encrypted (usually none: one short scan)."""
        rows = await self.db.scan("encrypted_room:")
        found = [(key.removeprefix("encrypted_room:"), EncryptedRoom(**v)) for key, v in rows]
        return [(room_id, record) for room_id, record in found if record.owner == owner]

    async def get_creations(self, user_id: str) -> list[float]:
        """With replicas: when the user's latest rooms were created (Unix seconds), so that
        the creation throttle holds for the deployment."""
        return list(await self.db.get(f"creations:{user_id}") or [])

    async def set_creations(self, user_id: str, stamps: list[float]) -> None:
        await self._write(f"creations:{user_id}", stamps or None, None)

    async def get_sync_token(self) -> str | None:
        return await self.db.get(SYNC_TOKEN_KEY)

    async def appservice_caught_up(self) -> CaughtUp | None:
        """When this DB's appservice catch-up was recorded; None: it has not been."""
        data = await self.db.get(APPSERVICE_KEY)
        if data is None:
            return None
        data = data if isinstance(data, dict) else {}
        return CaughtUp(float(data.get("at", 0.0)), tuple(data.get("rooms", ())))

    async def mark_appservice_caught_up(self, rooms: set[str]) -> CaughtUp:
        """The appservice's catch-up is recorded, ``rooms`` read back. The sync token goes: the
        events pushed since are not in it, so a move back to syncing starts without one (and
        catches up)."""
        done = CaughtUp(time.time(), tuple(sorted(rooms)))
        async with self.db.transaction() as tx:
            tx.set(APPSERVICE_KEY, asdict(done))
            tx.delete(SYNC_TOKEN_KEY)
        return done


async def active_chat_rooms(store: MatrixStore, chats: ChatManager, owner: str) -> dict[str, str]:
    """chat_id -> room_id of the owner's active chats that have a room, oldest first."""
    rooms = await store.chat_rooms_of(owner)
    return {
        c.chat_id: rooms[c.chat_id] for c in await chats.list_active(owner) if c.chat_id in rooms
    }


async def knows_a_chat(store: MatrixStore, chats: ChatManager, owner: str) -> bool:
    """Whether the DB knows any chat (room) of the owner, active or archived. The owner's
    chat records are one key range; only without them (a partial loss, or no chat at all)
    are the room records scanned."""
    return bool(await chats.list_all(owner) or await store.chat_rooms_of(owner))
