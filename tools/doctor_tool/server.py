"""The homeserver's side, read with the bot's saved session: the rooms the bot is in and
their state. It never logs in (a login makes a new device) and changes nothing."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterable
from functools import partial

from nio import AsyncClient, RoomMessagesResponse
from nio.api import MessageDirection

from adapter.matrix.bot import client_config
from adapter.matrix.config import Config
from adapter.matrix.homeserver.client import Homeserver, HomeserverError
from adapter.matrix.homeserver.session import tool_session

CONCURRENCY = 8  # state requests at once, as the healer's Space heal
PROGRESS_OVER = 20  # rooms: more than this, and a progress line goes to stderr
RENAME_PAGES = 5  # /messages pages read after the sync token, per room, at most


class CannotAsk(Exception):
    """The homeserver cannot be asked: no saved session, a refused token, or no answer."""


def unreadable(err: HomeserverError) -> bool:
    """A room the bot may not read: its state counts as empty, as in the healer."""
    return err.status in ("M_FORBIDDEN", "M_NOT_FOUND")


class ServerReader(Homeserver):
    """The bot's typed calls, on its saved session, plus the one read the bot does not make:
    the renames after its sync position. Counts its requests."""

    def __init__(self, client: AsyncClient, server_name: str) -> None:
        super().__init__(client, server_name)
        self.requests = 0

    @classmethod
    def on_saved_session(cls, config: Config) -> ServerReader:
        session = tool_session(config)
        if session is None:
            raise CannotAsk(
                f"no saved bot session in MATRIX_STORE_PATH ({config.store_path}): "
                "start the bot once, it logs in and saves it (the doctor never logs "
                "in: that would make a new device)"
            )
        client = AsyncClient(config.homeserver, config.user_id, config=client_config())
        client.restore_login(session.user_id, session.device_id, session.access_token)
        return cls(client, config.server_name)

    async def close(self) -> None:
        await self.client.close()

    async def joined(self) -> frozenset[str]:
        self.requests += 1
        try:
            return frozenset(await self.joined_rooms())
        except HomeserverError as err:
            raise _cannot_ask(err) from err

    async def states(self, room_ids: Iterable[str]) -> dict[str, list[dict]]:
        """The state events of each room ([] for one the bot may not read), a few at once."""
        todo = sorted(set(room_ids))
        gate, done, found = asyncio.Semaphore(CONCURRENCY), 0, {}

        async def read(room_id: str) -> None:
            nonlocal done
            async with gate:
                self.requests += 1
                try:
                    found[room_id] = await self.get_state(room_id)
                except HomeserverError as err:
                    if not unreadable(err):
                        raise _cannot_ask(err) from err
                    found[room_id] = []
            done += 1
            if len(todo) > PROGRESS_OVER and (done % PROGRESS_OVER == 0 or done == len(todo)):
                print(f"doctor: read the state of {done}/{len(todo)} rooms", file=sys.stderr)

        await asyncio.gather(*(read(room_id) for room_id in todo))
        return found

    async def renamed_after(self, room_id: str, event_id: str, sync_token: str) -> bool:
        """Whether the ``m.room.name`` event ``event_id`` came after the bot's sync position:
        a rename the bot has not synced yet, so it follows on its next sync."""
        start: str | None = sync_token
        for _ in range(RENAME_PAGES):
            if start is None:
                return False
            self.requests += 1
            try:
                resp = await self._call(
                    "read renames",
                    partial(
                        self.client.room_messages,
                        room_id,
                        start,
                        direction=MessageDirection.front,
                        limit=100,
                        message_filter={"types": ["m.room.name"]},
                    ),
                    RoomMessagesResponse,
                )
            except HomeserverError as err:
                if unreadable(err):
                    return False
                raise _cannot_ask(err) from err
            if any(ev.event_id == event_id for ev in resp.chunk):
                return True
            start = resp.end if resp.chunk else None
        return False


def _cannot_ask(err: HomeserverError) -> CannotAsk:
    if err.status == "M_UNKNOWN_TOKEN":
        return CannotAsk(
            f"the homeserver refused the saved session's token ({err}): the bot "
            "logs in again on its next start; run the doctor after that"
        )
    if err.status == "unreachable":
        return CannotAsk(
            f"the homeserver did not answer ({err}): is MATRIX_HOMESERVER right, and is it up?"
        )
    return CannotAsk(f"the homeserver refused a read ({err})")
