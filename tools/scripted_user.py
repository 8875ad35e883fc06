"""A scripted Matrix user for the demo and the benchmarks: sends, and waits for the bot."""

from __future__ import annotations

import time
from collections import defaultdict

from nio import (
    AsyncClient,
    RoomCreateResponse,
    RoomGetEventResponse,
    RoomMessagesResponse,
    RoomSendResponse,
    SyncResponse,
)

from adapter.matrix.handlers.chat_rooms import (
    linked_rooms,  # the caller puts the repository on sys.path
)

SOURCE_KEY = "io.lambda.source"  # in every bot reply: the event it answers (SPEC §3)
# Synapse's default timeline limit is 10: a round with more events would hide some of them.
SYNC_FILTER = {"room": {"timeline": {"limit": 1000}}, "presence": {"not_types": ["*"]}}


class ScriptedUser:
    def __init__(self, client: AsyncClient, bot_id: str) -> None:
        self.client, self.bot_id, self.since = client, bot_id, None
        self.timeline: dict[str, list[dict]] = defaultdict(list)  # every event synced, in order

    @classmethod
    async def log_in(
        cls, homeserver: str, user_id: str, password: str, bot_id: str
    ) -> ScriptedUser:
        client = AsyncClient(homeserver, user_id)
        await client.login(password)
        return cls(client, bot_id)

    async def _drain(self, timeout_ms: int) -> list[tuple[str, dict]]:
        """One sync; joins every room it is invited to; returns (room_id, event) pairs."""
        resp = await self.client.sync(timeout=timeout_ms, since=self.since, sync_filter=SYNC_FILTER)
        assert isinstance(resp, SyncResponse), resp
        self.since = resp.next_batch
        for room_id in resp.rooms.invite:
            await self.client.join(room_id)
        events = [
            (rid, ev.source) for rid, info in resp.rooms.join.items() for ev in info.timeline.events
        ]
        for rid, ev in events:
            self.timeline[rid].append(ev)
        return events

    async def invite_bot(self) -> str:
        resp = await self.client.room_create(name="lobby", invite=[self.bot_id])
        assert isinstance(resp, RoomCreateResponse), resp
        return resp.room_id

    async def onboard(self) -> tuple[str, str, str]:
        """Invite the bot to a lobby, join the Space and first chat it makes:
        (lobby, space, chat)."""
        lobby = await self.invite_bot()
        welcome = await self.wait_for_bot(lobby, "Space")
        space, chat = linked_rooms(welcome)[:2]
        for room_id in (space, chat):  # a no-op when _drain joined it already
            await self.client.join(room_id)
        return lobby, space, chat

    async def send(self, room_id: str, body: str) -> str:
        resp = await self.client.room_send(
            room_id, "m.room.message", {"msgtype": "m.text", "body": body}
        )
        assert isinstance(resp, RoomSendResponse), resp
        return resp.event_id

    async def origin_ts(self, room_id: str, event_id: str) -> int:
        """The homeserver's timestamp of an event (from the synced timeline, else fetched)."""
        ev = next((ev for ev in self.timeline[room_id] if ev.get("event_id") == event_id), None)
        if ev is None:
            resp = await self.client.room_get_event(room_id, event_id)
            assert isinstance(resp, RoomGetEventResponse), resp
            ev = resp.event.source
        return ev["origin_server_ts"]

    def answers(self, room_id: str) -> list[dict]:
        """The bot's replies in ``room_id`` that name their source event, in timeline order."""
        return [
            ev
            for ev in self.timeline[room_id]
            if ev.get("sender") == self.bot_id and SOURCE_KEY in (ev.get("content") or {})
        ]

    async def wait_answers(
        self, room_id: str, sources: list[str], timeout: float = 60
    ) -> dict[str, dict]:
        """The bot's reply to each of ``sources`` (event ids), as synced; on timeout, what
        was found so far."""
        wanted = set(sources)
        deadline = time.monotonic() + timeout
        while True:
            found = {
                ev["content"][SOURCE_KEY]: ev
                for ev in self.answers(room_id)
                if ev["content"][SOURCE_KEY] in wanted
            }
            if len(found) == len(wanted) or time.monotonic() > deadline:
                return found
            await self._drain(2_000)

    async def history(self, room_id: str, count: int) -> list[dict]:
        """The room's last ``count`` messages, oldest first, as /messages pages them (the
        room's own order, whatever the syncs showed)."""
        events: list[dict] = []
        token = self.since
        while token and len(events) < count:
            resp = await self.client.room_messages(
                room_id,
                token,
                limit=min(100, count - len(events)),
                message_filter={"types": ["m.room.message"]},
            )
            assert isinstance(resp, RoomMessagesResponse), resp
            events += [ev.source for ev in resp.chunk]
            token = resp.end if resp.chunk else None
        return events[::-1]

    async def wait_for_bot(self, room_id: str, expect: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for rid, ev in await self._drain(5_000):
                text = ev.get("content", {}).get("body", "")
                if rid == room_id and ev.get("sender") == self.bot_id and expect in text:
                    return text
        raise TimeoutError(f"the bot did not say {expect!r} in {room_id}")

    async def ask(self, room_id: str, body: str, expect: str) -> tuple[float, str]:
        """Seconds from sending ``body`` to the bot's answer containing ``expect``, and it."""
        await self._drain(0)
        started = time.perf_counter()
        await self.send(room_id, body)
        text = await self.wait_for_bot(room_id, expect)
        return time.perf_counter() - started, text

    async def close(self) -> None:
        await self.client.close()
