"""Configuration from the environment (SPEC §3), validated with clear errors."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml

from core.log_setup import LEVELS
from core.store.location import is_postgres_url, redact_url

_USER_ID = re.compile(r"^@[^:\s]+:[^\s]+$")
_IMPORT_STRING = re.compile(r"^[\w.]+:[\w.]+$")
_LISTEN_ADDR = re.compile(  # host:port, or [IPv6]:port
    r"^(?:\[(?P<ip6>[0-9A-Fa-f:.]+)\]|(?P<host>[^\s:\[\]]+)):(?P<port>\d{1,5})$"
)
ECHO_AGENT = "core.agent:EchoAgent"
# Agent calls at once (LAMBDA_CONCURRENCY). An agent is I/O-bound (a call to a model's API): a
# call in flight costs the bot a coroutine and a socket, so the cap is there for the agent's
# backend, not for the bot. 256 is twice the 128 users of SPEC §3 writing at once; a room
# holds at most one slot (its lane is in order), and past that the homeserver, not the agent,
# limits how fast answers are posted.
DEFAULT_CONCURRENCY = 256


class ConfigError(Exception):
    """A missing or invalid environment variable; the message says which and why."""


@dataclass(frozen=True)
class ListenAddr:
    """A ``host:port`` to listen on (``[::1]:9464`` for IPv6; port 0: any free port)."""

    host: str
    port: int

    @classmethod
    def parse(cls, raw: str) -> ListenAddr:
        """Raises ValueError when ``raw`` is not ``host:port`` with a port up to 65535."""
        match = _LISTEN_ADDR.match(raw)
        if match is None or int(match["port"]) > 65535:
            raise ValueError(raw)
        return cls(match["ip6"] or match["host"], int(match["port"]))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Registration:
    """An appservice registration (``LAMBDA_APPSERVICE``): the YAML the homeserver is given in
    ``app_service_config_files``. Only what the bot uses is kept."""

    path: Path
    id: str
    url: str | None  # where the homeserver pushes; None: it pushes nowhere
    as_token: str  # the bot's token towards the homeserver
    hs_token: str  # the homeserver's token towards the bot
    sender_localpart: str

    @classmethod
    def load(cls, path: Path) -> Registration:
        """Read and check ``path``; raises ValueError saying what is wrong, never a token."""
        try:
            data: Any = yaml.safe_load(path.read_text())
        except OSError as err:
            raise ValueError(f"cannot read {path}: {os.strerror(err.errno or 0) or err}") from err
        except yaml.YAMLError as err:
            raise ValueError(f"{path} is not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a mapping (id, url, as_token, hs_token, ...)")
        missing = [
            key
            for key in ("id", "as_token", "hs_token", "sender_localpart")
            if not isinstance(data.get(key), str) or not data[key].strip()
        ]
        if missing:
            raise ValueError(f"{path} lacks {', '.join(missing)} (each a non-empty string)")
        url = data.get("url")
        if url is not None and (
            not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https")
        ):
            raise ValueError(f"{path}: url must be an http(s) URL or null, got {url!r}")
        if data["as_token"] == data["hs_token"]:
            raise ValueError(f"{path}: as_token and hs_token must differ")
        return cls(
            path,
            data["id"],
            url or None,
            data["as_token"],
            data["hs_token"],
            data["sender_localpart"],
        )

    def listen_addr(self) -> ListenAddr | None:
        """The host and port of ``url`` (the scheme's port when it names none)."""
        if self.url is None:
            return None
        parts = urlsplit(self.url)
        if parts.hostname is None:
            return None
        return ListenAddr(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))


@dataclass(frozen=True)
class Config:
    homeserver: str
    user_id: str
    password: str | None
    access_token: str | None
    db_path: Path
    store_path: Path
    log_format: str
    log_level: str
    agent: str = ECHO_AGENT
    concurrency: int = DEFAULT_CONCURRENCY  # agent calls at once, not rooms
    catchup_hours: float = 24.0
    allowed_users: tuple[str, ...] = ()  # empty: everyone on the bot's own server
    max_chats: int = 100
    history_turns: int = 20
    creations_per_minute: int = 5  # not an environment variable: benchmarks raise it
    metrics_addr: ListenAddr | None = None  # None: no /metrics and /health listener at all
    outage_after_s: float = 30.0  # not an environment variable: tests lower it
    appservice: Registration | None = None  # None: the bot syncs
    appservice_listen: ListenAddr | None = None  # set whenever ``appservice`` is
    # LAMBDA_MATRIX_DB as a postgresql:// URL (then ``db_path`` is not used); None: SQLite.
    db_url: str | None = None

    @property
    def db(self) -> str:
        """What ``open_store`` opens: the PostgreSQL URL, or the SQLite file's path."""
        return self.db_url or str(self.db_path)

    @property
    def db_shown(self) -> str:
        """The store as logs and reports name it: the URL never shows its password."""
        return redact_url(self.db_url) if self.db_url else str(self.db_path)

    @property
    def allowed_patterns(self) -> tuple[str, ...]:
        return self.allowed_users or (f"@*:{self.server_name}",)

    @property
    def server_name(self) -> str:
        return self.user_id.split(":", 1)[1]

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, *, need_credentials: bool = True
    ) -> Config:
        env = os.environ if env is None else env
        problems: list[str] = []

        def value(name: str) -> str | None:
            raw = env.get(name, "").strip()
            return raw or None

        homeserver = value("MATRIX_HOMESERVER")
        if homeserver is None:
            problems.append("MATRIX_HOMESERVER is required (for example http://127.0.0.1:8008)")
        elif not homeserver.startswith(("http://", "https://")):
            problems.append(f"MATRIX_HOMESERVER must be an http(s) URL, got {homeserver!r}")
        user_id = value("MATRIX_USER_ID")
        if user_id is None:
            problems.append("MATRIX_USER_ID is required (for example @lambda:localhost)")
        elif not _USER_ID.match(user_id):
            problems.append(f"MATRIX_USER_ID must look like @name:server, got {user_id!r}")
        appservice, appservice_listen = _appservice(
            value("LAMBDA_APPSERVICE"), value("LAMBDA_APPSERVICE_LISTEN"), user_id, problems
        )
        password, token = value("MATRIX_PASSWORD"), value("MATRIX_ACCESS_TOKEN")
        if need_credentials and appservice is None and password is None and token is None:
            problems.append("set MATRIX_PASSWORD or MATRIX_ACCESS_TOKEN")
        log_format = (value("LOG_FORMAT") or ("console" if sys.stderr.isatty() else "json")).lower()
        if log_format not in ("json", "console"):
            problems.append(f"LOG_FORMAT must be json or console, got {log_format!r}")
        log_level = (value("LOG_LEVEL") or "info").lower()
        if log_level not in LEVELS:
            problems.append(f"LOG_LEVEL must be one of {', '.join(LEVELS)}, got {log_level!r}")
        agent = value("LAMBDA_AGENT") or ECHO_AGENT
        if not _IMPORT_STRING.match(agent):
            problems.append(f"LAMBDA_AGENT must be an import string module:factory, got {agent!r}")
        concurrency = _number(
            value("LAMBDA_CONCURRENCY"), int, DEFAULT_CONCURRENCY, "LAMBDA_CONCURRENCY", problems
        )
        catchup_hours = _number(
            value("LAMBDA_CATCHUP_HOURS"), float, 24.0, "LAMBDA_CATCHUP_HOURS", problems
        )
        allowed = tuple(
            p.strip() for p in (value("LAMBDA_ALLOWED_USERS") or "").split(",") if p.strip()
        )
        if bad := [p for p in allowed if not p.startswith("@") or ":" not in p]:
            problems.append(
                "LAMBDA_ALLOWED_USERS must be comma-separated patterns over user "
                f"ids like @*:example.org or @ann:other.org, got {', '.join(bad)}"
            )
        max_chats = _number(value("LAMBDA_MAX_CHATS"), int, 100, "LAMBDA_MAX_CHATS", problems)
        history_turns = _number(
            value("LAMBDA_HISTORY_TURNS"), int, 20, "LAMBDA_HISTORY_TURNS", problems, zero_ok=True
        )
        metrics_addr = None
        if (raw_addr := value("LAMBDA_METRICS_ADDR")) is not None:
            try:
                metrics_addr = ListenAddr.parse(raw_addr)
            except ValueError:
                problems.append(
                    "LAMBDA_METRICS_ADDR must be host:port (for example "
                    f"127.0.0.1:9464 or [::1]:9464), got {raw_addr!r}"
                )
        location = db_location(env)
        db_url = location if is_postgres_url(location) else None
        if db_url is not None and (problem := url_problem(db_url)):
            problems.append(f"LAMBDA_MATRIX_DB {problem}, got {redact_url(db_url)!r}")
        if problems:
            raise ConfigError("; ".join(problems))
        assert homeserver is not None and user_id is not None  # else a problem above
        db_path, store_path = local_paths(env)
        return cls(
            homeserver=homeserver.rstrip("/"),
            user_id=user_id,
            password=password,
            access_token=token,
            db_path=db_path,
            store_path=store_path,
            log_format=log_format,
            log_level=log_level,
            agent=agent,
            concurrency=concurrency,
            catchup_hours=catchup_hours,
            allowed_users=allowed,
            max_chats=max_chats,
            history_turns=history_turns,
            metrics_addr=metrics_addr,
            appservice=appservice,
            appservice_listen=appservice_listen,
            db_url=db_url,
        )

    def to_env(self) -> dict[str, str]:
        """The SPEC §3 variables that ``from_env`` reads back into this config."""
        env = {
            "MATRIX_HOMESERVER": self.homeserver,
            "MATRIX_USER_ID": self.user_id,
            "LAMBDA_MATRIX_DB": self.db,
            "MATRIX_STORE_PATH": str(self.store_path),
            "LOG_FORMAT": self.log_format,
            "LOG_LEVEL": self.log_level,
            "LAMBDA_AGENT": self.agent,
            "LAMBDA_CONCURRENCY": str(self.concurrency),
            "LAMBDA_CATCHUP_HOURS": str(self.catchup_hours),
            "LAMBDA_MAX_CHATS": str(self.max_chats),
            "LAMBDA_HISTORY_TURNS": str(self.history_turns),
        }
        if self.metrics_addr is not None:
            env["LAMBDA_METRICS_ADDR"] = str(self.metrics_addr)
        if self.allowed_users:
            env["LAMBDA_ALLOWED_USERS"] = ",".join(self.allowed_users)
        if self.password:
            env["MATRIX_PASSWORD"] = self.password
        if self.access_token:
            env["MATRIX_ACCESS_TOKEN"] = self.access_token
        if self.appservice is not None:
            env["LAMBDA_APPSERVICE"] = str(self.appservice.path)
        if self.appservice_listen is not None:
            env["LAMBDA_APPSERVICE_LISTEN"] = str(self.appservice_listen)
        return env


def _appservice(
    path: str | None, listen: str | None, user_id: str | None, problems: list[str]
) -> tuple[Registration | None, ListenAddr | None]:
    """``LAMBDA_APPSERVICE`` and ``LAMBDA_APPSERVICE_LISTEN``, checked against
    ``MATRIX_USER_ID``; what is wrong goes to ``problems``."""
    if path is None:
        if listen is not None:
            problems.append("LAMBDA_APPSERVICE_LISTEN is set but LAMBDA_APPSERVICE is not")
        return None, None
    try:
        registration = Registration.load(Path(path))
    except ValueError as err:
        problems.append(f"LAMBDA_APPSERVICE: {err}")
        return None, None
    if user_id is not None and _USER_ID.match(user_id):
        localpart = user_id[1:].split(":", 1)[0]
        if localpart != registration.sender_localpart:
            server = user_id.split(":", 1)[1]
            problems.append(
                f"MATRIX_USER_ID must be the registration's sender, "
                f"@{registration.sender_localpart}:{server}, got {user_id!r}"
            )
    if listen is not None:
        try:
            return registration, ListenAddr.parse(listen)
        except ValueError:
            problems.append(
                f"LAMBDA_APPSERVICE_LISTEN must be host:port (for example 127.0.0.1:29333), "
                f"got {listen!r}"
            )
            return registration, None
    addr = registration.listen_addr()
    if addr is None:
        problems.append(
            f"{path} has no url the homeserver pushes to: set url in the registration "
            "(and LAMBDA_APPSERVICE_LISTEN if the bot listens elsewhere)"
        )
    return registration, addr


_Number = TypeVar("_Number", int, float)


def _number(
    raw: str | None,
    kind: type[_Number],
    default: _Number,
    name: str,
    problems: list[str],
    zero_ok: bool = False,
) -> _Number:
    """A positive number from the environment (``kind`` is int or float); 0 too if
    ``zero_ok``."""
    if raw is None:
        return default
    try:
        number = kind(raw)
    except ValueError:
        number = -1
    if number < 0 or (number == 0 and not zero_ok):
        what = "non-negative" if zero_ok else "positive"
        problems.append(f"{name} must be a {what} {kind.__name__}, got {raw!r}")
    return number


def db_location(env: Mapping[str, str] | None = None) -> str:
    """LAMBDA_MATRIX_DB as given: a SQLite file path or a ``postgresql://`` URL."""
    env = os.environ if env is None else env
    return env.get("LAMBDA_MATRIX_DB", "").strip() or "lambda_matrix.db"


def url_problem(url: str) -> str | None:
    """What is wrong with the shape of a ``postgresql://`` URL (None: nothing we can see
    before connecting)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError as err:
        return f"is not a valid URL ({err})"
    if not parts.hostname and "host=" not in parts.query:
        return "must name a host: postgresql://user:password@host:port/dbname"
    return None


def local_paths(env: Mapping[str, str] | None = None) -> tuple[Path, Path]:
    """The local state: (SQLite file, Matrix session directory)."""
    env = os.environ if env is None else env
    return (
        Path(env.get("LAMBDA_MATRIX_DB", "").strip() or "lambda_matrix.db"),
        Path(env.get("MATRIX_STORE_PATH", "").strip() or "matrix_store"),
    )
