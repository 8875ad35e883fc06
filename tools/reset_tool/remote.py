"""The reset on PostgreSQL (``LAMBDA_MATRIX_DB`` is a URL): the bot's own tables go, and
nothing else in the database; the session files in MATRIX_STORE_PATH go as on SQLite.

Refused while any bot is connected to the database (pg_stat_activity, by the bot's
application_name). The tables are dropped and made anew, with a birth record that says
``local_reset``, in one transaction; ``--backup DIR`` first writes their rows as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import asyncpg

from adapter.matrix.config import Config
from core.store import StoreError, redact_url, scrub
from core.store.postgres import (
    BOT_APPLICATION,
    BOT_TABLES,
    KV_TABLE,
    all_rows,
    bot_connections,
    connect_tool,
    reset_tables,
    schema_version,
)
from reset_tool.facts import DbFacts, LocalFacts, inspect_store, known_rooms
from reset_tool.local import backup_folder, carry_out
from reset_tool.plan import plan_reset
from reset_tool.report import print_plan, print_server_steps
from reset_tool.server import agree_and_clean_server

DONE, REFUSED = 0, 1
FIND_THE_BOT = (
    "Each is a `python -m adapter.matrix` process with this LAMBDA_MATRIX_DB. To find them, "
    f"in psql: SELECT pid, client_addr, backend_start FROM pg_stat_activity WHERE "
    f"application_name LIKE '{BOT_APPLICATION}%'; then stop each (Ctrl-C in its terminal, or "
    "kill -TERM on its host), and run this again."
)


async def reset_remote(
    args: argparse.Namespace,
    url: str,
    store_path: Path,
    config: Config | None,
    confirm: Callable[[str], bool],
) -> int:
    """The reset of ``url`` (and of the session files in ``store_path``); ``config`` is set
    for --server. Returns the exit code."""
    shown = redact_url(url)
    try:
        conn = await connect_tool(url, "lambda-matrix-reset")
    except StoreError as err:
        print(f"Refused: {err}", file=sys.stderr)
        return REFUSED
    try:
        return await _reset(args, url, shown, conn, store_path, config, confirm)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as err:
        print(f"Failed, nothing changed in {shown}: {scrub(str(err), url)}", file=sys.stderr)
        return REFUSED
    finally:
        await conn.close()


async def _refused_for_bots(conn: asyncpg.Connection, shown: str) -> bool:
    bots = await bot_connections(conn)
    if not bots:
        return False
    print(f"Refused: {len(bots)} bot connection(s) use {shown}:", file=sys.stderr)
    for bot in bots:
        where = bot["client_hostname"] or bot["client_addr"] or "the local socket"
        since = f"{bot['backend_start']:%Y-%m-%d %H:%M:%S %Z}"
        print(f"  backend pid {bot['pid']} from {where}, since {since}", file=sys.stderr)
    print(FIND_THE_BOT, file=sys.stderr)
    return True


async def _reset(
    args: argparse.Namespace,
    url: str,
    shown: str,
    conn: asyncpg.Connection,
    store_path: Path,
    config: Config | None,
    confirm: Callable[[str], bool],
) -> int:
    if await _refused_for_bots(conn, shown):
        return REFUSED
    version = await schema_version(conn)
    rows = await all_rows(conn) if version is not None else {}
    records = {}
    for key, raw in rows.items():
        try:
            records[key] = json.loads(raw)
        except ValueError:
            records[key] = None
    rooms = known_rooms(records)
    # The session folder is planned as on SQLite; the database is not a file of it.
    facts = LocalFacts(DbFacts(Path(shown), "missing"), inspect_store(store_path, Path(shown)))
    plan = plan_reset(facts)

    print("Local state:")
    if version is None:
        print(f"  LAMBDA_MATRIX_DB {shown}: no tables of the bot")
    else:
        tables = ", ".join(BOT_TABLES)
        print(f"  LAMBDA_MATRIX_DB {shown}: the bot's tables {tables} (version {version})")
        counts = Counter(key.split(":", 1)[0] for key in rows)
        print("    records: " + ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())))
        owner = None
        for room in rooms:
            if room.owner != owner:
                owner = room.owner
                print(f"    {owner}:")
            print(f"      {room.kind:6} {room.room_id}  {room.name}")
    print(f"  MATRIX_STORE_PATH {store_path}: {facts.store.kind}")

    if version is not None:
        saved = f", after writing their {len(rows)} rows to {args.backup}" if args.backup else ""
        tables = ", ".join(BOT_TABLES)
        print(f"\nIn {shown}: drop the tables {tables}{saved}; no other table is touched.")
    print_plan(plan, args.backup)
    if (stop := await agree_and_clean_server(args, config, rooms, confirm)) is not None:
        return stop
    if await _refused_for_bots(conn, shown):  # one may have started while we asked
        return REFUSED
    target = None
    if args.backup is not None:
        target = backup_folder(args.backup)
        with (target / f"{KV_TABLE}.jsonl").open("w") as out:
            for key, raw in sorted(rows.items()):
                out.write(json.dumps({"key": key, "value": raw}) + "\n")
    await reset_tables(conn, url)
    carry_out(plan, args.backup, target)
    saved = f"backed up to {target} and " if target else ""
    print(
        f"\nThe bot's tables in {shown} were {saved}made anew; their birth record says "
        "local_reset, so heals of older rooms log cause=local_reset."
    )
    if config is None:
        print_server_steps(rooms)
    return DONE
