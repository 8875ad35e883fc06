"""Appservice registration for the bot (SPEC §10, ``LAMBDA_APPSERVICE``).

    python tools/appservice.py registration --url http://127.0.0.1:29333 \\
        [--user-id @lambda:localhost] [--id lambda] [-o lambda-registration.yaml]

prints (or writes, mode 0600) a registration with fresh random tokens whose user namespace
covers the bot's own id only, then tells on stderr what to add to Synapse's config and how to
start the bot. Exit codes: 0 done, 2 bad usage.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import sys
from pathlib import Path

import yaml

_USER_ID = re.compile(r"^@([a-z0-9._=\-/+]+):(\S+)$")


def registration(url: str, user_id: str, appservice_id: str) -> dict:
    """A registration for the bot ``user_id``, pushed to ``url``, with fresh tokens."""
    match = _USER_ID.match(user_id)
    if match is None:
        raise ValueError(f"--user-id must be a Matrix user id like @lambda:example.org: {user_id}")
    return {
        "id": appservice_id,
        "url": url,
        "as_token": secrets.token_urlsafe(32),
        "hs_token": secrets.token_urlsafe(32),
        "sender_localpart": match[1],
        "namespaces": {
            "users": [{"exclusive": True, "regex": f"^{re.escape(user_id)}$"}],
            "aliases": [],
            "rooms": [],
        },
        "rate_limited": False,
        "receive_ephemeral": False,  # no typing, receipts or presence: the bot uses none
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    reg = sub.add_parser("registration", help="print a registration with fresh tokens")
    reg.add_argument("--url", required=True, help="where the homeserver reaches the bot")
    reg.add_argument("--user-id", default="@lambda:localhost", help="the bot's user id")
    reg.add_argument("--id", default=None, help="the appservice's id (default: the localpart)")
    reg.add_argument("-o", "--output", type=Path, help="write it there (mode 0600)")
    args = parser.parse_args(argv)
    if not args.url.startswith(("http://", "https://")):
        parser.error(f"--url must be an http(s) URL, got {args.url!r}")
    try:
        data = registration(args.url, args.user_id, args.id or args.user_id[1:].split(":")[0])
    except ValueError as err:
        parser.error(str(err))
    text = yaml.safe_dump(data, sort_keys=False)
    if args.output is None:
        sys.stdout.write(text)
        where = "<this file>"
    else:
        fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        where = str(args.output.resolve())
    print(
        f"""
# Add to Synapse's homeserver.yaml, then restart Synapse:
app_service_config_files:
  - {where}

# Start the bot with:
#   MATRIX_USER_ID={args.user_id} LAMBDA_APPSERVICE={where} python -m adapter.matrix
# (MATRIX_PASSWORD is not needed; the bot listens on the host:port of --url, or on
# LAMBDA_APPSERVICE_LISTEN)""",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
