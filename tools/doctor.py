"""The doctor: compares the bot's local DB with the homeserver, and changes nothing.

    python tools/doctor.py [--json]
    python tools/doctor.py --replicas [--json]   (LAMBDA_MATRIX_DB=postgresql://…)

Reads the bot's environment (MATRIX_HOMESERVER, MATRIX_USER_ID, LAMBDA_MATRIX_DB,
MATRIX_STORE_PATH) and uses its saved session; it never logs in. Safe while the bot runs.
Exit codes: 0 everything agrees or heals by itself, 1 a difference will not heal by itself
(suspect a bug), 2 bad usage or it cannot run.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg
from doctor_tool import replicas
from doctor_tool.examine import examine
from doctor_tool.local import DbUnusable
from doctor_tool.report import as_json, as_text
from doctor_tool.server import CannotAsk

from adapter.matrix.config import Config, ConfigError
from core.log_setup import configure_logging
from core.store import scrub

AGREES, WILL_NOT_HEAL, CANNOT_RUN = 0, 1, 2


def parse_args(argv: list[str]) -> argparse.Namespace | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of the report"
    )
    parser.add_argument(
        "--replicas",
        action="store_true",
        help="list the live replicas on PostgreSQL: which syncs, rooms held, last seen",
    )
    try:
        return parser.parse_args(argv)
    except SystemExit as exit_:
        if exit_.code:  # argparse has printed the usage error
            return None
        raise


def run(argv: list[str]) -> int:
    args = parse_args(argv)
    if args is None:
        return CANNOT_RUN
    try:
        config = Config.from_env(need_credentials=False)
    except ConfigError as err:
        print(f"doctor: the bot's environment is not usable: {err}", file=sys.stderr)
        return CANNOT_RUN
    configure_logging(config.log_format, config.log_level)
    if args.replicas:
        return show_replicas(config, args.json)
    try:
        diagnosis = asyncio.run(examine(config))
    except (DbUnusable, CannotAsk) as err:
        print(f"doctor: cannot run: {err}", file=sys.stderr)
        return CANNOT_RUN
    print(
        as_json(diagnosis)
        if args.json
        else as_text(diagnosis, config.user_id, config.homeserver, config.db_shown)
    )
    return AGREES if diagnosis.heals_by_itself else WILL_NOT_HEAL


def show_replicas(config: Config, as_json: bool) -> int:
    if config.db_url is None:
        print("doctor: --replicas needs LAMBDA_MATRIX_DB=postgresql://…", file=sys.stderr)
        return CANNOT_RUN
    try:
        seen, syncing = asyncio.run(replicas.read_replicas(config.db_url))
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as err:
        print(f"doctor: cannot read {config.db_shown}: {scrub(str(err), config.db_url)}")
        return CANNOT_RUN
    print(replicas.as_json(seen, syncing) if as_json else replicas.as_text(seen, syncing))
    return AGREES


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
