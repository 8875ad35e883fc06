"""Run the bot against a local Synapse that this script starts (the demo, `make run`).

Data lives in .local/ (ignored by git). Prints the demo user's login for Element or any
client. Ctrl-C stops the bot, then the homeserver.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from homeserver import LocalHomeserver, free_port  # noqa: E402

LOCAL = ROOT / ".local"


def _port() -> int:
    wanted = int(os.environ.get("LOCAL_HS_PORT", "8008"))
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", wanted))
            return wanted
        except OSError:
            return free_port()


def _credentials() -> dict:
    path = LOCAL / "credentials.json"
    if path.exists():
        return json.loads(path.read_text())
    creds = {"bot": secrets.token_urlsafe(12), "demo": secrets.token_urlsafe(9)}
    LOCAL.mkdir(exist_ok=True)
    path.write_text(json.dumps(creds))
    path.chmod(0o600)
    return creds


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # `kill` stops the demo as cleanly as Ctrl-C


def main() -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    creds = _credentials()
    hs = LocalHomeserver(LOCAL / "synapse", port=_port())
    print(f"Starting Synapse on {hs.url} (data in {hs.data_dir}) ...", flush=True)
    hs.start()
    try:
        bot = hs.register("lambda", creds["bot"])
        demo = hs.register("demo", creds["demo"])
        print(
            f"""
Homeserver : {hs.url}
Demo login : {demo.user_id}   password: {demo.password}
Bot        : {bot.user_id}
Log in as the demo user (Element: "Edit" homeserver -> {hs.url}), create a room,
invite {bot.user_id}, and the bot builds your Lambda Space. Ctrl-C stops everything.
""",
            flush=True,
        )
        env = {
            "MATRIX_HOMESERVER": hs.url,
            "MATRIX_USER_ID": bot.user_id,
            "MATRIX_PASSWORD": bot.password,
            "LAMBDA_MATRIX_DB": str(LOCAL / "lambda_matrix.db"),
            "MATRIX_STORE_PATH": str(LOCAL / "matrix_store"),
            **os.environ,
        }
        proc = subprocess.Popen([sys.executable, "-m", "adapter.matrix"], cwd=ROOT, env=env)
        try:
            return proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGTERM)
            return proc.wait()
    finally:
        hs.stop()


if __name__ == "__main__":
    sys.exit(main())
