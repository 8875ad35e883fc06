"""The doctor: compares the bot's local DB with the homeserver, and changes nothing.

    python tools/doctor.py [--json]

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

from doctor_tool.examine import examine
from doctor_tool.local import DbUnusable
from doctor_tool.report import as_json, as_text
from doctor_tool.server import CannotAsk

from adapter.matrix.config import Config, ConfigError
from core.log_setup import configure_logging

AGREES, WILL_NOT_HEAL, CANNOT_RUN = 0, 1, 2


def parse_args(argv: list[str]) -> argparse.Namespace | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of the report"
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


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
