"""The opt-in server side of a reset (--server), with the bot's saved session."""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from nio import AsyncClient, ErrorResponse, JoinedRoomsResponse, RoomGetStateResponse

from adapter.matrix.config import Config
from adapter.matrix.healing.room_state import RoomSnapshot
from adapter.matrix.homeserver.session import tool_session

KICK_REASON = "Lambda dev reset"


async def server_cleanup(config: Config) -> bool:
    """Kick the users from, leave and forget every room the bot created (by the sender of
    ``m.room.create``, markers or not), then log out the bot's device. False if a step
    failed; the device then stays logged in, so that running the tool again finishes."""
    session = tool_session(config)
    if session is None:
        print(f"No saved bot session in {config.store_path}: --server needs it.", file=sys.stderr)
        return False
    client = AsyncClient(config.homeserver, config.user_id)
    client.restore_login(session.user_id, session.device_id, session.access_token)
    ok = True
    try:
        joined = await client.joined_rooms()
        if not isinstance(joined, JoinedRoomsResponse):
            print(f"Cannot list the bot's rooms: {joined.message}", file=sys.stderr)
            return False
        for room_id in joined.rooms:
            state = await client.room_get_state(room_id)
            if not isinstance(state, RoomGetStateResponse):
                print(f"  {room_id}: cannot read state ({state.message}); skipped")
                ok = False
                continue
            snap = RoomSnapshot.from_events(room_id, state.events)
            if snap.creator != client.user_id:
                print(f"  {room_id}: not created by the bot; left alone")
                continue
            ok &= await _clean_room(client, room_id, snap.members(client.user_id))
        if ok and not session.device_id:
            print("  no device to log out (appservice mode)")
        elif ok:
            await client.logout()
            print(f"  logged out device {session.device_id}")
        else:
            print(f"  device {session.device_id} kept logged in, to retry")
    finally:
        await client.close()
    return ok


async def _clean_room(client: AsyncClient, room_id: str, members: list[str]) -> bool:
    steps: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
        (f"kick {m}", partial(client.room_kick, room_id, m, reason=KICK_REASON)) for m in members
    ]
    steps += [
        ("leave", lambda: client.room_leave(room_id)),
        ("forget", lambda: client.room_forget(room_id)),
    ]
    for what, call in steps:
        resp = await call()
        if isinstance(resp, ErrorResponse):
            print(f"  {room_id}: {what} failed: {resp.status_code} {resp.message}")
            return False
    print(f"  {room_id}: {', '.join(what for what, _ in steps)}")
    return True
