"""Dev reset: put the bot's local state back to a clean room, explicitly and repeatably.

    python tools/reset_local.py [--dry-run] [--yes] [--backup DIR] [--server] [--force]

Reads the bot's environment (LAMBDA_MATRIX_DB, MATRIX_STORE_PATH; MATRIX_HOMESERVER and
MATRIX_USER_ID for --server). Deletes only what is the bot's: its SQLite file (judged by
schema), or on a postgresql:// URL its own tables, and the files it writes in
MATRIX_STORE_PATH. Exit codes: 0 done, 1 refused or failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reset_tool.facts import LocalFacts, inspect_local
from reset_tool.local import ResetLock, carry_out, create_fresh_db
from reset_tool.plan import plan_reset
from reset_tool.remote import reset_remote
from reset_tool.report import print_plan, print_server_steps, print_state
from reset_tool.server import agree_and_clean_server

from adapter.matrix.config import Config, ConfigError, db_location, local_paths
from core.store import StoreLocked, is_postgres_url

DONE, REFUSED, USAGE = 0, 1, 2


class UsageError(Exception):
    pass


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    parser.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    parser.add_argument(
        "--backup",
        type=Path,
        metavar="DIR",
        help="move the files into a timestamped folder in DIR instead of deleting "
        "(on PostgreSQL: write the bot's rows there as JSON lines first)",
    )
    parser.add_argument(
        "--server",
        action="store_true",
        help="also kick, leave and forget every room the bot created, then log out its device",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="delete the file at LAMBDA_MATRIX_DB even when it is not the bot's "
        "database (or is too damaged to tell)",
    )
    try:
        return parser.parse_args(argv)
    except SystemExit as exit_:
        if exit_.code:  # argparse has printed the usage error
            raise UsageError() from None
        raise


def confirm(question: str) -> bool:
    try:
        return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")
    except EOFError:
        return False


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
    if is_postgres_url(location := db_location()):
        return asyncio.run(reset_remote(args, location, store_path, config, confirm))
    if not db_path.parent.is_dir():
        print(
            f"Refused: the folder of LAMBDA_MATRIX_DB ({db_path.parent}) does not exist; "
            "check the variable.",
            file=sys.stderr,
        )
        return REFUSED
    lock = ResetLock(db_path)
    try:
        lock.acquire()
    except StoreLocked:
        print(
            f"Refused: a bot (pid {lock.holder_pid()}) is using {db_path}.\n"
            f"Stop it first (Ctrl-C in its terminal, or `kill -TERM {lock.holder_pid()}`), "
            "then run this again.",
            file=sys.stderr,
        )
        return REFUSED
    try:
        return _reset(args, config, inspect_local(db_path, store_path), lock)
    except OSError as err:
        print(f"Failed: {err}", file=sys.stderr)
        return REFUSED
    finally:
        lock.release()


def _reset(
    args: argparse.Namespace, config: Config | None, facts: LocalFacts, lock: ResetLock
) -> int:
    plan = plan_reset(facts, force=args.force)
    print_state(facts)
    if plan.refusal:
        print(f"\nRefused, nothing changed: {plan.refusal}", file=sys.stderr)
        return REFUSED
    print_plan(plan, args.backup)
    stop = asyncio.run(agree_and_clean_server(args, config, facts.db.rooms, confirm))
    if stop is not None:
        return stop
    moved_to = carry_out(plan, args.backup)
    asyncio.run(create_fresh_db(facts.db.path))
    lock.discard = True
    print(
        f"\nLocal state {'moved to ' + str(moved_to) if moved_to else 'deleted'}"
        f"{', except what the plan leaves' if plan.kept else ''}; a fresh "
        f"{facts.db.path} records its birth, so heals of older rooms log cause=local_reset."
    )
    if config is None:
        print_server_steps(facts.db.rooms)
    return DONE


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
