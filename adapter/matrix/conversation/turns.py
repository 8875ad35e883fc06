"""The pure reader: raw room events (as sync and ``/messages`` give them) -> the agent's turns.

A turn is the owner's text message, as last edited, or the bot's answer to one (an ``m.text``
naming its source in ``io.lambda.source``). Commands, their answers, the bot's notices,
redacted messages and edits themselves are not turns. Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Iterable

from adapter.matrix.transport.homeserver import PROVISIONAL_KEY, SOURCE_KEY
from core.agent import Turn

# What a user sees as a message in the timeline: "directly follows" is judged over these.
MESSAGE_TYPES = frozenset({"m.room.message", "m.room.encrypted", "m.sticker"})
# What the conversation needs of a room: messages (with edits) and redactions.
CONVERSATION_TYPES = ["m.room.message", "m.room.redaction"]


def _content(ev: dict) -> dict:
    content = ev.get("content")
    return content if isinstance(content, dict) else {}


# Provisional notices sent before they carried PROVISIONAL_KEY: recognised by their words.
LEGACY_PROVISIONAL = ("I'll retry", "I'll answer it as soon as that is fixed")


def answered_source(ev: dict, bot_id: str) -> str | None:
    """The event that a bot message answers for good; None for anything else, including a
    provisional notice ("I'll retry"), which promises the answer rather than giving it."""
    if ev.get("sender") != bot_id or ev.get("type") != "m.room.message":
        return None
    content = _content(ev)
    source, body = content.get(SOURCE_KEY), content.get("body")
    if not isinstance(source, str) or content.get(PROVISIONAL_KEY):
        return None
    if content.get("msgtype") == "m.notice" and isinstance(body, str) \
            and any(words in body for words in LEGACY_PROVISIONAL):
        return None
    return source


def is_legacy_reply(ev: dict, bot_id: str) -> bool:
    """A bot message from before replies named their source: it answered what came before."""
    content = _content(ev)
    return (ev.get("sender") == bot_id and ev.get("type") == "m.room.message"
            and isinstance(content.get("body"), str) and SOURCE_KEY not in content)


def replaced_event(ev: dict) -> str | None:
    """The event an edit (``m.replace``) changes; None if ``ev`` is not an edit."""
    relation = _content(ev).get("m.relates_to")
    if isinstance(relation, dict) and relation.get("rel_type") == "m.replace":
        target = relation.get("event_id")
        return target if isinstance(target, str) else None
    return None


def redacted_event(ev: dict) -> str | None:
    """The event a redaction removes (top-level ``redacts`` before room version 11, in the
    content from 11 on); None if ``ev`` is not a redaction."""
    if ev.get("type") != "m.room.redaction":
        return None
    target = ev.get("redacts") or _content(ev).get("redacts")
    return target if isinstance(target, str) else None


def without_reply_fallback(content: dict) -> str | None:
    """A message's body without the quote older clients put before a rich reply ("> <@x>
    ...", dropped from the spec in v1.13); None if the body is not text."""
    body = content.get("body")
    if not isinstance(body, str):
        return None
    relation = content.get("m.relates_to")
    if not (isinstance(relation, dict) and "m.in_reply_to" in relation
            and body.startswith("> ")):
        return body
    lines = body.split("\n")
    while lines and lines[0].startswith(">"):
        lines.pop(0)
    return "\n".join(lines).removeprefix("\n") if lines else body


def _text(ev: dict) -> str | None:
    """The body of a plain text message, if ``ev`` is one."""
    content = _content(ev)
    if ev.get("type") != "m.room.message" or content.get("msgtype") != "m.text":
        return None
    return without_reply_fallback(content)


def conversation_turns(events: Iterable[dict], owner: str, bot_id: str) -> list[Turn]:
    """The turns of a chat room's events (oldest first): edits applied, redactions dropped,
    commands, notices and other senders left out."""
    turns: dict[str, Turn] = {}
    senders: dict[str, str] = {}
    for ev in events:
        event_id, sender = ev.get("event_id"), ev.get("sender")
        if not isinstance(event_id, str):
            continue
        if (target := redacted_event(ev)) is not None:
            turns.pop(target, None)
            continue
        if (target := replaced_event(ev)) is not None:
            new = _content(ev).get("m.new_content")
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
