"""A sealed local Synapse for development and tests (127.0.0.1 only).

Used by ``tools/run_local.py`` (the demo) and by the integration-test fixtures.
Synchronous on purpose: it is driven from plain scripts and session fixtures.
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

SERVER_NAME = "localhost"
_RELAXED = {"per_second": 1000, "burst_count": 1000}


class HomeserverError(RuntimeError):
    """The local homeserver could not be set up or did not answer."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Account:
    user_id: str
    password: str


class LocalHomeserver:
    """Generate, configure, start and stop one Synapse in ``data_dir``.

    ``default_room_version`` (e.g. ``"10"``) sets the version Synapse creates rooms at when
    a client does not name one; None keeps Synapse's own default (12 for Synapse 1.163).
    ``extra_config`` is merged over the config on every start (e.g.
    ``{"encryption_enabled_by_default_for_room_type": "all"}`` or ``app_service_config_files``):
    change it and ``restart`` to try another value.
    """

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        default_room_version: str | None = None,
        extra_config: dict | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_port()
        self.default_room_version = default_room_version
        self.extra_config = dict(extra_config or {})
        self.config_path = self.data_dir / "homeserver.yaml"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.config_path.exists():
            self._generate()
        self._configure()
        log = open(self.data_dir / "synapse.stdout.log", "ab")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "synapse.app.homeserver", "-c", str(self.config_path)],
            cwd=self.data_dir,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us, and we stop Synapse in order
            preexec_fn=die_with_parent(signal.SIGTERM),
        )
        log.close()
        self._wait_ready(timeout)

    def stop(self) -> None:
        stop_child(self._process, signal.SIGTERM, 20)

    def restart(self, timeout: float = 60.0) -> None:
        """Stop and start again on the same port and data, with the configuration as it is now
        (Synapse reads it only at start)."""
        self.stop()
        self.start(timeout)

    def __enter__(self) -> LocalHomeserver:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def register(self, username: str, password: str, admin: bool = False) -> Account:
        """Register a user through the shared-secret admin API (idempotent)."""
        secret = self._config()["registration_shared_secret"].encode()
        endpoint = f"{self.url}/_synapse/admin/v1/register"
        nonce = _request("GET", endpoint)["nonce"]
        mac = hmac.new(secret, digestmod=hashlib.sha1)
        role = b"admin" if admin else b"notadmin"
        mac.update(b"\x00".join([nonce.encode(), username.encode(), password.encode(), role]))
        body = {
            "nonce": nonce,
            "username": username,
            "password": password,
            "admin": admin,
            "mac": mac.hexdigest(),
        }
        try:
            _request("POST", endpoint, body)
        except urllib.error.HTTPError as err:
            if b"M_USER_IN_USE" not in err.read():
                raise HomeserverError(f"registering {username} failed: HTTP {err.code}") from err
        return Account(f"@{username}:{SERVER_NAME}", password)

    def _generate(self) -> None:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "synapse.app.homeserver",
                "--server-name",
                SERVER_NAME,
                "--config-path",
                str(self.config_path),
                "--generate-config",
                "--report-stats=no",
                "--data-directory",
                str(self.data_dir),
            ],
            check=True,
            cwd=self.data_dir,
            stdout=subprocess.DEVNULL,
        )

    def _config(self) -> dict:
        return yaml.safe_load(self.config_path.read_text())

    def _configure(self) -> None:
        config = self._config()
        config["listeners"] = [
            {
                "port": self.port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "tls": False,
                "x_forwarded": False,
                "resources": [{"names": ["client"], "compress": False}],
            }
        ]
        config.update(
            {
                "trusted_key_servers": [],
                "suppress_key_server_warning": True,
                "federation_domain_whitelist": [],
                "use_presence": False,
                "enable_registration": False,
                "report_stats": False,
                "rc_message": _RELAXED,
                "rc_registration": _RELAXED,
                "rc_joins_per_room": _RELAXED,
                "rc_admin_redaction": _RELAXED,
                "rc_room_creation": _RELAXED,
                "rc_login": {k: _RELAXED for k in ("address", "account", "failed_attempts")},
                "rc_joins": {k: _RELAXED for k in ("local", "remote")},
                "rc_invites": {k: _RELAXED for k in ("per_room", "per_user", "per_issuer")},
            }
        )
        # Set or cleared on every start: a reused data_dir keeps no version from an earlier run.
        config.pop("default_room_version", None)
        if self.default_room_version is not None:
            config["default_room_version"] = self.default_room_version
        config.update(self.extra_config)
        self.config_path.write_text(yaml.safe_dump(config))

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise HomeserverError(
                    f"Synapse exited with {self._process.returncode}; "
                    f"see {self.data_dir / 'synapse.stdout.log'}"
                )
            try:
                _request("GET", f"{self.url}/_matrix/client/versions")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        self.stop()
        raise HomeserverError(f"Synapse did not answer on {self.url} within {timeout:.0f}s")


def die_with_parent(sig: int) -> Callable[[], None]:
    """A ``preexec_fn`` for a server the tools start (Linux): ``sig`` reaches it if the process
    that started it dies without stopping it (a killed test run or benchmark must not leave a
    server behind)."""

    def arrange() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, sig)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass

    return arrange


def stop_child(process: subprocess.Popen[bytes] | None, sig: int, timeout: float) -> None:
    """Stop a server the tools started: ``sig`` (its orderly shutdown), then kill it after
    ``timeout`` seconds."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _request(method: str, url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read() or b"{}")


if __name__ == "__main__":  # a quick manual check: start, print the URL, wait for Ctrl-C
    hs = LocalHomeserver(Path(os.environ.get("HS_DIR", ".local/synapse")))
    with hs:
        print(hs.url, flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
