"""Local records against the server's room state: a pure decision, no I/O (SPEC §9).

What a room's state implies is decided by ``room_state.assess_room``, exactly as a heal
would, and the cause a heal would log by ``room_state.heal_cause``: the doctor only compares
that with what the DB holds, room by room.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from adapter.matrix.healing.encryption import REMEDY
from adapter.matrix.healing.room_state import (
    HealCause,
    HealPlan,
    HealRefused,
    RoomSnapshot,
    assess_room,
    heal_cause,
    parent_to_verify,
    trusted_marker,
)
from adapter.matrix.store.records import RoomKind, RoomMeta
from adapter.matrix.vocabulary.markers import ChatMarker
from core.chat import Chat, InvalidTitle, validate_title
from doctor_tool.local import LocalRecords

RoomState = Literal["ok", "missing_locally", "stale_locally", "mismatch", "encrypted"]
Role = Literal["space", "lobby"]  # what a matrix_user record names a room as
KIND_ORDER = {"space": 0, "lobby": 1, "chat": 2}
SPACE_NEEDED = "when its owner next needs their Space (!new, !chats, a lobby message)"
META_FIELDS = (("kind", "kind"), ("owner", "owner"), ("chat_id", "chat id"), ("space_id", "Space"))


@dataclass(frozen=True)
class ServerRooms:
    """What the homeserver showed: the rooms the bot is in, and the state events of each room
    read ([] for one the bot may not read). ``unsynced``: ids of ``m.room.name`` events after
    the bot's sync position."""

    joined: frozenset[str]
    states: dict[str, list[dict]] = field(default_factory=dict)
    unsynced: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Finding:
    """One room (or one chat record without a room): how the DB and the server compare."""

    room_id: str | None
    kind: RoomKind | None
    owner: str | None
    state: RoomState
    detail: str
    name: str = ""  # for the readable report: a chat's title, "Space" or "lobby"
    heals: bool = True  # ok, or the bot settles it by itself
    cause: HealCause | None = None  # the cause the heal of what is missing will log
    rename: str | None = None  # the owner's rename behind a title mismatch, if the bot may not
    # have synced it yet (``ServerRooms.unsynced`` tells)

    @property
    def doubtful(self) -> bool:
        """Worth a second look before it is reported: a bot at work shows such a difference
        for an instant (server first, DB after). What a reset or a loss explains is not."""
        return not self.heals or self.cause == "inconsistent"


def parents_to_read(server: ServerRooms, bot_id: str) -> set[str]:
    """The parent Spaces whose state the decision needs (legacy chats) and that were not read."""
    needed = set()
    for room_id in server.joined:
        try:
            parent = parent_to_verify(
                RoomSnapshot.from_events(room_id, server.states.get(room_id, [])), bot_id
            )
        except HealRefused:
            continue
        if parent is not None and parent not in server.states:
            needed.add(parent)
    return needed


def compare(
    local: LocalRecords, server: ServerRooms, bot_id: str, only: set[str] | None = None
) -> list[Finding]:
    """A finding for each room the DB or the server knows (``only``: just these), and for each
    chat record that no room carries; sorted by owner, then kind."""
    refs = _user_refs(local)
    room_ids = set(local.rooms) | set(refs) | server.joined
    findings, carried = [], {(m.owner, m.chat_id) for m in local.rooms.values() if m.chat_id}
    readers = owners_with_a_readable_chat(server, bot_id)
    for room_id in sorted(room_ids if only is None else room_ids & only):
        finding, plan = _examine(room_id, local, server, bot_id, refs.get(room_id, []), readers)
        findings.append(finding)
        if plan is not None and plan.chat is not None:
            carried.add((plan.chat.user_id, plan.chat.chat_id))
    if only is None:
        findings += [_orphan(chat) for key, chat in local.chats.items() if key not in carried]
    return in_report_order(findings)


def owners_with_a_readable_chat(server: ServerRooms, bot_id: str) -> set[str]:
    """The owners of an active chat room, made by the bot, that the homeserver did not encrypt."""
    owners = set()
    for room_id in server.joined:
        snap = RoomSnapshot.from_events(room_id, server.states.get(room_id, []))
        if snap.creator != bot_id or snap.is_space or snap.encrypted:
            continue
        try:
            marker = trusted_marker(snap, ChatMarker, bot_id)
        except HealRefused:
            continue
        if marker is not None and marker.status == "active":
            owners.add(marker.owner)
    return owners


def in_report_order(findings: list[Finding]) -> list[Finding]:
    """By owner (rooms of no one last), then Space, lobby, chats, by name."""
    return sorted(
        findings,
        key=lambda f: (
            f.owner is None,
            f.owner or "",
            KIND_ORDER.get(f.kind or "", 3),
            f.name.casefold(),
            f.room_id or "",
        ),
    )


def _user_refs(local: LocalRecords) -> dict[str, list[tuple[str, Role]]]:
    refs: dict[str, list[tuple[str, Role]]] = {}
    for user_id, user in local.users.items():
        refs.setdefault(user.space_id, []).append((user_id, "space"))
        if user.lobby_room_id:
            refs.setdefault(user.lobby_room_id, []).append((user_id, "lobby"))
    return refs


def _examine(
    room_id: str,
    local: LocalRecords,
    server: ServerRooms,
    bot_id: str,
    refs: list[tuple[str, Role]],
    readers: set[str],
) -> tuple[Finding, HealPlan | None]:
    meta = local.rooms.get(room_id)
    if room_id not in server.joined:
        return _stale(room_id, meta, refs, local), None
    snap = RoomSnapshot.from_events(room_id, server.states.get(room_id, []))
    try:
        parent_id = parent_to_verify(snap, bot_id)
        parent = (
            RoomSnapshot.from_events(parent_id, server.states.get(parent_id, []))
            if parent_id
            else None
        )
        plan = assess_room(snap, bot_id, parent)
    except HealRefused as refusal:
        return _refused(room_id, meta, refs, snap.members(bot_id), refusal), None
    finding = _against(plan, meta, refs, snap, local, server)
    return _encrypted(finding, plan, readers), plan


def _encrypted(finding: Finding, plan: HealPlan, readers: set[str]) -> Finding:
    """A room the bot made that the homeserver encrypted, and that its owner would need: an
    active chat room (the bot cannot read it), or the Space of an owner left with no chat room
    the bot can read (the bot makes no more rooms for them). It never heals by itself."""
    if plan.unreadable is None:
        return finding
    if plan.chat is not None and plan.chat.status == "active":
        why = "the homeserver encrypted this chat room, so the bot cannot read it"
    elif plan.room.kind == "space" and plan.room.owner not in readers:
        why = (
            "the homeserver encrypted this Space, and its owner has no chat room the bot can "
            "read: the homeserver encrypts the rooms the bot makes, so it makes no more for them"
        )
    else:
        return finding  # archived, or a Space whose owner chats in a readable room: harmless
    also = f" (also: {finding.detail})" if finding.detail else ""
    return replace(finding, state="encrypted", detail=f"{why}. Remedy: {REMEDY}{also}", heals=False)


def _stale(
    room_id: str, meta: RoomMeta | None, refs: list[tuple[str, Role]], local: LocalRecords
) -> Finding:
    kind = meta.kind if meta else refs[0][1]
    owner = meta.owner if meta else refs[0][0]
    named = (["its room record"] if meta else []) + [
        f"{uid}'s record, as their {role}" for uid, role in refs
    ]
    return Finding(
        room_id,
        kind,
        owner,
        "stale_locally",
        "the bot is not in this room (it left, was removed, or the room is gone), "
        f"yet the DB still names it ({'; '.join(named)}): nothing heals that by "
        "itself",
        _local_name(kind, meta, local),
        heals=False,
    )


def _refused(
    room_id: str,
    meta: RoomMeta | None,
    refs: list[tuple[str, Role]],
    members: list[str],
    refusal: HealRefused,
) -> Finding:
    if meta is None and not refs:
        return Finding(
            room_id,
            None,
            None,
            "ok",
            f"a room the bot does not use ({refusal.reason}); no record, as it should be",
            "other room",
        )
    kind = meta.kind if meta else refs[0][1]
    owner = meta.owner if meta else refs[0][0]
    if kind == "lobby" and not members:
        return Finding(
            room_id,
            kind,
            owner,
            "stale_locally",
            "the owner left this lobby and the bot is alone in it; its record stays",
            "lobby",
            heals=False,
        )
    return Finding(
        room_id,
        kind,
        owner,
        "mismatch",
        f"the DB trusts this room as a {kind}, "
        f"but a heal would refuse its server state ({refusal.reason})",
        kind,
        heals=False,
    )


def _against(
    plan: HealPlan,
    meta: RoomMeta | None,
    refs: list[tuple[str, Role]],
    snap: RoomSnapshot,
    local: LocalRecords,
    server: ServerRooms,
) -> Finding:
    """The records the DB holds against those the room's state implies."""
    room_id, kind, owner = plan.room_id, plan.room.kind, plan.room.owner
    missing: list[str] = []
    differ: list[str] = []
    follows: list[str] = []
    rename = None
    if meta is None:
        missing.append("no room record")
    else:
        differ += [
            f"{label}: local {getattr(meta, name)}, server {getattr(plan.room, name)}"
            for name, label in META_FIELDS
            if getattr(meta, name) != getattr(plan.room, name)
        ]
    chat = local.chats.get((plan.chat.user_id, plan.chat.chat_id)) if plan.chat else None
    if plan.chat is not None and chat is None:
        missing.append("no chat record")
    elif plan.chat is not None and chat is not None:
        if chat.status != plan.chat.status:
            differ.append(f"status: local {chat.status}, marker {plan.chat.status}")
        if chat.title != plan.chat.title:
            text, settled, rename = _title(chat, plan.chat, snap, local, server)
            (follows if settled else differ).append(text)
    differ += _user_differences(plan, local, refs)
    if kind == "space" and owner not in local.users:
        missing.append(f"no matrix_user record for {owner}")
    name = plan.chat.title if plan.chat else ("Space" if kind == "space" else kind)
    # A heal finds the room's record, or the chat record its marker names: the DB held part.
    cause = (
        heal_cause(local.birth, snap.created_at, meta is not None or chat is not None)
        if missing
        else None
    )
    if differ:
        return Finding(
            room_id,
            kind,
            owner,
            "mismatch",
            "; ".join(differ + follows + missing) + _waiting(room_id, local),
            name,
            heals=False,
            cause=cause,
            rename=rename,
        )
    if follows:
        return Finding(
            room_id, kind, owner, "mismatch", "; ".join(follows + missing), name, cause=cause
        )
    if missing:
        when = (
            "on the next event in the room"
            if kind != "space"
            # The owner's record is all the bot reads of its Space: the room's own record
            # is only written back by an event in the Space.
            else "on the next event in it"
            if owner in local.users
            else SPACE_NEEDED
        )
        return Finding(
            room_id,
            kind,
            owner,
            "missing_locally",
            f"{', '.join(missing)}: the bot heals it {when} (cause={cause})",
            name,
            cause=cause,
        )
    return Finding(room_id, kind, owner, "ok", "", name)


def _waiting(room_id: str, local: LocalRecords) -> str:
    """Updates of the room still in the inbox (a crash left them, say) are handled again on
    the next start, which may settle a mismatch."""
    waiting = sum(1 for e in local.inbox if e.update.room_id == room_id)
    return (
        (f" (updates of this room still in the inbox: {waiting}; handling them may settle this)")
        if waiting
        else ""
    )


def _title(
    local_chat: Chat,
    server_chat: Chat,
    snap: RoomSnapshot,
    local: LocalRecords,
    server: ServerRooms,
) -> tuple[str, bool, str | None]:
    """A title that differs: (what to say, whether the bot follows by itself, the rename to ask
    the server about). The bot follows a valid rename by the owner that it has not handled:
    one waiting in the inbox, or one after its sync position."""
    text = f"title: local “{local_chat.title}”, server “{server_chat.title}”"
    name_event = _name_event(server.states.get(snap.room_id, []))
    if name_event is None or name_event.get("sender") != server_chat.user_id:
        return text, False, None
    try:
        validate_title(str(name_event.get("content", {}).get("name", "")))
    except InvalidTitle as err:
        return (
            (
                f"{text} (the room's name is no valid title, so the bot keeps the chat's: "
                f"{err} !rename sets both)"
            ),
            False,
            None,
        )
    event_id = name_event.get("event_id")
    if event_id in {e.update.event_id for e in local.inbox if e.update.kind == "room_name"}:
        return f"{text}: the owner's rename waits in the inbox, the title follows", True, None
    if event_id in server.unsynced:
        return (
            (
                f"{text}: the owner renamed the room after the bot's last sync, the title "
                "follows on its next one"
            ),
            True,
            None,
        )
    return text, False, event_id


def _name_event(events: list[dict]) -> dict | None:
    return next(
        (ev for ev in events if ev.get("type") == "m.room.name" and ev.get("state_key") == ""), None
    )


def _user_differences(
    plan: HealPlan, local: LocalRecords, refs: list[tuple[str, Role]]
) -> list[str]:
    """The owner's matrix_user record against the room, and every record naming the room."""
    kind, owner = plan.room.kind, plan.room.owner
    found = []
    user = local.users.get(owner)
    if user is not None and plan.user is not None and user.space_id != plan.user.space_id:
        found.append(
            f"{owner}'s record names the Space {user.space_id}, the server {plan.user.space_id}"
        )
    for user_id, role in refs:
        if role != kind or user_id != owner:
            found.append(
                f"{user_id}'s record names it as their {role}, the server makes it "
                f"the {kind} of {owner}"
            )
    return found


def _orphan(chat: Chat) -> Finding:
    return Finding(
        None,
        "chat",
        chat.user_id,
        "stale_locally",
        f"chat record {chat.chat_id} ({chat.status}): no room the bot is in "
        "carries it, and no room record names it",
        chat.title,
        heals=False,
    )


def _local_name(kind: RoomKind, meta: RoomMeta | None, local: LocalRecords) -> str:
    if kind == "chat" and meta is not None and meta.chat_id:
        chat = local.chats.get((meta.owner, meta.chat_id))
        return chat.title if chat else "chat"
    return "Space" if kind == "space" else kind
