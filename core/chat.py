"""Chats: the core's record of a user's conversations, independent of Matrix."""

from __future__ import annotations

import secrets
import time
import unicodedata
from dataclasses import asdict, dataclass, replace
from typing import Literal

from core.store import Store, Transaction

ChatStatus = Literal["active", "archived"]
MAX_TITLE_LENGTH = 255


class ChatError(Exception):
    """Base class of chat errors; ``str()`` is safe to show to the user."""


class ChatNotFound(ChatError):
    def __init__(self, user_id: str, chat_id: str) -> None:
        super().__init__(f"chat {chat_id} of {user_id} not found")
        self.user_id = user_id
        self.chat_id = chat_id


class InvalidTitle(ChatError):
    """The title is empty, too long or holds control characters."""


@dataclass(frozen=True)
class Chat:
    chat_id: str
    user_id: str
    title: str
    status: ChatStatus
    created_at: float

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Chat:
        return cls(
            chat_id=data["chat_id"],
            user_id=data["user_id"],
            title=data["title"],
            status=data["status"],
            created_at=data["created_at"],
        )


def new_chat_id() -> str:
    """A random id: never a counter, which would collide after a local reset."""
    return secrets.token_hex(6)


# Characters a title may not hold: controls (newlines, NUL), lone surrogates, line and
# paragraph separators, and the bidi embeddings, overrides and isolates that reorder what
# follows them in a client's room list.
_FORBIDDEN_CATEGORIES = {"Cc", "Cs", "Zl", "Zp"}
_BIDI_CONTROLS = {chr(c) for c in [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]}


def forbidden_in_title(ch: str) -> bool:
    return unicodedata.category(ch) in _FORBIDDEN_CATEGORIES or ch in _BIDI_CONTROLS


def visible(ch: str) -> bool:
    """Not whitespace and not an invisible format character (zero-width space, joiners)."""
    return not ch.isspace() and unicodedata.category(ch) != "Cf"


def validate_title(title: str) -> str:
    """Return the stripped title or raise ``InvalidTitle`` with a user-facing reason."""
    title = title.strip()
    if not title:
        raise InvalidTitle("The title cannot be empty.")
    if not any(visible(ch) for ch in title):
        raise InvalidTitle("The title has no visible characters.")
    if len(title) > MAX_TITLE_LENGTH:
        raise InvalidTitle(
            f"The title is too long ({len(title)} characters, the limit is {MAX_TITLE_LENGTH})."
        )
    if any(forbidden_in_title(ch) for ch in title):
        raise InvalidTitle(
            "The title cannot contain control characters (such as newlines "
            "or text-direction overrides)."
        )
    return title


def chat_key(user_id: str, chat_id: str) -> str:
    return f"chat:{user_id}:{chat_id}"


class ChatManager:
    """Owns ``chat:{user_id}:{chat_id}`` records."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def get(self, user_id: str, chat_id: str) -> Chat:
        data = await self._store.get(chat_key(user_id, chat_id))
        if data is None:
            raise ChatNotFound(user_id, chat_id)
        return Chat.from_json(data)

    async def get_or_create(self, user_id: str, chat_id: str, title: str) -> Chat:
        """The chat with this id, created active with ``title`` if it does not exist."""
        try:
            return await self.get(user_id, chat_id)
        except ChatNotFound:
            chat = Chat(chat_id, user_id, validate_title(title), "active", time.time())
            await self._store.set(chat_key(user_id, chat_id), chat.to_json())
            return chat

    async def rename(self, user_id: str, chat_id: str, title: str) -> Chat:
        chat = replace(await self.get(user_id, chat_id), title=validate_title(title))
        await self._store.set(chat_key(user_id, chat_id), chat.to_json())
        return chat

    async def archive(self, user_id: str, chat_id: str) -> Chat:
        chat = replace(await self.get(user_id, chat_id), status="archived")
        await self._store.set(chat_key(user_id, chat_id), chat.to_json())
        return chat

    async def list_all(self, user_id: str) -> list[Chat]:
        rows = await self._store.scan(f"chat:{user_id}:")
        return sorted((Chat.from_json(v) for _, v in rows), key=lambda c: c.created_at)

    async def list_active(self, user_id: str) -> list[Chat]:
        return [c for c in await self.list_all(user_id) if c.status == "active"]

    def restore(self, chat: Chat, tx: Transaction) -> None:
        """Write ``chat`` exactly as given (idempotent); used by healing inside its transaction."""
        tx.set(chat_key(chat.user_id, chat.chat_id), chat.to_json())
