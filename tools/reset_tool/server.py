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
from reset_tool.facts import KnownRoom
from reset_tool.report import print_server_steps

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


async def agree_and_clean_server(
    args: Any, config: Config | None, rooms: tuple[KnownRoom, ...], confirm: Callable[[str], bool]
) -> int | None:
    """What both resets (a file, a URL) do once the plan is printed: a dry run stops here; the
    plan is confirmed, then the server side (``--server``: ``config``), which is cleaned up.
    Returns the exit code to stop with, or None when the local part goes on."""
    if args.dry_run:
        print_server_steps(rooms)
        print("\nDry run: nothing was changed.")
        return 0
    if not args.yes and not confirm("\nCarry out this plan?"):
        print("Nothing changed.")
        return 1
    if config is None:
        return None
    if not args.yes and not confirm(
        "Also kick, leave and forget every room the bot "
        "created on the homeserver, and log out its device?"
    ):
        print("Nothing changed.")
        return 1
    print("\nServer side:")
    if not await server_cleanup(config):
        print(
            "Some server-side steps failed (see above); the local state is left as it "
            "was, so running this again retries them.",
            file=sys.stderr,
        )
        return 1
    return None
