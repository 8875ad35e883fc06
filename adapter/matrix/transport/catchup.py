"""A start without a sync token (SPEC §5): the first sync's timelines are history, except the
owner's recent messages that no bot answer names.

The first sync asks for a short timeline per room. A room whose latest events show such a
message, and whose timeline does not reach back to what is not the bot's to answer, gets one
``catchup`` update: its lane reads the room further back (``CatchUpReader.expand``), up to
``LAMBDA_CATCHUP_HOURS`` and the 1,000-a-room bound. So a room with nothing to answer costs
nothing, and no room waits for another's catch-up. ``catch_up`` is the pure rule.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import structlog

from adapter.matrix.context import Update
from adapter.matrix.delivery.lanes import RetryLater
from adapter.matrix.conversation.turns import answered_source, is_legacy_reply
from adapter.matrix.transport import events
from adapter.matrix.transport.events import READ_TYPES, is_own_join, to_update
from adapter.matrix.transport.homeserver import Homeserver, HomeserverError

log = structlog.get_logger()

INITIAL_TIMELINE = 10  # events per room in a first sync; rooms that need more read more


@dataclass(frozen=True)
class CatchUp:
    answer: list[dict]  # the text messages still to answer, oldest first
    skipped: int  # events left as history
    complete: bool  # the events reach what is not the bot's to answer: nothing older counts


def catch_up(timeline: list[dict], bot_id: str, not_before_ms: int) -> CatchUp:
    """Of a room's latest events (oldest first): the messages still to answer.

    Answered means a later bot message names it in ``io.lambda.source`` (a provisional notice,
    "I'll retry", does not answer), or (replies from before that key existed) a later bot
    message carries no such key at all. Older than ``not_before_ms`` or before the bot's own
    join, nothing is the bot's to answer any more.
    """
    named = {answered_source(ev, bot_id) for ev in timeline}
    answer: list[dict] = []
    skipped = 0
    for ev in reversed(timeline):
        if is_own_join(ev, bot_id) or is_legacy_reply(ev, bot_id):
            return CatchUp(answer[::-1], skipped, True)
        update = to_update(ev, bot_id)
        if update is None:
            continue
        if update.ts < not_before_ms:
            return CatchUp(answer[::-1], skipped + 1, True)
        if update.kind == "message" and update.event_id not in named:
            answer.append(ev)
        else:
            skipped += 1
    return CatchUp(answer[::-1], skipped, False)


def deferred(room_id: str, sync_token: str) -> Update:
    """The update that reads a room further back, from the first sync's position on."""
    return Update("catchup", room_id, "", f"catchup|{room_id}|{sync_token}", sync_token,
                  catchup=True)


class CatchUpReader:
    """Expands a ``catchup`` update, in its room's lane, into the messages to answer."""

    def __init__(self, hs: Homeserver, catchup_hours: float) -> None:
        self.hs = hs
        self.catchup_hours = catchup_hours

    async def expand(self, update: Update) -> list[Update]:
        """What ``update`` stands for: itself, or for a ``catchup`` the room's unanswered
        messages. A replay inherits ``replayed``/``attempt``, so each is checked against the
        room before it is answered again."""
        if update.kind != "catchup":
            return [update]
        try:
            found, dropped = await self._read_back(update.room_id, update.body)
        except HomeserverError as err:
            if not err.transient:  # the bot left the room, say: nothing of it to answer
                log.info("sync.catchup_skipped", room_id=update.room_id, error=str(err))
                return []
            raise RetryLater(str(err), err.retry_after_ms) from err
        inherited = {"replayed": update.replayed, "attempt": update.attempt}
        updates = [replace(u, **inherited) for ev in found.answer
                   if (u := to_update(ev, self.hs.bot_id, catchup=True)) is not None]
        if dropped:
            updates.insert(0, Update("missed", update.room_id, dropped[-1].get("sender", ""),
                                     f"missed|{update.event_id}", str(len(dropped)),
                                     **inherited))
        return updates

    async def _read_back(self, room_id: str, token: str | None
                         ) -> tuple[CatchUp, list[dict]]:
        """Page back from ``token`` until the rule is complete, the room begins, or the bound:
        the rule's result over what was read, and the messages past the bound."""
        bot_id, started = self.hs.bot_id, time.monotonic()
        not_before_ms = int((time.time() - self.catchup_hours * 3600) * 1000)
        timeline: list[dict] = []
        pages = 0
        while True:
            page, token = await self.hs.messages(room_id, token, None, events.PAGE, READ_TYPES)
            pages += 1
            timeline[:0] = [{**raw, "room_id": room_id} for raw in reversed(page)]
            found = catch_up(timeline, bot_id, not_before_ms)
            if found.complete or token is None \
                    or len(found.answer) >= events.MAX_BACKFILL + events.MAX_COUNTED:
                break
        cut = max(0, len(found.answer) - events.MAX_BACKFILL)
        dropped, found = found.answer[:cut], replace(found, answer=found.answer[cut:])
        log.info("sync.catchup_read", room_id=room_id, answered=len(found.answer),
                 skipped=found.skipped, pages=pages,
                 duration_ms=round((time.monotonic() - started) * 1000, 1))
        if dropped:
            log.warning("sync.timeline_gap", room_id=room_id, handled=len(found.answer),
                        unanswered=len(dropped))
        return found, dropped
