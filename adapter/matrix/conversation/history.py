"""The conversation's thin shell: each room is read from the homeserver the first time a run
needs it (one ``/messages`` request, bounded), then kept in step from sync and from the bot's
own answers. Everything here is a cache: losing it changes nothing the agent sees, so it is
kept within a memory budget, whole rooms least recently used out first; a room out of it is
read again when next needed, as after a restart.

With replicas what is kept is not trusted (``fed=False``): a replica sees only the rounds of
the rooms it handles, not the edits, redactions and answers other replicas saw, so each answer
reads its room's conversation from the homeserver anew (an agent takes seconds, the read
milliseconds). Which message is a room's latest comes from the updates handed to this
replica's lanes (``arrived``) and its own answers."""

from __future__ import annotations

import asyncio
import sys
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import structlog

from adapter.matrix.conversation.turns import (
    CONVERSATION_TYPES,
    MESSAGE_TYPES,
    conversation_turns,
    footprint,
    history_before,
    slim,
)
from adapter.matrix.homeserver.client import Homeserver
from adapter.matrix.vocabulary.content import answered_source
from core.agent import Turn

log = structlog.get_logger()

MAX_READ = 1000  # the most events one read asks for, whatever LAMBDA_HISTORY_TURNS says
ANSWER_PAGE = 50  # the bot's messages read at once when looking for its answer to an event
BUDGET_BYTES = 64 * 2**20  # the cache's bound, whatever the number of rooms
# Estimated bytes beside what ``turns.footprint`` counts: a room's record (its object, its
# OrderedDict entry and id, its events' dict), and an event's slot in that dict. Measured with
# tracemalloc (tools/bench_conversation_cache.py), rounded up.
ROOM_BYTES = 600
EVENT_BYTES = 100


def read_size(turns: int) -> int:
    """Events to read for ``turns`` turns: each turn has its question or answer beside it, and
    commands, notices and edits come between."""
    return min(MAX_READ, 4 * turns + 20)


def _bytes(ev: dict) -> int:
    """A slim event's estimated bytes in a room's events."""
    return EVENT_BYTES + footprint(ev)


@dataclass
class _Room:
    """What the cache holds of one room: its latest message, and its conversation's events
    once read (slim, ``turns.slim``: event id -> event, in order)."""

    latest: str | None = None
    events: dict[str, dict] | None = None
    size: int = ROOM_BYTES  # estimated bytes, this record and all it holds


class Conversations:
    """The rooms' recent messages, read lazily, and what the latest message of each room is:
    kept within ``budget`` bytes (estimated), whole rooms least recently used out first."""

    def __init__(
        self, hs: Homeserver, turns: int, budget: int = BUDGET_BYTES, fed: bool = True
    ) -> None:
        self.hs = hs
        self.fed = fed  # False: no sync feeds this process every room (replicas)
        self.turns = turns
        self.window = read_size(turns)
        self.budget = budget
        self._rooms: OrderedDict[str, _Room] = OrderedDict()  # least recently used first
        self._size = 0  # estimated bytes of every room kept
        self._reads: dict[str, asyncio.Future] = {}

    @property
    def size(self) -> int:
        """The estimated bytes the cache holds now (at most ``budget``, but for a room being
        read or one alone bigger than it)."""
        return self._size

    def __contains__(self, room_id: str) -> bool:
        return room_id in self._rooms

    def observe(self, room_id: str, events: Iterable[dict], limited: bool = False) -> None:
        """New timeline events of a room, oldest first (a sync round's, the bot's own too). A
        ``limited`` timeline left a gap: a room read before is read again when next needed."""
        if not self.fed:
            return
        room = self._use(room_id)
        if limited and room_id not in self._reads:
            self._forget_events(room)
        for ev in events:
            event_id, kind = ev.get("event_id"), ev.get("type")
            if not isinstance(event_id, str):
                continue
            if kind in MESSAGE_TYPES:
                self._resize(room, latest=event_id)
            if room.events is not None and kind in CONVERSATION_TYPES:
                self._keep(room, room.events, slim(ev, self.hs.bot_id))
        self._fit()

    def forget(self, room_id: str) -> None:
        """Drop what is kept of a room: it is read again when next needed."""
        if room_id not in self._reads and room_id in self._rooms:
            self._size -= self._rooms.pop(room_id).size

    def sent(self, room_id: str, event_id: str, content: dict) -> None:
        """The bot sent a message: it is the room's latest, and a turn if it is an answer."""
        if not self.fed:
            self.arrived(room_id, event_id)
            return
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

    def arrived(self, room_id: str, event_id: str) -> None:
        """Without a sync feed (replicas): a user's event handed to this replica's lane is the
        room's latest message so far."""
        if not self.fed:
            self._resize(self._use(room_id), latest=event_id)
            self._fit()

    def follows(self, room_id: str, event_id: str) -> bool:
        """Whether ``event_id`` is the latest message the bot has seen in the room, so that an
        answer sent now directly follows it (a room out of the cache: no, a rich reply)."""
        room = self._rooms.get(room_id)
        return room is not None and room.latest == event_id

    async def history(self, room_id: str, owner: str, event_id: str, ts: int) -> list[Turn]:
        """The turns before the message ``event_id``, at most ``turns`` of them."""
        if self.turns == 0:
            return []
        if not self.fed and room_id not in self._reads:  # no feed: read anew for each answer
            self._forget_events(self._use(room_id))
        events = await self._read(room_id)
        return history_before(
            conversation_turns(events, owner, self.hs.bot_id), event_id, ts, self.turns
        )

    async def _read(self, room_id: str) -> list[dict]:
        room = self._use(room_id)
        if room.events is not None and room_id not in self._reads:
            return list(room.events.values())
        read = self._reads.get(room_id)
        if read is None:  # single-flight: concurrent askers share one request
            self._forget_events(room)
            room.events = {}  # from now on, sync keeps adding while the request is out
            read = self._reads[room_id] = asyncio.ensure_future(self._read_room(room_id, room))
            read.add_done_callback(lambda _: self._reads.pop(room_id, None))
        return await asyncio.shield(read)

    async def _read_room(self, room_id: str, room: _Room) -> list[dict]:
        """Read a room (never evicted while its read is out, ``_fit``) and merge what sync
        added meanwhile."""
        started, arriving = time.monotonic(), room.events
        assert arriving is not None, "set by _read, kept while the read is out"
        try:
            page, _ = await self.hs.messages(room_id, None, None, self.window, CONVERSATION_TYPES)
        except BaseException:
            self._forget_events(room)
            raise
        self._forget_events(room)
        kept: dict[str, dict] = {}
        for ev in reversed(page):
            if isinstance(ev.get("event_id"), str):
                self._keep(room, kept, slim(ev, self.hs.bot_id), trim=False)
        for event_id, ev in arriving.items():
            if event_id not in kept:
                self._keep(room, kept, ev, trim=False)
        room.events = kept
        self._use(room_id)  # the room at hand: kept, whatever was used while it was read
        self._fit()
        log.info(
            "conversation.read",
            room_id=room_id,
            events=len(kept),
            duration_ms=round((time.monotonic() - started) * 1000, 1),
        )
        return list(kept.values())

    def _use(self, room_id: str) -> _Room:
        """The room's record, made the most recently used."""
        room = self._rooms.get(room_id)
        if room is None:
            room = self._rooms[room_id] = _Room()
            self._size += room.size
        else:
            self._rooms.move_to_end(room_id)
        return room

    def _keep(self, room: _Room, events: dict[str, dict], ev: dict, trim: bool = True) -> None:
        """Add a slim event to a room's events (the last ``window`` of them, with ``trim``)."""
        if (old := events.pop(ev["event_id"], None)) is not None:
            self._grow(room, -_bytes(old))
        events[ev["event_id"]] = ev
        self._grow(room, _bytes(ev))
        while trim and len(events) > self.window:
            self._grow(room, -_bytes(events.pop(next(iter(events)))))

    def _resize(self, room: _Room, latest: str) -> None:
        self._grow(room, sys.getsizeof(latest) - (sys.getsizeof(room.latest) if room.latest else 0))
        room.latest = latest

    def _forget_events(self, room: _Room) -> None:
        if room.events is not None:
            self._grow(room, -sum(_bytes(ev) for ev in room.events.values()))
            room.events = None

    def _grow(self, room: _Room, delta: int) -> None:
        room.size += delta
        self._size += delta

    def _fit(self) -> None:
        """Evict whole rooms, least recently used first, until the cache is within budget;
        never a room being read (its read would lose what sync adds meanwhile), nor the most
        recently used one (the room at hand), even alone over the budget."""
        excess = self._size - self.budget
        if excess <= 0:
            return
        last, out = next(reversed(self._rooms)), []
        for room_id, room in self._rooms.items():  # from the least recently used
            if excess <= 0:
                break
            if room_id != last and room_id not in self._reads:
                out.append(room_id)
                excess -= room.size
        for room_id in out:
            self._size -= self._rooms.pop(room_id).size
        log.debug("conversation.evicted", rooms=len(out), kept=len(self._rooms))

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
