"""One examination: the homeserver read, then the DB, compared; then a second look at the
differences a bot at work shows for an instant. Read-only on both sides."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from adapter.matrix.config import Config
from doctor_tool.compare import Finding, ServerRooms, compare, in_report_order, parents_to_read
from doctor_tool.diagnosis import Diagnosis, inbox_summary
from doctor_tool.local import LocalRecords, read_local, read_remote
from doctor_tool.server import ServerReader

# The bot writes the homeserver first and its DB after: a room made, renamed or archived
# just now differs for the time of a request or two. A difference still there this much
# later, on a fresh read of both sides, is reported.
SECOND_LOOK_AFTER_S = 1.0


async def examine(config: Config) -> Diagnosis:
    """Compare the DB at ``LAMBDA_MATRIX_DB`` with the homeserver. Raises ``DbUnusable`` or
    ``CannotAsk`` when it cannot."""
    await read_store(config)  # an unusable DB is told before any request
    reader = ServerReader.on_saved_session(config)
    try:
        server = await _read_server(reader, config.user_id, None)
        # Read after the server: what the bot did there before is in the DB by now, mostly.
        local = await read_store(config)
        findings = await _compare(reader, local, server, config.user_id)
        doubtful = {f.room_id for f in findings if f.doubtful and f.room_id}
        if doubtful:
            await asyncio.sleep(SECOND_LOOK_AFTER_S)
            server = await _read_server(reader, config.user_id, doubtful, server)
            local = await read_store(config)
            again = await _compare(reader, local, server, config.user_id, doubtful)
            findings = [f for f in findings if f.room_id not in doubtful] + again
        return Diagnosis(
            local.birth,
            inbox_summary(local.inbox, time.time()),
            tuple(in_report_order(findings)),
            reader.requests,
        )
    finally:
        await reader.close()


async def read_store(config: Config) -> LocalRecords:
    """The bot's records, from its SQLite file or its PostgreSQL database, read-only."""
    if config.db_url is not None:
        return await read_remote(config.db_url)
    return read_local(config.db_path)


async def _read_server(
    reader: ServerReader, bot_id: str, only: set[str] | None, before: ServerRooms | None = None
) -> ServerRooms:
    """The joined rooms and the state of each (``only``: of these, over ``before``), plus
    the parent Spaces the decision needs."""
    joined = await reader.joined()
    wanted = joined if only is None else joined & only
    server = ServerRooms(
        joined, {**(before.states if before else {}), **await reader.states(wanted)}
    )
    if parents := parents_to_read(server, bot_id):
        server = replace(server, states={**server.states, **await reader.states(parents)})
    return server


async def _compare(
    reader: ServerReader,
    local: LocalRecords,
    server: ServerRooms,
    bot_id: str,
    only: set[str] | None = None,
) -> list[Finding]:
    """``compare``, asking the server whether the owner's renames behind title mismatches
    came after the bot's sync position (then the bot follows them by itself)."""
    findings = compare(local, server, bot_id, only)
    renames = [(f.room_id, f.rename) for f in findings if f.rename and f.room_id]
    if not renames or local.sync_token is None:
        return findings
    unsynced = {
        event_id
        for room_id, event_id in renames
        if await reader.renamed_after(room_id, event_id, local.sync_token)
    }
    return compare(local, replace(server, unsynced=frozenset(unsynced)), bot_id, only)
