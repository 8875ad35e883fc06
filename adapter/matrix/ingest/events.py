"""Raw room events -> what the bot must act on: pure rules shared by the sync round
(``ingest``) and the catch-up after a start without a token (``catchup``)."""

from __future__ import annotations

from nio import InviteMemberEvent, SyncResponse

from adapter.matrix.ingest.update import Update
from adapter.matrix.vocabulary.content import replaced_event, without_reply_fallback

MAX_BACKFILL = 1000  # missed events handled per room; older ones are counted and reported
MAX_COUNTED = 10_000  # how far past that bound /messages is paged just to count
PAGE = 100
HANDLED_TYPES = ["m.room.message", "m.room.name", "m.room.encrypted"]
READ_TYPES = [*HANDLED_TYPES, "m.room.member"]  # what a read back asks for (joins end it)


def to_update(ev: dict, bot_id: str, catchup: bool = False) -> Update | None:
    """The update a raw timeline event asks for, if any (never one for the bot's own)."""
    sender, content = ev.get("sender"), ev.get("content")
    if sender == bot_id or not isinstance(sender, str) or not isinstance(content, dict):
        return None
    common = {
        "room_id": ev.get("room_id", ""),
        "sender": sender,
        "catchup": catchup,
        "event_id": str(ev.get("event_id", "")),
        "ts": int(ev.get("origin_server_ts") or 0),
    }
    kind = ev.get("type")
    if (
        kind == "m.room.message"
        and content.get("msgtype") == "m.text"
        and (body := without_reply_fallback(content)) is not None
        and replaced_event(ev) is None
    ):
        # An edit is not a new question: it changes the turn it edits (the conversation).
        return Update("message", body=body, **common)
    if kind == "m.room.name" and ev.get("state_key") == "" and isinstance(content.get("name"), str):
        return Update("room_name", body=content["name"], **common)
    if kind == "m.room.encrypted":  # the bot has no E2EE: say so, never stay silent
        return Update("encrypted", **common)
    return None


def is_own_join(ev: dict, bot_id: str) -> bool:
    """The bot's own join: nothing before it is the bot's to answer."""
    if ev.get("type") != "m.room.member" or ev.get("state_key") != bot_id:
        return False
    prev = (ev.get("unsigned") or {}).get("prev_content") or {}
    return (ev.get("content") or {}).get("membership") == "join" and prev.get(
        "membership"
    ) != "join"


def invites_of(resp: SyncResponse, bot_id: str) -> list[tuple[str, str]]:
    """The rooms a sync round shows the bot invited to, each with its inviter (from the
    invite event for the bot itself)."""
    found = []
    for room_id, info in resp.rooms.invite.items():
        invite = next(
            (
                ev
                for ev in info.invite_state
                if isinstance(ev, InviteMemberEvent)
                and ev.state_key == bot_id
                and ev.membership == "invite"
            ),
            None,
        )
        if invite is not None:
            found.append((room_id, invite.sender))
    return found
