"""The bot's Matrix session (access token, device id), saved with mode 0600 and reused,
so that restarts do not create new devices."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog
from aiohttp import ClientError
from nio import AsyncClient, LoginResponse, WhoamiResponse

from adapter.matrix.config import Config

log = structlog.get_logger()
DEVICE_NAME = "Lambda bot"


class LoginFailed(Exception):
    """The homeserver refused the credentials; retrying will not help."""


class HomeserverUnreachable(Exception):
    """The homeserver did not answer; retrying later may help."""


@dataclass(frozen=True)
class Session:
    homeserver: str
    user_id: str
    device_id: str
    access_token: str


def session_file(store_path: Path) -> Path:
    return store_path / "session.json"


def load_session(config: Config) -> Session | None:
    path = session_file(config.store_path)
    try:
        session = Session(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as err:
        log.warning("session.unreadable", path=str(path), error=str(err))
        return None
    if session.user_id != config.user_id or session.homeserver != config.homeserver:
        log.warning("session.ignored", path=str(path), reason="other user or homeserver")
        return None
    return session


def save_session(config: Config, session: Session) -> None:
    config.store_path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = session_file(config.store_path)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(asdict(session), fh)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


async def _whoami(client: AsyncClient) -> WhoamiResponse | None:
    """None when the token is refused; raises HomeserverUnreachable when there is no answer."""
    try:
        resp = await client.whoami()
    except (ClientError, OSError, TimeoutError) as err:
        raise HomeserverUnreachable(str(err)) from err
    if isinstance(resp, WhoamiResponse):
        return resp
    if resp.status_code in ("M_UNKNOWN_TOKEN", "M_MISSING_TOKEN", "M_FORBIDDEN"):
        return None
    raise HomeserverUnreachable(f"{resp.status_code} {resp.message}")


async def log_in(client: AsyncClient, config: Config) -> Session:
    """Reuse the saved session; else the configured token; else a password login (saved)."""
    saved = load_session(config)
    if saved is not None:
        client.restore_login(saved.user_id, saved.device_id, saved.access_token)
        if await _whoami(client) is not None:
            log.info("session.restored", device_id=saved.device_id)
            return saved
        log.warning("session.expired", device_id=saved.device_id)
    if config.access_token:
        client.access_token = config.access_token
        who = await _whoami(client)
        if who is None:
            raise LoginFailed("MATRIX_ACCESS_TOKEN was refused by the homeserver")
        if who.user_id != config.user_id:
            raise LoginFailed(f"MATRIX_ACCESS_TOKEN belongs to {who.user_id}, "
                              f"not MATRIX_USER_ID {config.user_id}")
        session = Session(config.homeserver, config.user_id, who.device_id or "",
                          config.access_token)
        client.restore_login(session.user_id, session.device_id, session.access_token)
    else:
        if not config.password:
            raise LoginFailed("the saved session is gone and MATRIX_PASSWORD is not set")
        try:
            resp = await client.login(config.password, device_name=DEVICE_NAME)
        except (ClientError, OSError, TimeoutError) as err:
            raise HomeserverUnreachable(str(err)) from err
        if not isinstance(resp, LoginResponse):
            if resp.status_code in ("M_FORBIDDEN", "M_USER_DEACTIVATED", "M_INVALID_USERNAME"):
                raise LoginFailed(f"login refused: {resp.status_code} {resp.message}")
            raise HomeserverUnreachable(f"{resp.status_code} {resp.message}")
        session = Session(config.homeserver, config.user_id, resp.device_id, resp.access_token)
        log.info("session.created", device_id=session.device_id)
    save_session(config, session)
    return session
