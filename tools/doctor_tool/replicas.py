"""The doctor's list of the live replicas of a bot on PostgreSQL (SPEC §10): which one syncs,
how many rooms each holds, and when each was last seen. Read-only, safe while they run."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from core.store.coordination import ReplicaSeen, replicas_seen, sync_holder
from core.store.postgres import connect_pool

DOCTOR_APPLICATION = "lambda-matrix-doctor"  # not the bot's name: the reset tool tells them apart


async def read_replicas(url: str) -> tuple[list[ReplicaSeen], str | None]:
    """The replicas seen within the hour, and the one holding the sync lease (None: none)."""
    pool = await connect_pool(url, DOCTOR_APPLICATION)
    try:
        return await replicas_seen(pool), await sync_holder(pool)
    finally:
        await pool.close()


def as_text(replicas: list[ReplicaSeen], syncing: str | None) -> str:
    now = datetime.now(UTC)
    live = [r for r in replicas if r.live]
    lines = [f"Replicas: {len(live)} live" + (f", {syncing} syncs" if syncing else ", none syncs")]
    for r in replicas:
        ago = (now - r.last_seen).total_seconds()
        role = "syncs" if r.id == syncing else "stands by"
        state = f"{role}, {r.rooms} rooms" if r.live else "gone"
        lines.append(f"  {r.id} (host {r.host}, pid {r.pid}): {state}, last seen {ago:.1f} s ago")
    return "\n".join(lines)


def as_json(replicas: list[ReplicaSeen], syncing: str | None) -> str:
    return json.dumps(
        {
            "syncing": syncing,
            "replicas": [
                {
                    "id": r.id,
                    "host": r.host,
                    "pid": r.pid,
                    "live": r.live,
                    "syncing": r.id == syncing,
                    "rooms": r.rooms,
                    "started_at": r.started_at.isoformat(),
                    "last_seen": r.last_seen.isoformat(),
                }
                for r in replicas
            ],
        },
        indent=2,
    )
