"""A sync round -> the updates the bot must handle (SPEC §5, Delivery).

- A resumed sync: every new event; a room whose timeline is ``limited`` first gets the
  events it missed, fetched with ``/messages`` back to the previous sync token.
- A start without a sync token: a first sync that carries no room gives the position the bot
  answers from at once; ``sweep`` then looks at every room's latest events, a window at a
  time in the background (``ingest.sweep``), and a room with an unanswered message reads
  back from that position in its own lane (``catchup``). A sync token the server no longer
  accepts (``sync_token_refused``) leads to the same start.

The rules over raw events are pure functions; ``Ingest`` is their thin I/O shell.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import structlog
from nio import SyncResponse

from adapter.matrix.homeserver.client import Homeserver
from adapter.matrix.ingest import events
from adapter.matrix.ingest.catchup import catch_up, deferred, window_start_ms
from adapter.matrix.ingest.events import READ_TYPES, invites_of, is_own_join, to_update
from adapter.matrix.ingest.sweep import Window
from adapter.matrix.ingest.update import Update
from adapter.matrix.vocabulary.content import SPACE_TYPE

log = structlog.get_logger()

# Who else reads each room's timeline (the conversation): (room id, events, limited).
Observer = Callable[[str, Iterable[dict], bool], None]


def sync_token_refused(http_status: int | None, errcode: str | None, message: str | None) -> bool:
    """Whether a failed ``/sync?since=`` means the server does not accept the token itself.

    Synapse (``StreamToken.from_string``) answers any token it cannot parse with exactly
    ``400 M_UNKNOWN "Invalid stream token"``, and accepts one from the future (bounded to its
    current position). Nothing transient (a 5xx, a 429, no answer) is ever that.
    """
    return (
        http_status == 400
        and errcode == "M_UNKNOWN"
        and (message or "").startswith("Invalid stream token")
    )


def _own_join_index(timeline: list[dict], bot_id: str) -> int | None:
    """Where the bot's last join is in a timeline, if it is there."""
    return next(
        (i for i in range(len(timeline) - 1, -1, -1) if is_own_join(timeline[i], bot_id)), None
    )


@dataclass(frozen=True)
class Backfill:
    events: list[dict]  # oldest first, at most MAX_BACKFILL
    dropped: int  # older missed messages past the bound (counted up to MAX_COUNTED)
    dropped_sender: str | None  # who sent the newest of those


class Ingest:
    """Turns sync responses into updates, fetching what a limited timeline left out."""

    def __init__(
        self, hs: Homeserver, catchup_hours: float, observe: Observer | None = None
    ) -> None:
        self.hs = hs
        self.catchup_hours = catchup_hours
        self.observe = observe or (lambda room_id, events, limited: None)
        self._start: str | None = None  # a start without a token: its first position
        self._caught_up: set[str] = set()  # rooms whose catch-up is decided, in this start
        self._invited: set[str] = set()  # invites handed on since that start
        self.deferred: set[str] = set()  # rooms a start's sweep gave a read back, this run

    def start_without_token(self, position: str) -> None:
        """The first sync had no token and carried no room, to answer at once: until
        ``sweep`` has looked at every room, a room that shows up first reads back from
        ``position`` in its own lane (SPEC §5, Scale)."""
        self._start, self._caught_up, self._invited = position, set(), set()

    async def updates(self, resp: SyncResponse, since: str | None) -> list[Update]:
        """A round's updates, in order: every new event, what a limited timeline left out, and
        during a start's catch-up a room's own read back first."""
        bot_id = self.hs.bot_id
        updates = self._invites(invites_of(resp, bot_id), since)
        for room_id, info in resp.rooms.join.items():
            timeline = [{**ev.source, "room_id": room_id} for ev in info.timeline.events]
            self.observe(room_id, timeline, info.timeline.limited)
            joined = _own_join_index(timeline, bot_id)
            if self._start is not None and room_id not in self._caught_up:
                self._caught_up.add(room_id)
                if joined is None:  # a newly joined room has nothing of the bot's before
                    updates.append(deferred(room_id, self._start))
            if joined is not None:
                timeline = timeline[joined + 1 :]  # newly joined: what came before is not ours
            elif info.timeline.limited and info.timeline.prev_batch and since is not None:
                missed = await self._backfill(room_id, info.timeline.prev_batch, since)
                if missed.dropped:
                    updates.append(
                        Update(
                            "missed",
                            room_id,
                            missed.dropped_sender or "",
                            f"missed|{room_id}|{since}",
                            str(missed.dropped),
                        )
                    )
                timeline = missed.events + timeline
            updates.extend(
                update for ev in timeline if (update := to_update(ev, bot_id)) is not None
            )
        return updates

    def sweep(self, window: Window) -> list[Update]:
        """The start's catch-up over a window of rooms' latest events: a room whose latest
        events show an unanswered message (or cannot tell) reads back from the start's
        position in its own lane, a room with nothing to answer costs nothing more, and the
        invites received while the bot was down are handled."""
        assert self._start is not None, "sweep follows start_without_token"
        updates = self._invites(window.invites, None)
        not_before_ms = window_start_ms(self.catchup_hours)
        for room in window.rooms:
            if room.room_id in self._caught_up:
                continue
            self._caught_up.add(room.room_id)  # at once: a round cannot defer it a second time
            if room.room_type == SPACE_TYPE:
                continue  # nothing in a Space is answered
            found = catch_up(room.events, self.hs.bot_id, not_before_ms)
            if found.answer or (room.limited and not found.conclusive):
                updates.append(deferred(room.room_id, room.position or self._start))
                self.deferred.add(room.room_id)
        log.info(
            "sync.catchup",
            rooms=len(window.rooms),
            deferred=sum(u.kind == "catchup" for u in updates),
            invites=sum(u.kind == "invite" for u in updates),
            hours=self.catchup_hours,
        )
        return updates

    def swept(self) -> None:
        """The sweep's updates are recorded: the start is over."""
        self._start = None

    def _invites(self, invites: Iterable[tuple[str, str]], since: str | None) -> list[Update]:
        """One update per invite (room id, inviter); during a start, once, whichever of the
        sync rounds and the sweep shows it first."""
        updates = []
        for room_id, inviter in invites:
            if self._start is not None:
                if room_id in self._invited:
                    continue
                self._invited.add(room_id)
            updates.append(Update("invite", room_id, inviter, f"invite|{room_id}|{since or ''}"))
        return updates

    async def _backfill(self, room_id: str, start: str, since: str) -> Backfill:
        """The events between the previous sync and this limited timeline, oldest first."""
        bot_id = self.hs.bot_id
        kept: list[dict] = []
        dropped, dropped_sender = 0, None
        token: str | None = start
        while token and dropped < events.MAX_COUNTED:
            page, token = await self.hs.messages(room_id, token, since, events.PAGE, READ_TYPES)
            for ev in ({**raw, "room_id": room_id} for raw in page):
                if is_own_join(ev, bot_id):
                    token = None
                    break
                if to_update(ev, bot_id) is None:
                    continue
                if len(kept) < events.MAX_BACKFILL:
                    kept.append(ev)
                else:
                    dropped += 1
                    dropped_sender = dropped_sender or ev.get("sender")
        if kept:
            log.info("sync.gap_backfilled", room_id=room_id, events=len(kept))
        if dropped:
            log.warning("sync.timeline_gap", room_id=room_id, handled=len(kept), unanswered=dropped)
        return Backfill(kept[::-1], dropped, dropped_sender)
