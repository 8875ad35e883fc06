"""A sync round -> the updates the bot must handle (SPEC §5, Delivery).

- A resumed sync: every new event; a room whose timeline is ``limited`` first gets the
  events it missed, fetched with ``/messages`` back to the previous sync token.
- A start without a sync token: the timelines are history, except the catch-up rule
  (``catch_up``): an unanswered, recent message is answered. A sync token the server no
  longer accepts (``sync_token_refused``) leads to the same start.

The rules over raw events are pure functions; ``Ingest`` is their thin I/O shell.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import structlog
from nio import InviteMemberEvent, SyncResponse

from adapter.matrix.context import Update
from adapter.matrix.conversation.turns import answered_source, is_legacy_reply, replaced_event
from adapter.matrix.transport.homeserver import Homeserver

log = structlog.get_logger()

MAX_BACKFILL = 1000  # missed events handled per room; older ones are counted and reported
MAX_COUNTED = 10_000  # how far past that bound /messages is paged just to count
PAGE = 100
HANDLED_TYPES = ["m.room.message", "m.room.name", "m.room.encrypted"]
# Who else reads each room's timeline (the conversation): (room id, events, limited).
Observer = Callable[[str, Iterable[dict], bool], None]


def to_update(ev: dict, bot_id: str, catchup: bool = False) -> Update | None:
    """The update a raw timeline event asks for, if any (never one for the bot's own)."""
    sender, content = ev.get("sender"), ev.get("content")
    if sender == bot_id or not isinstance(sender, str) or not isinstance(content, dict):
        return None
    common = {"room_id": ev.get("room_id", ""), "sender": sender, "catchup": catchup,
              "event_id": str(ev.get("event_id", "")), "ts": int(ev.get("origin_server_ts") or 0)}
    kind = ev.get("type")
    if kind == "m.room.message" and content.get("msgtype") == "m.text" \
            and isinstance(content.get("body"), str) and replaced_event(ev) is None:
        # An edit is not a new question: it changes the turn it edits (the conversation).
        return Update("message", body=content["body"], **common)
    if kind == "m.room.name" and ev.get("state_key") == "" \
            and isinstance(content.get("name"), str):
        return Update("room_name", body=content["name"], **common)
    if kind == "m.room.encrypted":  # the bot has no E2EE: say so, never stay silent
        return Update("encrypted", **common)
    return None


def catch_up(events: list[dict], bot_id: str, not_before_ms: int) -> tuple[list[dict], int]:
    """Of a first sync's timeline (oldest first): the text messages still to answer, and how
    many events are skipped as history.

    Answered means a later bot message names it in ``io.lambda.source`` (a provisional notice,
    "I'll retry", does not answer), or (replies from before that key existed) a later bot
    message carries no such key at all.
    """
    named = {answered_source(ev, bot_id) for ev in events}
    answer: list[dict] = []
    skipped, legacy_reply_after = 0, False
    for ev in reversed(events):
        if ev.get("sender") == bot_id:
            legacy_reply_after = legacy_reply_after or is_legacy_reply(ev, bot_id)
            continue
        update = to_update(ev, bot_id)
        if update is None:
            continue
        if (update.kind == "message" and update.ts >= not_before_ms
                and update.event_id not in named and not legacy_reply_after):
            answer.append(ev)
        else:
            skipped += 1
    return answer[::-1], skipped


def sync_token_refused(http_status: int | None, errcode: str | None, message: str | None
                       ) -> bool:
    """Whether a failed ``/sync?since=`` means the server does not accept the token itself.

    Synapse (``StreamToken.from_string``) answers any token it cannot parse with exactly
    ``400 M_UNKNOWN "Invalid stream token"``, and accepts one from the future (bounded to its
    current position). Nothing transient (a 5xx, a 429, no answer) is ever that.
    """
    return http_status == 400 and errcode == "M_UNKNOWN" \
        and (message or "").startswith("Invalid stream token")


def _own_join_index(events: list[dict], bot_id: str) -> int | None:
    """Where the bot's last join is in a timeline, if it is there."""
    return next((i for i in range(len(events) - 1, -1, -1)
                 if _is_own_join(events[i], bot_id)), None)


def _is_own_join(ev: dict, bot_id: str) -> bool:
    """The bot's own join: nothing before it is the bot's to answer."""
    if ev.get("type") != "m.room.member" or ev.get("state_key") != bot_id:
        return False
    prev = (ev.get("unsigned") or {}).get("prev_content") or {}
    return (ev.get("content") or {}).get("membership") == "join" \
        and prev.get("membership") != "join"


@dataclass(frozen=True)
class Backfill:
    events: list[dict]  # oldest first, at most MAX_BACKFILL
    dropped: int  # older missed messages past the bound (counted up to MAX_COUNTED)
    dropped_sender: str | None  # who sent the newest of those


class Ingest:
    """Turns sync responses into updates, fetching what a limited timeline left out."""

    def __init__(self, hs: Homeserver, catchup_hours: float,
                 observe: Observer | None = None) -> None:
        self.hs = hs
        self.catchup_hours = catchup_hours
        self.observe = observe or (lambda room_id, events, limited: None)

    async def updates(self, resp: SyncResponse, since: str | None) -> list[Update]:
        bot_id = self.hs.bot_id
        updates = []
        for room_id, info in resp.rooms.invite.items():
            # One update per invite, taken from the invite event for the bot itself.
            invite = next((ev for ev in info.invite_state if isinstance(ev, InviteMemberEvent)
                           and ev.state_key == bot_id and ev.membership == "invite"), None)
            if invite is not None:
                updates.append(Update("invite", room_id, invite.sender,
                                      f"invite|{room_id}|{since or ''}"))
        catchup = {"answered": 0, "skipped": 0}
        not_before_ms = int((time.time() - self.catchup_hours * 3600) * 1000)
        for room_id, info in resp.rooms.join.items():
            events = [{**ev.source, "room_id": room_id} for ev in info.timeline.events]
            self.observe(room_id, events, info.timeline.limited)
            if since is None:
                events, skipped = catch_up(events, bot_id, not_before_ms)
                catchup["answered"] += len(events)
                catchup["skipped"] += skipped
            elif (joined := _own_join_index(events, bot_id)) is not None:
                events = events[joined + 1:]  # a newly joined room: what came before is not ours
            elif info.timeline.limited and info.timeline.prev_batch:
                missed = await self._backfill(room_id, info.timeline.prev_batch, since)
                if missed.dropped:
                    updates.append(Update("missed", room_id, missed.dropped_sender or "",
                                          f"missed|{room_id}|{since}", str(missed.dropped)))
                events = missed.events + events
            updates.extend(update for ev in events
                           if (update := to_update(ev, bot_id, since is None)) is not None)
        if since is None:
            log.info("sync.catchup", answered=catchup["answered"], skipped=catchup["skipped"],
                     rooms=len(resp.rooms.join), hours=self.catchup_hours)
        return updates

    async def _backfill(self, room_id: str, start: str, since: str) -> Backfill:
        """The events between the previous sync and this limited timeline, oldest first."""
        bot_id = self.hs.bot_id
        kept: list[dict] = []
        dropped, dropped_sender, token = 0, None, start
        while token and dropped < MAX_COUNTED:
            page, token = await self.hs.messages(room_id, token, since, PAGE,
                                                 [*HANDLED_TYPES, "m.room.member"])
            for ev in ({**raw, "room_id": room_id} for raw in page):
                if _is_own_join(ev, bot_id):
                    token = None
                    break
                if to_update(ev, bot_id) is None:
                    continue
                if len(kept) < MAX_BACKFILL:
                    kept.append(ev)
                else:
                    dropped += 1
                    dropped_sender = dropped_sender or ev.get("sender")
        if kept:
            log.info("sync.gap_backfilled", room_id=room_id, events=len(kept))
        if dropped:
            log.warning("sync.timeline_gap", room_id=room_id, handled=len(kept),
                        unanswered=dropped)
        return Backfill(kept[::-1], dropped, dropped_sender)
