"""The bot's own words on the wire: the ``io.lambda.*`` keys of its messages, the content it
sends, and the pure readers of message content that every layer shares (who answered what,
edits, redactions, reply fallbacks). Spelled here only."""

from __future__ import annotations

import hashlib
from typing import Any

SOURCE_KEY = "io.lambda.source"  # in every reply: the event it answers (SPEC §3)
# On a notice that promises an answer still to come ("I'll retry"): it names its source, but
# it is not the answer, so a replay still answers (see answered_source).
PROVISIONAL_KEY = "io.lambda.provisional"
SPACE_TYPE = "m.space"  # m.room.create's ``type`` of a Space


def message_content(
    body: str,
    *,
    html: str | None = None,
    notice: bool = True,
    source_event_id: str | None = None,
    reply_to: str | None = None,
    provisional: bool = False,
) -> dict[str, Any]:
    """An ``m.room.message`` of the bot: a notice (bot texts) or ``m.text`` (answers), naming
    its source; ``reply_to`` makes it a rich reply to that event."""
    content: dict[str, Any] = {"msgtype": "m.notice" if notice else "m.text", "body": body}
    if source_event_id is not None:
        content[SOURCE_KEY] = source_event_id
    if provisional:
        content[PROVISIONAL_KEY] = True
    if html is not None:
        content.update(format="org.matrix.custom.html", formatted_body=html)
    if reply_to is not None:
        content["m.relates_to"] = {"m.in_reply_to": {"event_id": reply_to}}
    return content


def reply_txn_id(source_event_id: str, part: str = "reply") -> str:
    """Derived from the source event so a replay after a crash is deduplicated by the server."""
    return f"lambda-{part}-{hashlib.sha256(source_event_id.encode()).hexdigest()[:32]}"


def content_of(ev: dict) -> dict:
    content = ev.get("content")
    return content if isinstance(content, dict) else {}


# Provisional notices sent before they carried PROVISIONAL_KEY: recognised by their words.
LEGACY_PROVISIONAL = ("I'll retry", "I'll answer it as soon as that is fixed")


def answered_source(ev: dict, bot_id: str) -> str | None:
    """The event that a bot message answers for good; None for anything else, including a
    provisional notice ("I'll retry"), which promises the answer rather than giving it."""
    if ev.get("sender") != bot_id or ev.get("type") != "m.room.message":
        return None
    content = content_of(ev)
    source, body = content.get(SOURCE_KEY), content.get("body")
    if not isinstance(source, str) or content.get(PROVISIONAL_KEY):
        return None
    if (
        content.get("msgtype") == "m.notice"
        and isinstance(body, str)
        and any(words in body for words in LEGACY_PROVISIONAL)
    ):
        return None
    return source


def is_legacy_reply(ev: dict, bot_id: str) -> bool:
    """A bot message from before replies named their source: it answered what came before."""
    content = content_of(ev)
    return (
        ev.get("sender") == bot_id
        and ev.get("type") == "m.room.message"
        and isinstance(content.get("body"), str)
        and SOURCE_KEY not in content
    )


def replaced_event(ev: dict) -> str | None:
    """The event an edit (``m.replace``) changes; None if ``ev`` is not an edit."""
    relation = content_of(ev).get("m.relates_to")
    if isinstance(relation, dict) and relation.get("rel_type") == "m.replace":
        target = relation.get("event_id")
        return target if isinstance(target, str) else None
    return None


def redacted_event(ev: dict) -> str | None:
    """The event a redaction removes (top-level ``redacts`` before room version 11, in the
    content from 11 on); None if ``ev`` is not a redaction."""
    if ev.get("type") != "m.room.redaction":
        return None
    target = ev.get("redacts") or content_of(ev).get("redacts")
    return target if isinstance(target, str) else None


def without_reply_fallback(content: dict) -> str | None:
    """A message's body without the quote older clients put before a rich reply ("> <@x>
    ...", dropped from the spec in v1.13); None if the body is not text."""
    body = content.get("body")
    if not isinstance(body, str):
        return None
    relation = content.get("m.relates_to")
    if not (isinstance(relation, dict) and "m.in_reply_to" in relation and body.startswith("> ")):
        return body
    lines = body.split("\n")
    while lines and lines[0].startswith(">"):
        lines.pop(0)
    return "\n".join(lines).removeprefix("\n") if lines else body
