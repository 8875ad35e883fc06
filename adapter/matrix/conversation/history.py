"""The conversation's thin shell: each room is read from the homeserver the first time a run
needs it (one ``/messages`` request, bounded), then kept in step from sync and from the bot's
own answers. Everything here is a cache: losing it changes nothing the agent sees."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

import structlog

from adapter.matrix.conversation.turns import (
    CONVERSATION_TYPES,
    MESSAGE_TYPES,
    conversation_turns,
    history_before,
)
from adapter.matrix.homeserver.client import Homeserver
from adapter.matrix.vocabulary.content import answered_source
from core.agent import Turn

log = structlog.get_logger()

MAX_READ = 1000  # the most events one read asks for, whatever LAMBDA_HISTORY_TURNS says
ANSWER_PAGE = 50  # the bot's messages read at once when looking for its answer to an event


def read_size(turns: int) -> int:
    """Events to read for ``turns`` turns: each turn has its question or answer beside it, and
    commands, notices and edits come between."""
    return min(MAX_READ, 4 * turns + 20)


class Conversations:
    """The rooms' recent messages, read lazily, and what the latest message of each room is."""

    def __init__(self, hs: Homeserver, turns: int) -> None:
        self.hs = hs
        self.turns = turns
        self.window = read_size(turns)
        self._events: dict[str, dict[str, dict]] = {}  # rooms read this run: id -> event, in order
        self._reads: dict[str, asyncio.Future] = {}
        self._latest: dict[str, str] = {}  # room -> the latest message event seen in it

    def observe(self, room_id: str, events: Iterable[dict], limited: bool = False) -> None:
        """New timeline events of a room, oldest first (a sync round's, the bot's own too). A
        ``limited`` timeline left a gap: a room read before is read again when next needed."""
        if limited and room_id not in self._reads:
            self._events.pop(room_id, None)
        for ev in events:
            event_id, kind = ev.get("event_id"), ev.get("type")
            if not isinstance(event_id, str):
                continue
            if kind in MESSAGE_TYPES:
                self._latest[room_id] = event_id
            kept = self._events.get(room_id)
            if kept is not None and kind in CONVERSATION_TYPES:
                kept[event_id] = ev
                while len(kept) > self.window:
                    del kept[next(iter(kept))]

    def forget(self, room_id: str) -> None:
        """Drop what is kept of a room: with replicas, another one may have answered in it
        since, so a replica that takes a room reads its conversation again."""
        if room_id not in self._reads:
            self._events.pop(room_id, None)

    def sent(self, room_id: str, event_id: str, content: dict) -> None:
        """The bot sent a message: it is the room's latest, and a turn if it is an answer."""
        self.observe(
            room_id,
            [
                {
                    "type": "m.room.message",
                    "event_id": event_id,
                    "sender": self.hs.bot_id,
                    "content": content,
                    "origin_server_ts": int(time.time() * 1000),
                }
            ],
        )

    def follows(self, room_id: str, event_id: str) -> bool:
        """Whether ``event_id`` is the latest message the bot has seen in the room, so that an
        answer sent now directly follows it."""
        return self._latest.get(room_id) == event_id

    async def history(self, room_id: str, owner: str, event_id: str, ts: int) -> list[Turn]:
        """The turns before the message ``event_id``, at most ``turns`` of them."""
        if self.turns == 0:
            return []
        events = await self._read(room_id)
        return history_before(
            conversation_turns(events, owner, self.hs.bot_id), event_id, ts, self.turns
        )

    async def _read(self, room_id: str) -> list[dict]:
        if room_id in self._events and room_id not in self._reads:
            return list(self._events[room_id].values())
        read = self._reads.get(room_id)
        if read is None:  # single-flight: concurrent askers share one request
            read = self._reads[room_id] = asyncio.ensure_future(self._read_room(room_id))
            read.add_done_callback(lambda _: self._reads.pop(room_id, None))
        return await asyncio.shield(read)

    async def _read_room(self, room_id: str) -> list[dict]:
        started = time.monotonic()
        arriving = self._events[room_id] = {}  # sync keeps adding while the request is out
        try:
            page, _ = await self.hs.messages(room_id, None, None, self.window, CONVERSATION_TYPES)
        except BaseException:
            self._events.pop(room_id, None)
            raise
        kept = {
            ev["event_id"]: {**ev, "room_id": room_id}
            for ev in reversed(page)
            if isinstance(ev.get("event_id"), str)
        }
        kept.update((eid, ev) for eid, ev in arriving.items() if eid not in kept)
        self._events[room_id] = kept
        log.info(
            "conversation.read",
            room_id=room_id,
            events=len(kept),
            duration_ms=round((time.monotonic() - started) * 1000, 1),
        )
        return list(kept.values())

    async def answered(self, room_id: str, event_id: str) -> bool:
        """Whether the room holds the bot's answer to ``event_id`` (asked of the homeserver,
        never of a cache: exactly once must hold across a kill -9 and a new device). Answers
        come in order, so after a burst the answer may be far on: it reads on, bounded."""
        bot = [self.hs.bot_id]
        later, token = await self.hs.messages_after(room_id, event_id, ANSWER_PAGE, bot)
        scanned = 0
        while True:
            if any(answered_source(ev, self.hs.bot_id) == event_id for ev in later):
                return True
            scanned += len(later)
            if token is None or len(later) < ANSWER_PAGE or scanned >= MAX_READ:
                return False
            later, token = await self.hs.messages(
                room_id, token, None, ANSWER_PAGE, ["m.room.message"], forward=True, senders=bot
            )
