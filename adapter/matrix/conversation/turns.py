"""The pure reader: raw room events (as sync and ``/messages`` give them) -> the agent's turns.

A turn is the owner's text message, as last edited, or the bot's answer to one (an ``m.text``
naming its source in ``io.lambda.source``). Commands, their answers, the bot's notices,
redacted messages and edits themselves are not turns. Nothing here does I/O.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from adapter.matrix.vocabulary.content import (
    SOURCE_KEY,
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


def slim(ev: dict, bot_id: str) -> dict:
    """What ``conversation_turns`` reads of an event, and nothing else (no HTML, no unsigned,
    no reply fallback): it gives the same turns over slim events as over the raw ones, in a
    fraction of the memory. An event that can never be a turn keeps only its id."""
    kept: dict = {"event_id": ev.get("event_id")}
    sender = ev.get("sender")
    if (target := redacted_event(ev)) is not None:
        kept.update(type="m.room.redaction", redacts=target)
    elif (target := replaced_event(ev)) is not None:
        new = content_of(ev).get("m.new_content")
        body = new.get("body") if isinstance(new, dict) else None
        if isinstance(sender, str) and isinstance(body, str):
            kept.update(
                sender=sys.intern(sender),
                content={
                    "m.relates_to": {"rel_type": "m.replace", "event_id": target},
                    "m.new_content": {"body": body},
                },
            )
    elif (text := _text(ev)) is not None and isinstance(sender, str):
        content = {"msgtype": "m.text", "body": text}
        if (source := answered_source(ev, bot_id)) is not None:
            content[SOURCE_KEY] = source
        kept.update(
            type="m.room.message",
            sender=sys.intern(sender),
            origin_server_ts=ev.get("origin_server_ts"),
            content=content,
        )
    return kept


def footprint(ev: dict) -> int:
    """The bytes a slim event holds, its dicts and its own strings (interned senders, and the
    keys spelled in this module, are shared)."""
    size = sys.getsizeof(ev)
    for key, value in ev.items():
        if isinstance(value, dict):
            size += footprint(value)
        elif key not in ("sender", "type", "msgtype", "rel_type") and value is not None:
            size += sys.getsizeof(value)
    return size


def history_before(turns: list[Turn], event_id: str, ts: int, limit: int) -> list[Turn]:
    """The last ``limit`` turns before the message ``event_id`` (sent at ``ts``): by its place
    when it is among the turns, else by time."""
    place = next((i for i, turn in enumerate(turns) if turn.event_id == event_id), None)
    earlier = turns[:place] if place is not None else [t for t in turns if t.ts <= ts]
    return earlier[-limit:] if limit > 0 else []
