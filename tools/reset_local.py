"""Dev reset: put the bot's local state back to a clean room, explicitly and repeatably.

    python tools/reset_local.py [--dry-run] [--yes] [--backup DIR] [--server]

Reads the bot's environment (LAMBDA_MATRIX_DB, MATRIX_STORE_PATH; MATRIX_HOMESERVER and
MATRIX_USER_ID for --server). Exit codes: 0 done, 1 refused or failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapter.matrix.config import Config, ConfigError, local_paths  # noqa: E402
from adapter.matrix.room_state import CHAT_MARKER, SPACE_MARKER, RoomSnapshot  # noqa: E402
from adapter.matrix.session import load_session  # noqa: E402
from adapter.matrix.store import MatrixStore  # noqa: E402
from core.store import ProcessLock, SQLiteStore, StoreLocked  # noqa: E402

DONE, REFUSED, USAGE = 0, 1, 2


class UsageError(Exception):
    pass


@dataclass
class KnownRoom:
    room_id: str
    kind: str
    owner: str
    name: str


@dataclass
class Plan:
    """What exists locally, read without changing anything."""

    db_path: Path
    store_path: Path
    files: list[tuple[Path, int]] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    rooms: list[KnownRoom] = field(default_factory=list)
    unreadable: str | None = None

    @property
    def empty(self) -> bool:
        return not self.files


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def db_files(db_path: Path) -> list[Path]:
    return [Path(f"{db_path}{suffix}") for suffix in ("", "-wal", "-shm")]


def make_plan(db_path: Path, store_path: Path) -> Plan:
    plan = Plan(db_path, store_path)
    for path in [*db_files(db_path), store_path]:
        if path.exists():
            plan.files.append((path, _size(path)))
    if db_path.exists():
        try:
            records = _read_records(db_path)
        except (sqlite3.Error, ValueError) as err:
            plan.unreadable = str(err)
        else:
            _describe(plan, records)
    return plan


def _read_records(db_path: Path) -> dict[str, object]:
    # Read a copy, so that even SQLite's WAL bookkeeping leaves the real files untouched.
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "copy.db"
        for src in db_files(db_path):
            if src.exists():
                shutil.copy2(src, str(copy) + src.name[len(db_path.name):])
        conn = sqlite3.connect(copy)
        try:
            rows = conn.execute("SELECT key, value FROM kv").fetchall()
        finally:
            conn.close()
    return {key: json.loads(value) for key, value in rows}


def _describe(plan: Plan, records: dict[str, object]) -> None:
    for key in records:
        plan.counts[key.split(":", 1)[0]] += 1
    for key, meta in records.items():
        if not key.startswith("matrix_room:") or not isinstance(meta, dict):
            continue
        room_id = key.removeprefix("matrix_room:")
        kind, owner = meta.get("kind", "?"), meta.get("owner", "?")
        chat = records.get(f"chat:{owner}:{meta.get('chat_id')}")
        name = {"space": "Lambda (Space)", "lobby": "lobby (not created by the bot)"}.get(
            kind, chat.get("title", "?") if isinstance(chat, dict) else "?")
        plan.rooms.append(KnownRoom(room_id, kind, owner, name))
    plan.rooms.sort(key=lambda r: (r.owner, r.kind != "space", r.name))


def print_plan(plan: Plan) -> None:
    print("Local state:")
    if plan.empty:
        print("  nothing: no database and no session directory.")
    for path, size in plan.files:
        print(f"  {path}  ({size:,} bytes)")
    if plan.unreadable:
        print(f"  the database is unreadable ({plan.unreadable}); it will be removed all the same.")
    if plan.counts:
        print("  records: " + ", ".join(f"{n} {kind}" for kind, n in sorted(plan.counts.items())))
    owner = None
    for room in plan.rooms:
        if room.owner != owner:
            owner = room.owner
            print(f"  {owner}:")
        print(f"    {room.kind:6} {room.room_id}  {room.name}")


def print_server_steps(plan: Plan, server_done: bool) -> None:
    if server_done:
        return
    print("\nServer side (untouched):")
    print("  a) Keep the rooms: the bot heals each one lazily on its next message.")
    print("  b) For a true clean room, leave these in your Matrix client "
          "(or rerun with --server):")
    made = [r for r in plan.rooms if r.kind in ("space", "chat")]
    for room in made:
        print(f"       {room.room_id}  {room.name}  ({room.owner})")
    if not made:
        print("       (the database knew no rooms; --server finds them on the homeserver)")


def confirm(question: str) -> bool:
    try:
        return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")
    except EOFError:
        return False


def remove_local(plan: Plan, backup: Path | None) -> Path | None:
    target = None
    if backup is not None:
        target = backup / time.strftime("reset-%Y%m%d-%H%M%S")
        target.mkdir(parents=True, exist_ok=False)
    for path, _ in plan.files:
        if target is not None:
            shutil.move(str(path), target / path.name)
        elif path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return target


async def write_reset_marker(db_path: Path) -> None:
    store = await SQLiteStore.open(db_path)
    try:
        await MatrixStore(store).set_reset_marker(
            {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "by": "reset_local"})
    finally:
        await store.close()


async def server_cleanup(config: Config) -> bool:
    """Kick the users from, leave and forget every room the bot made (by its markers), then
    log out the bot's device. Returns False if any step failed."""
    from nio import AsyncClient, JoinedRoomsResponse, RoomGetStateResponse

    session = load_session(config)
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
            marked = any((ev := snap.get(t)) and ev.sender == client.user_id and ev.content
                         for t in (SPACE_MARKER, CHAT_MARKER))
            if snap.creator != client.user_id or not marked:
                print(f"  {room_id}: not created by the bot (or no marker); left alone")
                continue
            ok &= await _clean_room(client, room_id, snap.members(client.user_id))
        if ok:
            await client.logout()
            print(f"  logged out device {session.device_id}")
        else:  # keep the session, so that running the tool again can finish the job
            print(f"  device {session.device_id} kept logged in, to retry")
    finally:
        await client.close()
    return ok


async def _clean_room(client, room_id: str, members: list[str]) -> bool:
    from nio import ErrorResponse

    done = []
    steps = [(f"kick {m}", lambda m=m: client.room_kick(room_id, m, reason="Lambda dev reset"))
             for m in members]
    steps += [("leave", lambda: client.room_leave(room_id)),
              ("forget", lambda: client.room_forget(room_id))]
    for what, call in steps:
        resp = await call()
        if isinstance(resp, ErrorResponse):
            print(f"  {room_id}: {what} failed: {resp.status_code} {resp.message}")
            return False
        done.append(what)
    print(f"  {room_id}: {', '.join(done)}")
    return True


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    parser.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    parser.add_argument("--backup", type=Path, metavar="DIR",
                        help="move the files into a timestamped folder in DIR instead of deleting")
    parser.add_argument("--server", action="store_true",
                        help="also kick, leave and forget every room the bot created, "
                             "then log out its device")
    try:
        return parser.parse_args(argv)
    except SystemExit as exit_:
        if exit_.code:  # argparse has printed the usage error
            raise UsageError() from None
        raise


def run(argv: list[str]) -> int:
    try:
        args = parse_args(argv)
    except UsageError:
        return USAGE
    db_path, store_path = local_paths()
    config = None
    if args.server:
        try:
            config = Config.from_env(need_credentials=False)
        except ConfigError as err:
            print(f"--server needs the bot's environment: {err}", file=sys.stderr)
            return USAGE
    if not db_path.parent.is_dir():
        print(f"Refused: the folder of LAMBDA_MATRIX_DB ({db_path.parent}) does not exist; "
              "check the variable.", file=sys.stderr)
        return REFUSED
    lock = ProcessLock(db_path)
    try:
        lock.acquire()
    except StoreLocked:
        print(f"Refused: a bot (pid {lock.holder_pid()}) is using {db_path}.\n"
              f"Stop it first (Ctrl-C in its terminal, or `kill -TERM {lock.holder_pid()}`), "
              "then run this again.", file=sys.stderr)
        return REFUSED
    try:
        return _reset(args, config, make_plan(db_path, store_path))
    except OSError as err:
        print(f"Failed: {err}", file=sys.stderr)
        return REFUSED
    finally:
        lock.release()


def _reset(args: argparse.Namespace, config: Config | None, plan: Plan) -> int:
    print_plan(plan)
    if args.dry_run:
        print_server_steps(plan, server_done=False)
        print("\nDry run: nothing was changed.")
        return DONE
    if not args.yes and not confirm("\nDelete this local state" +
                                    (f" (moved to {args.backup})" if args.backup else "") + "?"):
        print("Nothing changed.")
        return REFUSED
    if config is not None:
        if not args.yes and not confirm("Also kick, leave and forget every room the bot "
                                        "created on the homeserver, and log out its device?"):
            print("Nothing changed.")
            return REFUSED
        print("\nServer side:")
        if not asyncio.run(server_cleanup(config)):
            print("Some server-side steps failed (see above); the local state is left as it "
                  "was, so running this again retries them.", file=sys.stderr)
            return REFUSED
    moved_to = remove_local(plan, args.backup)
    asyncio.run(write_reset_marker(plan.db_path))
    print(f"\nLocal state {'moved to ' + str(moved_to) if moved_to else 'deleted'}; "
          f"a fresh {plan.db_path} holds the reset marker, so the next heals log "
          "cause=local_reset.")
    print_server_steps(plan, server_done=config is not None)
    return DONE


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
