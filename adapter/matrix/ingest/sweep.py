"""A start without a sync token looks at every room's latest events (SPEC §5, Scale), most
recently active first, a window at a time: the room a user wrote in while the bot was down is
in the first window, whatever the number of rooms.

The windows come from one sliding sync connection (MSC4186, ``/sync`` of
``org.matrix.simplified_msc3575``), sorted by recency; each request widens the range, and the
server sends only the rooms it has not sent on that connection yet, so no room is skipped when
the order moves. A homeserver without it gets one first ``/sync`` of every room instead (the
fallback, a single window). ``parse_window`` is the pure rule over a sliding sync answer;
``Sweep`` is its I/O shell.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass

import structlog
from nio import SyncResponse

from adapter.matrix.homeserver.client import Homeserver, HomeserverError
from adapter.matrix.ingest.events import READ_TYPES, invites_of
from adapter.matrix.vocabulary.markers import SpaceMarker

log = structlog.get_logger()

LIST = "recent"
CONNECTION = "lambda-start"  # the sliding sync connection a start's sweep walks on
FIRST_WINDOW = 10  # rooms in the first window, where a user most likely waits: as cheap as 7
# A later window adds as many rooms as fit in WINDOW_COST_S of the homeserver's time, by what
# the last one took (``next_window``): a user's request that comes while one is out waits
# behind it. At most WINDOW rooms (a request of about 0.25 s), at least LEAST_WINDOW.
WINDOW = 50
LEAST_WINDOW = 10  # below it, a request's own cost dominates (measured: 5 rooms cost as much)
WINDOW_COST_S = 0.12
# After a window, the sweep rests REST times as long as it took: the homeserver is a single
# process, and a window out slows everything a user's message goes through (its send, the
# live sync that carries it), before the bot can know to give way. Measured at 300 rooms, back
# to back windows held that message's live round ~300 ms after bot.ready. The start's own
# moments are kept for users by the give-way's settle (modes/catching_up.py), so the rest is
# short: it only spaces the windows out (docs/PERFORMANCE.md has both).
REST = 0.25
TIMELINE = 20  # latest events per room; a room that needs more reads back in its lane
# The types a fallback's first sync asks for: what the rule reads, and what the conversation
# follows (redactions, stickers), so that reactions cannot hide a question. Sliding sync has
# no type filter: its timelines hold every type, and a room whose latest events are all
# state or reactions reads back (``CatchUp.conclusive``).
TIMELINE_TYPES = [*READ_TYPES, "m.room.redaction", "m.sticker"]
REQUIRED_STATE = [["m.room.create", ""], ["m.room.member", "$ME"], [SpaceMarker.TYPE, ""]]


@dataclass(frozen=True)
class Glimpse:
    """What a sweep sees of one room the bot is in."""

    room_id: str
    events: list[dict]  # its latest events, oldest first, each with its room id
    limited: bool  # older events exist
    room_type: str | None  # as nio has it: ``m.space``, "" (no type), None (create not seen)
    state: list[dict]  # the state events asked for (``REQUIRED_STATE``), if any
    position: str | None = None  # where a read back of this room starts; None: the start's


@dataclass(frozen=True)
class Window:
    rooms: list[Glimpse]
    invites: list[tuple[str, str]]  # (room id, inviter): the bot is invited there


def _is_create(ev: dict) -> bool:
    return ev.get("type") == "m.room.create" and ev.get("state_key") == ""


def parse_window(body: dict, bot_id: str) -> Window:
    """The rooms of a sliding sync answer that the connection had not sent before (those it
    sent before and that moved are seen by the live sync), and the bot's invites."""
    rooms, invites = [], []
    for room_id, room in (body.get("rooms") or {}).items():
        if not isinstance(room, dict) or not room.get("initial"):
            continue
        if (invite_state := room.get("invite_state")) is not None:
            invite = next(
                (
                    ev
                    for ev in invite_state
                    if ev.get("type") == "m.room.member"
                    and ev.get("state_key") == bot_id
                    and (ev.get("content") or {}).get("membership") == "invite"
                ),
                None,
            )
            if invite is not None and isinstance(invite.get("sender"), str):
                invites.append((room_id, invite["sender"]))
            continue
        state = room.get("required_state") or []
        own = next(
            (
                ev
                for ev in state
                if ev.get("type") == "m.room.member" and ev.get("state_key") == bot_id
            ),
            None,
        )
        if own is not None and (own.get("content") or {}).get("membership") != "join":
            continue  # left, or banned, since the connection began
        events = [{**ev, "room_id": room_id} for ev in room.get("timeline") or []]
        create = next((ev for ev in (*state, *events) if _is_create(ev)), None)
        room_type = None if create is None else (create.get("content") or {}).get("type")
        if create is not None and not isinstance(room_type, str):
            room_type = ""
        rooms.append(Glimpse(room_id, events, bool(room.get("limited")), room_type, state))
    return Window(rooms, invites)


def first_sync_window(resp: SyncResponse, hs: Homeserver) -> Window:
    """The fallback's single window: a first ``/sync`` of every room."""
    rooms = []
    for room_id, info in resp.rooms.join.items():
        synced = hs.synced_room(room_id)
        rooms.append(
            Glimpse(
                room_id,
                [{**ev.source, "room_id": room_id} for ev in info.timeline.events],
                info.timeline.limited,
                synced.room_type if synced else None,
                [],
            )
        )
    return Window(rooms, invites_of(resp, hs.bot_id))


def next_window(rooms: int, took_s: float, users_waited: bool) -> int:
    """How many rooms the next window adds, after one of ``rooms`` that took ``took_s``: as
    many as fit in ``WINDOW_COST_S`` at that cost, at most twice as many (a cost measured on
    a few rooms is rough); half that when users' updates were just handled (their next
    requests may come while the window is out). Within ``LEAST_WINDOW`` and ``WINDOW``."""
    fit = min(2 * rooms, int(rooms * WINDOW_COST_S / max(took_s, 1e-3)))
    if users_waited:
        fit //= 2
    return min(WINDOW, max(LEAST_WINDOW, fit))


def unsupported(err: HomeserverError) -> bool:
    """The homeserver has no sliding sync (an unknown endpoint: 404 or 405 M_UNRECOGNIZED)."""
    return err.http_status in (404, 405) or err.status == "M_UNRECOGNIZED"


class Sweep:
    """The windows of one start's sweep, most recently active rooms first."""

    def __init__(self, hs: Homeserver, first_sync: Callable[[], Awaitable[SyncResponse]]) -> None:
        self.hs = hs
        self.first_sync = first_sync
        self.sliding = True  # until the homeserver says it has no sliding sync

    async def windows(
        self, give_way: Callable[[], Awaitable[bool]]
    ) -> AsyncGenerator[Window, None]:
        """Every window of a walk from the start (a walk that failed is walked again: the
        caller skips what it already took). Before asking for the next window, ``give_way``
        lets what users wait for go first, and says whether they had any."""
        if self.sliding:
            try:
                async with aclosing(self._sliding(give_way)) as windows:
                    async for window in windows:
                        yield window
                return
            except HomeserverError as err:
                if not unsupported(err):
                    raise
                self.sliding = False
                log.info("sync.sweep_fallback", reason=str(err))
        started = time.monotonic()
        yield first_sync_window(await self.first_sync(), self.hs)
        log.info(
            "sync.swept",
            via="sync",
            windows=1,
            duration_ms=round((time.monotonic() - started) * 1000, 1),
        )

    async def _sliding(
        self, give_way: Callable[[], Awaitable[bool]]
    ) -> AsyncGenerator[Window, None]:
        started, pos, end, windows, waited = time.monotonic(), None, FIRST_WINDOW - 1, 0, 0.0
        size, took, slowest, rested = FIRST_WINDOW, 0.0, 0.0, 0.0
        while True:
            if windows:
                await asyncio.sleep(took * REST)
                rested += took * REST
                paused = time.monotonic()
                users = await give_way()
                waited += time.monotonic() - paused
                size = next_window(size, took, users_waited=users)
                end += size
            asked = time.monotonic()
            body = await self.hs.sliding_sync(
                CONNECTION,
                {
                    LIST: {
                        "ranges": [[0, end]],
                        "timeline_limit": TIMELINE,
                        "required_state": REQUIRED_STATE,
                    }
                },
                pos,
            )
            took = time.monotonic() - asked
            slowest = max(slowest, took)
            log.debug("sync.window", asked=size, took_ms=round(took * 1000, 1))
            window = parse_window(body, self.hs.bot_id)
            for glimpse in window.rooms:  # hints for finding a user's Space (the healer)
                self.hs.note_room(glimpse.room_id, glimpse.room_type, glimpse.state)
            windows += 1
            yield window
            count = ((body.get("lists") or {}).get(LIST) or {}).get("count")
            if not isinstance(count, int) or end + 1 >= count:
                break
            pos = body.get("pos")
        log.info(
            "sync.swept",
            via="sliding_sync",
            windows=windows,
            rooms=count,
            duration_ms=round((time.monotonic() - started) * 1000, 1),
            gave_way_ms=round(waited * 1000, 1),
            rested_ms=round(rested * 1000, 1),
            slowest_ms=round(slowest * 1000, 1),
        )


class JoinedRoomsSweep:
    """The sweep of an appservice, which Synapse lets neither ``/sync`` nor sliding sync (the
    spec has an appservice handle what is pushed instead): the joined rooms, and each room's
    latest events read with ``/messages``, a window of rooms at a time. Each room reads back
    from the position of its own read. Invites the bot had while its state was lost are not
    seen (no API lists them without a sync): the homeserver pushes those it was not
    acknowledged for."""

    READS_AT_ONCE = 16

    def __init__(self, hs: Homeserver) -> None:
        self.hs = hs

    async def windows(
        self, give_way: Callable[[], Awaitable[bool]]
    ) -> AsyncGenerator[Window, None]:
        started = time.monotonic()
        joined = await self.hs.joined_rooms()
        gate = asyncio.Semaphore(self.READS_AT_ONCE)

        async def glimpse(room_id: str) -> Glimpse:
            async with gate:
                latest, position, older = await self.hs.latest(room_id, TIMELINE, TIMELINE_TYPES)
            events = [{**ev, "room_id": room_id} for ev in reversed(latest)]
            return Glimpse(room_id, events, older, None, [], position)

        windows, start, size = 0, 0, FIRST_WINDOW
        while start < len(joined):
            if windows:
                await give_way()
            batch = joined[start : start + size]
            yield Window(list(await asyncio.gather(*(glimpse(rid) for rid in batch))), [])
            windows, start, size = windows + 1, start + size, WINDOW
        log.info(
            "sync.swept",
            via="messages",
            windows=windows,
            rooms=len(joined),
            duration_ms=round((time.monotonic() - started) * 1000, 1),
        )
