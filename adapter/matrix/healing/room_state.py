"""What a room's server state says about it: a pure decision, no I/O (SPEC §6).

``assess_room`` turns a room's state events (and its parent Space's, for rooms made
before markers existed) into the records they imply, or raises ``HealRefused``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from adapter.matrix.store.records import EncryptedRoom, RoomKind, RoomMeta, UserMeta
from adapter.matrix.vocabulary.content import SPACE_TYPE
from adapter.matrix.vocabulary.markers import ChatMarker, MalformedMarker, Marker, SpaceMarker
from core.chat import Chat
from core.store import Birth

M = TypeVar("M", SpaceMarker, ChatMarker)

_PRESENT = ("join", "invite")

HealSource = Literal["marker", "legacy"]
HealCause = Literal["local_reset", "store_missing", "inconsistent"]

# Reason code -> what the user is told. Written once, here.
REFUSALS: dict[str, str] = {
    "shared_room": "This room was not created by me and has other members, so I can't treat "
    "it as your chat. Invite me to a room of your own, or use your Lambda Space.",
    "forged_marker": "This room carries Lambda settings that I did not write, so I can't use it.",
    "malformed_marker": "This room's Lambda settings are damaged, so I can't use it.",
    "foreign_parent": "This room belongs to a Space that is not yours, so I can't use it.",
    "ambiguous_parent": "This room is linked to several Spaces, so I can't tell whose chat it is.",
    "missing_parent": "This room is not linked to a Lambda Space, so I can't tell whose chat "
    "it is.",
    "no_single_owner": "I can't tell whose chat this room is (it needs exactly one member "
    "besides me).",
    "unexpected_members": "This room has members it should not have, so I can't use it as a chat.",
    "unknown_room": "I can't read this room's state, so I can't use it.",
}


class HealRefused(Exception):
    """The room cannot be trusted or understood; nothing is written."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    @property
    def user_message(self) -> str:
        return REFUSALS.get(self.reason, "I can't use this room.")


@dataclass(frozen=True)
class StateEvent:
    type: str
    state_key: str
    sender: str
    content: dict
    ts: int = 0


@dataclass(frozen=True)
class RoomSnapshot:
    """The parts of a room's state that healing reads."""

    room_id: str
    events: dict[tuple[str, str], StateEvent] = field(default_factory=dict)

    @classmethod
    def from_events(cls, room_id: str, events: list[dict]) -> RoomSnapshot:
        parsed = {}
        for raw in events:
            if not isinstance(raw, dict) or "state_key" not in raw:
                continue
            content = raw.get("content")
            ev = StateEvent(
                str(raw.get("type", "")),
                str(raw["state_key"]),
                str(raw.get("sender", "")),
                content if isinstance(content, dict) else {},
                int(raw.get("origin_server_ts") or 0),
            )
            parsed[(ev.type, ev.state_key)] = ev
        return cls(room_id, parsed)

    def get(self, event_type: str, state_key: str = "") -> StateEvent | None:
        return self.events.get((event_type, state_key))

    def of_type(self, event_type: str) -> list[StateEvent]:
        return [ev for (t, _), ev in self.events.items() if t == event_type]

    @property
    def creator(self) -> str | None:
        create = self.get("m.room.create")
        return create.sender if create else None

    @property
    def created_at(self) -> float:
        create = self.get("m.room.create")
        return create.ts / 1000 if create else 0.0

    @property
    def is_space(self) -> bool:
        create = self.get("m.room.create")
        return bool(create and create.content.get("type") == SPACE_TYPE)

    @property
    def encrypted(self) -> bool:
        """Whether the room is end-to-end encrypted (``m.room.encryption`` names an algorithm):
        the bot, which does not do end-to-end encryption, cannot read its messages."""
        ev = self.get("m.room.encryption")
        return bool(ev and ev.content.get("algorithm"))

    @property
    def name(self) -> str | None:
        ev = self.get("m.room.name")
        name = ev.content.get("name") if ev else None
        return name.strip() if isinstance(name, str) and name.strip() else None

    def members(self, bot_id: str) -> list[str]:
        """Non-bot users who are joined or invited."""
        return sorted(
            ev.state_key
            for ev in self.of_type("m.room.member")
            if ev.state_key != bot_id and ev.content.get("membership") in _PRESENT
        )

    def parents(self, bot_id: str) -> list[str]:
        return sorted(
            ev.state_key
            for ev in self.of_type("m.space.parent")
            if ev.sender == bot_id and ev.content
        )

    def children(self, bot_id: str, former: bool = False) -> list[str]:
        """The Space's children linked by the bot; with ``former``, also those it unlinked
        (archived chats: an unlinked child keeps an ``m.space.child`` with empty content)."""
        return sorted(
            ev.state_key
            for ev in self.of_type("m.space.child")
            if ev.sender == bot_id and (former or ev.content)
        )


@dataclass(frozen=True)
class HealPlan:
    """The records a room's state implies."""

    room_id: str
    room: RoomMeta
    source: HealSource
    chat: Chat | None = None
    user: UserMeta | None = None  # the owner's Space, when the state proves it
    # A room the bot made (a Space or a chat) that the homeserver encrypted: the bot cannot
    # read it. None for a readable room, and for a lobby (the user's room, not the bot's).
    unreadable: EncryptedRoom | None = None


def unreadable_room(snap: RoomSnapshot, kind: RoomKind, owner: str) -> EncryptedRoom | None:
    """The record of a room the bot made for ``owner`` whose state has encryption on (a
    homeserver's ``encryption_enabled_by_default_for_room_type``); None when it is readable."""
    return EncryptedRoom(owner, kind, snap.created_at) if snap.encrypted else None


def encryption_hold(
    encrypted: Iterable[tuple[str, EncryptedRoom]], readable_chats_made_at: Iterable[float]
) -> tuple[str, EncryptedRoom] | None:
    """The room that holds back room creation for its owner: the latest room the bot made for
    them, if the homeserver encrypted it and no readable chat room was made after it. The bot
    makes no more rooms a homeserver encrypts, until one comes back readable. None: not held."""
    latest = max(encrypted, key=lambda found: found[1].created_at, default=None)
    if latest is None or any(at > latest[1].created_at for at in readable_chats_made_at):
        return None
    return latest


def heal_cause(birth: Birth | None, created_at: float = 0.0, held: bool = False) -> HealCause:
    """SPEC §6: the DB's birth cause for a room older than the DB that it holds nothing of;
    else ``inconsistent`` (the DB should have known the room). ``created_at`` 0 (the room's
    state not read yet) counts as older."""
    if held or birth is None or created_at >= birth.at:
        return "inconsistent"
    return birth.cause


def legacy_chat_id(room_id: str) -> str:
    """Deterministic, so repeated resets converge on the same id for a marker-less room."""
    return "r" + hashlib.sha256(room_id.encode()).hexdigest()[:11]


def parent_to_verify(snap: RoomSnapshot, bot_id: str) -> str | None:
    """The Space whose state ``assess_room`` needs: only for a bot-made chat without marker."""
    if snap.creator != bot_id or snap.is_space or _marker_event(snap, ChatMarker, bot_id):
        return None
    parents = snap.parents(bot_id)
    return parents[0] if len(parents) == 1 else None


def _marker_event(snap: RoomSnapshot, marker: type[Marker], bot_id: str) -> StateEvent | None:
    """The marker's event if the bot wrote it; None if absent or emptied (redacted)."""
    ev = snap.get(marker.TYPE, marker.STATE_KEY)
    if ev is None or not ev.content:
        return None
    if ev.sender != bot_id:
        raise HealRefused("forged_marker")
    return ev


def trusted_marker(snap: RoomSnapshot, marker: type[M], bot_id: str) -> M | None:
    """The room's marker of this kind if the bot wrote it; None if absent or emptied
    (redacted). ``HealRefused`` if someone else wrote it, or its content is malformed."""
    ev = _marker_event(snap, marker, bot_id)
    if ev is None:
        return None
    try:
        return marker.parse(ev.content)
    except MalformedMarker as err:
        raise HealRefused("malformed_marker") from err


def space_owner(snap: RoomSnapshot, bot_id: str) -> tuple[str, HealSource]:
    """The owner of a bot-made Space, from its marker or (legacy) its single member."""
    if snap.creator != bot_id or not snap.is_space:
        raise HealRefused("foreign_parent")
    marker = trusted_marker(snap, SpaceMarker, bot_id)
    if marker is not None:
        if any(m != marker.owner for m in snap.members(bot_id)):
            raise HealRefused("unexpected_members")
        return marker.owner, "marker"
    members = snap.members(bot_id)
    if len(members) != 1:
        raise HealRefused("no_single_owner")
    return members[0], "legacy"


def assess_room(snap: RoomSnapshot, bot_id: str, parent: RoomSnapshot | None = None) -> HealPlan:
    """Decide what ``snap`` is. ``parent`` is the state of ``parent_to_verify(snap)``."""
    if snap.creator is None:
        raise HealRefused("unknown_room")
    if snap.creator != bot_id:
        return _assess_lobby(snap, bot_id)
    if snap.is_space:
        owner, source = space_owner(snap, bot_id)
        return HealPlan(
            snap.room_id,
            RoomMeta("space", owner),
            source,
            user=UserMeta(space_id=snap.room_id),
            unreadable=unreadable_room(snap, "space", owner),
        )
    marker = trusted_marker(snap, ChatMarker, bot_id)
    if marker is not None:
        return _assess_marked_chat(snap, bot_id, marker)
    return _assess_legacy_chat(snap, bot_id, parent)


def _assess_lobby(snap: RoomSnapshot, bot_id: str) -> HealPlan:
    # Whatever state a room the bot did not create carries, it is at most a lobby:
    # commands there act only on the sender's own Space.
    members = snap.members(bot_id)
    if len(members) != 1:
        raise HealRefused("shared_room")
    return HealPlan(snap.room_id, RoomMeta("lobby", members[0]), "legacy")


def _assess_marked_chat(snap: RoomSnapshot, bot_id: str, marker: ChatMarker) -> HealPlan:
    owner, chat_id = marker.owner, marker.chat_id
    if any(m != owner for m in snap.members(bot_id)):
        raise HealRefused("unexpected_members")
    parents = snap.parents(bot_id)
    if len(parents) > 1:
        raise HealRefused("ambiguous_parent")
    space_id = parents[0] if parents else None
    chat = Chat(chat_id, owner, snap.name or "Chat", marker.status, snap.created_at)
    return HealPlan(
        snap.room_id,
        RoomMeta("chat", owner, chat_id, space_id),
        "marker",
        chat,
        UserMeta(space_id=space_id) if space_id else None,
        unreadable_room(snap, "chat", owner),
    )


def _assess_legacy_chat(snap: RoomSnapshot, bot_id: str, parent: RoomSnapshot | None) -> HealPlan:
    parents = snap.parents(bot_id)
    if len(parents) > 1:
        raise HealRefused("ambiguous_parent")
    if not parents:
        raise HealRefused("missing_parent")
    if parent is None or parent.room_id != parents[0]:
        raise HealRefused("missing_parent")
    members = snap.members(bot_id)
    if len(members) != 1:
        raise HealRefused("no_single_owner")
    owner = members[0]
    if space_owner(parent, bot_id)[0] != owner:
        raise HealRefused("foreign_parent")
    chat_id = legacy_chat_id(snap.room_id)
    chat = Chat(chat_id, owner, snap.name or "Chat", "active", snap.created_at)
    return HealPlan(
        snap.room_id,
        RoomMeta("chat", owner, chat_id, parent.room_id),
        "legacy",
        chat,
        UserMeta(space_id=parent.room_id),
        unreadable_room(snap, "chat", owner),
    )
