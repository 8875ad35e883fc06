"""A scripted Matrix user for the demo and the benchmark: sends, and waits for the bot."""

from __future__ import annotations

import time

from nio import AsyncClient, RoomCreateResponse, SyncResponse


class ScriptedUser:
    def __init__(self, client: AsyncClient, bot_id: str) -> None:
        self.client, self.bot_id, self.since = client, bot_id, None

    @classmethod
    async def log_in(cls, homeserver: str, user_id: str, password: str,
                     bot_id: str) -> ScriptedUser:
        client = AsyncClient(homeserver, user_id)
        await client.login(password)
        return cls(client, bot_id)

    async def _drain(self, timeout_ms: int) -> list[tuple[str, dict]]:
        """One sync; joins every room it is invited to; returns (room_id, event) pairs."""
        resp = await self.client.sync(timeout=timeout_ms, since=self.since)
        assert isinstance(resp, SyncResponse), resp
        self.since = resp.next_batch
        for room_id in resp.rooms.invite:
            await self.client.join(room_id)
        return [(rid, ev.source) for rid, info in resp.rooms.join.items()
                for ev in info.timeline.events]

    async def invite_bot(self) -> str:
        resp = await self.client.room_create(name="lobby", invite=[self.bot_id])
        assert isinstance(resp, RoomCreateResponse), resp
        return resp.room_id

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
        await self.client.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": body})
        text = await self.wait_for_bot(room_id, expect)
        return time.perf_counter() - started, text

    async def close(self) -> None:
        await self.client.close()
