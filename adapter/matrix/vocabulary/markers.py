"""The marker state events the bot writes in every room it creates (SPEC §5): whose Space or
chat the room is. Their event types and fields are spelled here only; ``room_state`` decides
whether a room's marker can be trusted."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Self, cast, get_args

from core.chat import ChatStatus

FORMAT_VERSION = 1  # written as ``v``; not read back yet (there is only one version)


class MalformedMarker(ValueError):
    """A marker's content does not hold what the bot writes there."""

    def __init__(self, event_type: str, field: str, value: object) -> None:
        super().__init__(f"{event_type}: {field} is {value!r}")


def _user_id(event_type: str, value: object) -> str:
    if isinstance(value, str) and value.startswith("@") and ":" in value:
        return value
    raise MalformedMarker(event_type, "owner", value)


class Marker:
    """What both markers share: a state event with an empty state key."""

    TYPE: ClassVar[str]
    STATE_KEY: ClassVar[str] = ""

    @classmethod
    def parse(cls, content: dict) -> Self | None:
        """None for empty content (a redacted marker counts as none); ``MalformedMarker`` if
        a field is missing or wrong."""
        return cls._from_content(content) if content else None

    @classmethod
    def _from_content(cls, content: dict) -> Self:
        raise NotImplementedError

    def content(self) -> dict[str, Any]:
        raise NotImplementedError

    def state_event(self) -> dict[str, Any]:
        """The marker as an ``initial_state`` entry of createRoom."""
        return {"type": self.TYPE, "state_key": self.STATE_KEY, "content": self.content()}


@dataclass(frozen=True)
class SpaceMarker(Marker):
    """``io.lambda.space`` in a Space: its owner."""

    TYPE: ClassVar[str] = "io.lambda.space"
    owner: str

    @classmethod
    def _from_content(cls, content: dict) -> SpaceMarker:
        return cls(_user_id(cls.TYPE, content.get("owner")))

    def content(self) -> dict[str, Any]:
        return {"owner": self.owner, "v": FORMAT_VERSION}


@dataclass(frozen=True)
class ChatMarker(Marker):
    """``io.lambda.chat`` in a chat room: its owner, chat id and status."""

    TYPE: ClassVar[str] = "io.lambda.chat"
    owner: str
    chat_id: str
    status: ChatStatus

    @classmethod
    def _from_content(cls, content: dict) -> ChatMarker:
        owner = _user_id(cls.TYPE, content.get("owner"))
        chat_id, status = content.get("chat_id"), content.get("status")
        if not (isinstance(chat_id, str) and chat_id):
            raise MalformedMarker(cls.TYPE, "chat_id", chat_id)
        if status not in get_args(ChatStatus):
            raise MalformedMarker(cls.TYPE, "status", status)
        return cls(owner, chat_id, cast(ChatStatus, status))  # checked just above

    def content(self) -> dict[str, Any]:
        return {
            "owner": self.owner,
            "chat_id": self.chat_id,
            "status": self.status,
            "v": FORMAT_VERSION,
        }
