"""What the reset tool tells the user: what exists, what it will do, what it leaves."""

from __future__ import annotations

from pathlib import Path

from reset_tool.facts import DbFacts, KnownRoom, LocalFacts, StoreFacts
from reset_tool.plan import ResetPlan

MAX_KEPT_SHOWN = 12


def print_state(facts: LocalFacts) -> None:
    print("Local state:")
    _print_db(facts.db)
    _print_store(facts.store)


def _print_db(db: DbFacts) -> None:
    what = {
        "missing": "none",
        "bot": "the bot's database",
        "empty": "an empty file (nothing in it to lose)",
        "foreign": f"NOT the bot's database ({db.detail})",
        "not_sqlite": f"NOT an SQLite database ({db.detail})",
        "unreadable": f"cannot be read ({db.detail})",
        "directory": "a directory, not a database file",
    }[db.kind]
    print(f"  LAMBDA_MATRIX_DB {db.path}: {what}")
    for f in db.files:
        print(f"    {f.path}  ({f.size:,} bytes)")
    if db.damaged:
        print(f"    damaged ({db.damaged}): its records cannot be listed")
    if db.counts:
        print("    records: " + ", ".join(f"{n} {kind}" for kind, n in sorted(db.counts.items())))
    owner = None
    for room in db.rooms:
        if room.owner != owner:
            owner = room.owner
            print(f"    {owner}:")
        print(f"      {room.kind:6} {room.room_id}  {room.name}")


def _print_store(store: StoreFacts) -> None:
    what = {
        "missing": "none",
        "not_dir": "not a folder",
        "dir": f"a folder of {len(store.entries)} entries",
    }[store.kind]
    print(f"  MATRIX_STORE_PATH {store.path}: {what}")


def print_plan(plan: ResetPlan, backup: Path | None) -> None:
    verb = "move" if backup else "delete"
    print(f"\nPlan{f' (files moved to a new folder in {backup})' if backup else ''}:")
    for removal in plan.removals:
        print(f"  {verb:6} {removal.path}  ({removal.size:,} bytes)")
    if plan.remove_store_dir:
        print(f"  remove the folder {plan.remove_store_dir} (empty by then)")
    for kept in plan.kept[:MAX_KEPT_SHOWN]:
        print(f"  leave  {kept.path}: {kept.reason}")
    if len(plan.kept) > MAX_KEPT_SHOWN:
        print(f"  leave  … and {len(plan.kept) - MAX_KEPT_SHOWN} more entries not the bot's")
    if plan.forced:
        print(f"  --force: {plan.forced}; it is {verb}d all the same.")
    print("  then create a fresh database that records its birth (cause local_reset)")


def print_server_steps(rooms: tuple[KnownRoom, ...]) -> None:
    print("\nServer side (untouched):")
    print("  a) Keep the rooms: the bot heals each one lazily on its next message.")
    print("  b) For a true clean room, leave these in your Matrix client (or rerun with --server):")
    made = [r for r in rooms if r.kind in ("space", "chat")]
    for room in made:
        print(f"       {room.room_id}  {room.name}  ({room.owner})")
    if not made:
        print("       (the database knew no rooms; --server finds them on the homeserver)")
