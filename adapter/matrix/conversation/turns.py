"""The pure reader: raw room events (as sync and ``/messages`` give them) -> the agent's turns.

A turn is the owner's text message, as last edited, or the bot's answer to one (an ``m.text``
naming its source in ``io.lambda.source``). Commands, their answers, the bot's notices,
redacted messages and edits themselves are not turns. Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Iterable

from adapter.matrix.vocabulary.content import (
    answered_source,
    content_of,
    redacted_event,
    replaced_event,
    without_reply_fallback,
)
from core.agent import Turn

# What a user sees as a message in the timeline: "directly follows" is judged over these.
MESSAGE_TYPES = frozenset({"m.room.message", "m.room.encrypted", "m.sticker"})
# What the conversation needs of a room: messages (with edits) and redactions.
CONVERSATION_TYPES = ["m.room.message", "m.room.redaction"]


def _text(ev: dict) -> str | None:
    """The body of a plain text message, if ``ev`` is one."""
    content = content_of(ev)
    if ev.get("type") != "m.room.message" or content.get("msgtype") != "m.text":
        return None
    return without_reply_fallback(content)


def conversation_turns(events: Iterable[dict], owner: str, bot_id: str) -> list[Turn]:
    """The turns of a chat room's events (oldest first): edits applied, redactions dropped,
    commands, notices and other senders left out."""
    turns: dict[str, Turn] = {}
    senders: dict[str, str | None] = {}
    for ev in events:
        event_id, sender = ev.get("event_id"), ev.get("sender")
        if not isinstance(event_id, str):
            continue
        if (target := redacted_event(ev)) is not None:
            turns.pop(target, None)
            continue
        if (target := replaced_event(ev)) is not None:
            new = content_of(ev).get("m.new_content")
            body = new.get("body") if isinstance(new, dict) else None
            if target in turns and senders.get(target) == sender and isinstance(body, str):
                turns[target] = Turn(turns[target].role, body, target, turns[target].ts)
            continue
        text = _text(ev)
        if text is None:
            continue
        ts = int(ev.get("origin_server_ts") or 0)
        if sender == owner and not text.lstrip().startswith("!"):
            turns[event_id] = Turn("user", text, event_id, ts)
        elif answered_source(ev, bot_id) is not None:
            turns[event_id] = Turn("assistant", text, event_id, ts)
        else:
            continue
        senders[event_id] = sender
    return list(turns.values())


def history_before(turns: list[Turn], event_id: str, ts: int, limit: int) -> list[Turn]:
    """The last ``limit`` turns before the message ``event_id`` (sent at ``ts``): by its place
    when it is among the turns, else by time."""
    place = next((i for i, turn in enumerate(turns) if turn.event_id == event_id), None)
    earlier = turns[:place] if place is not None else [t for t in turns if t.ts <= ts]
    return earlier[-limit:] if limit > 0 else []
