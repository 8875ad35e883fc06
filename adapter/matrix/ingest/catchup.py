"""A start without a sync token (SPEC §5): what the bot missed is history, except the
owner's recent messages that no bot answer names.

``Ingest.sweep`` looks at every room's latest events, short (``sweep.TIMELINE``); a room
whose latest events show such a message gets one ``catchup`` update, and its lane reads the
room back from the start's position (``CatchUpReader.expand``), up to
``LAMBDA_CATCHUP_HOURS`` and the 1,000-a-room bound. So a room with nothing to answer costs
nothing more, and no room waits for another's catch-up. ``CatchUpWalk`` is the pure rule.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import structlog

from adapter.matrix.homeserver.client import Homeserver, HomeserverError
from adapter.matrix.ingest import events
from adapter.matrix.ingest.events import READ_TYPES, is_own_join, to_update
from adapter.matrix.ingest.update import RetryLater, Update
from adapter.matrix.vocabulary.content import answered_source, is_legacy_reply

log = structlog.get_logger()


@dataclass(frozen=True)
class CatchUp:
    answer: list[dict]  # the text messages still to answer, oldest first
    skipped: int  # events left as history
    complete: bool  # the events reach what is not the bot's to answer: nothing older counts
    spoken: bool  # the events hold a message (so older ones are taken as answered)

    @property
    def conclusive(self) -> bool:
        """Whether these events tell if something is left to answer (if only state events and
        reactions were read, older events might hold an unanswered message)."""
        return self.complete or self.spoken


class CatchUpWalk:
    """The rule, walked from a room's newest event back, one event at a time (so a read back
    page by page applies it once per event).

    Answered means a later bot message names it in ``io.lambda.source`` (a provisional notice,
    "I'll retry", does not answer), or (replies from before that key existed) a later bot
    message carries no such key at all. Older than ``not_before_ms`` or before the bot's own
    join, nothing is the bot's to answer any more.
    """

    def __init__(self, bot_id: str, not_before_ms: int) -> None:
        self.bot_id, self.not_before_ms = bot_id, not_before_ms
        self.named: set[str] = set()  # answers come after their questions: seen first
        self.answer: list[dict] = []  # newest first
        self.skipped = 0
        self.complete = False
        self.spoken = False

    def step(self, ev: dict) -> bool:
        """Take the next older event; True once nothing older can count."""
        if is_own_join(ev, self.bot_id) or is_legacy_reply(ev, self.bot_id):
            self.complete = True
        elif (source := answered_source(ev, self.bot_id)) is not None:
            self.named.add(source)
            self.spoken = True
        elif (update := to_update(ev, self.bot_id)) is not None:
            self.spoken = self.spoken or update.kind != "room_name"
            if update.ts < self.not_before_ms:
                self.skipped += 1
                self.complete = True
            elif update.kind == "message" and update.event_id not in self.named:
                self.answer.append(ev)
            else:
                self.skipped += 1
        return self.complete

    def result(self) -> CatchUp:
        return CatchUp(self.answer[::-1], self.skipped, self.complete, self.spoken)


def window_start_ms(catchup_hours: float) -> int:
    """The oldest origin_server_ts a catch-up still answers (``LAMBDA_CATCHUP_HOURS`` ago)."""
    return int((time.time() - catchup_hours * 3600) * 1000)


def catch_up(timeline: list[dict], bot_id: str, not_before_ms: int) -> CatchUp:
    """Of a room's latest events (oldest first): the messages still to answer."""
    walk = CatchUpWalk(bot_id, not_before_ms)
    for ev in reversed(timeline):
        if walk.step(ev):
            break
    return walk.result()


def deferred(room_id: str, sync_token: str) -> Update:
    """The update that reads a room further back, from the first sync's position on. It may
    find answers already given after that position: a start's sweep is recorded window by
    window, so a catch-up of an earlier start (cut short by a crash, or a refused token) may
    be answering the same room in its lane, and its answers come after this position."""
    return Update(
        "catchup",
        room_id,
        "",
        f"catchup|{room_id}|{sync_token}",
        sync_token,
        catchup=True,
        replayed=True,
    )


class CatchUpReader:
    """Expands a ``catchup`` update, in its room's lane, into the messages to answer."""

    def __init__(self, hs: Homeserver, catchup_hours: float) -> None:
        self.hs = hs
        self.catchup_hours = catchup_hours

    async def expand(self, update: Update) -> list[Update]:
        """What ``update`` stands for: itself, or for a ``catchup`` the room's unanswered
        messages, oldest first. A catch-up that ran before (a replay, a retry) first reads
        what the bot answered since, so each message is answered once and asked about once."""
        if update.kind != "catchup":
            return [update]
        try:
            found, dropped = await self._read_back(update.room_id, update.body)
            answered = (
                await self._answered_since(update.room_id, update.body)
                if update.may_be_answered
                else set()
            )
        except HomeserverError as err:
            if not err.transient:  # the bot left the room, say: nothing of it to answer
                log.info("sync.catchup_skipped", room_id=update.room_id, error=str(err))
                return []
            raise RetryLater(str(err), err.retry_after_ms) from err
        updates = [
            u
            for ev in found.answer
            if ev.get("event_id") not in answered
            and (u := to_update(ev, self.hs.bot_id, catchup=True)) is not None
        ]
        if dropped:
            updates.insert(
                0,
                Update(
                    "missed",
                    update.room_id,
                    dropped[-1].get("sender", ""),
                    f"missed|{update.event_id}",
                    str(len(dropped)),
                ),
            )
        return updates

    async def _read_back(self, room_id: str, token: str | None) -> tuple[CatchUp, list[dict]]:
        """Page back from ``token`` until the rule is complete, the room begins, or the bound:
        the rule's result over what was read, and the messages past the bound."""
        started = time.monotonic()
        walk = CatchUpWalk(self.hs.bot_id, window_start_ms(self.catchup_hours))
        pages = read = 0
        while token is not None and read < events.MAX_BACKFILL + events.MAX_COUNTED:
            page, token = await self.hs.messages(room_id, token, None, events.PAGE, READ_TYPES)
            pages, read = pages + 1, read + len(page)
            if any(walk.step({**raw, "room_id": room_id}) for raw in page):
                break
        found = walk.result()
        cut = max(0, len(found.answer) - events.MAX_BACKFILL)
        dropped, found = found.answer[:cut], replace(found, answer=found.answer[cut:])
        log.info(
            "sync.catchup_read",
            room_id=room_id,
            answered=len(found.answer),
            skipped=found.skipped,
            pages=pages,
            duration_ms=round((time.monotonic() - started) * 1000, 1),
        )
        if dropped:
            log.warning(
                "sync.timeline_gap",
                room_id=room_id,
                handled=len(found.answer),
                unanswered=len(dropped),
            )
        return found, dropped

    async def _answered_since(self, room_id: str, token: str | None) -> set[str]:
        """The events the bot answered after ``token`` (its own messages, read forwards)."""
        answered: set[str] = set()
        bot, read = [self.hs.bot_id], 0
        while token is not None and read < events.MAX_BACKFILL + events.MAX_COUNTED:
            page, token = await self.hs.messages(
                room_id, token, None, events.PAGE, ["m.room.message"], forward=True, senders=bot
            )
            read += len(page)
            answered.update(
                s for ev in page if (s := answered_source(ev, self.hs.bot_id)) is not None
            )
        return answered
