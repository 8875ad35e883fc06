"""The bot's Matrix session (access token, device id), saved with mode 0600 and reused;
renewed with the password when the homeserver revokes the token (SPEC §5, Chatting). Every
password login names the bot's device (``bot_device_id``), so the account keeps one device
across restarts, revoked tokens and total losses of the local state."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import resource
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

import structlog
from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector
from nio import AsyncClient, AsyncClientConfig, ErrorResponse, LoginResponse, WhoamiResponse
from nio.api import Api

from adapter.matrix.config import Config
from adapter.matrix.homeserver.client import RawResponse

log = structlog.get_logger()
DEVICE_NAME = "Lambda bot"
DEVICE_PREFIX = "LAMBDA"


def connection_limit(concurrency: int) -> int:
    """Connections to the homeserver at once. nio's default pool holds 100, so the answers of
    a burst past that waited in the bot for a free one (at 128 users to a 1 s agent, the
    last replies by 1.4 s). Each agent call in flight may post its answer and a typing notice
    at the same moment; the rest is the long poll and heals. Never fewer than nio's 100, and
    at most half the process's file descriptors, so the DB and the logs always have theirs."""
    wanted = max(100, 2 * concurrency + 16)
    return min(wanted, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2)


class LoginFailed(Exception):
    """The homeserver refused the credentials; retrying will not help."""


class HomeserverUnreachable(Exception):
    """The homeserver did not answer; retrying later may help."""


class TokenRefused(ClientError):
    """The homeserver refused the access token and no new one can be had now (or ever: see
    ``SessionClient.lost``). A ClientError, so a caller treats it like an unreachable
    homeserver: its update stays in the inbox for a later attempt or the next start."""


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


def tool_session(config: Config) -> Session | None:
    """The session the tools (doctor, reset --server) act with: the appservice's token in
    appservice mode (no device), else the bot's saved session. They never log in."""
    if config.appservice is not None:
        return Session(config.homeserver, config.user_id, "", config.appservice.as_token)
    return load_session(config)


def save_session(config: Config, session: Session) -> None:
    config.store_path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = session_file(config.store_path)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(asdict(session), fh)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def token_refused(resp: Any) -> bool:
    """The homeserver no longer knows the token: revoked, logged out, or expired (then the
    answer carries ``soft_logout``)."""
    return isinstance(resp, ErrorResponse) and resp.status_code == "M_UNKNOWN_TOKEN"


def bot_device_id(user_id: str, known: str | None = None) -> str:
    """The device every password login names: the one the bot knows (a saved session's), else
    one derived from the user id alone, so a login after a total loss finds the same device.
    Synapse reuses a device it knows on login, and re-creates one that was signed out."""
    if known:
        return known
    return DEVICE_PREFIX + hashlib.sha256(user_id.encode()).hexdigest()[:10].upper()


async def _whoami(client: AsyncClient) -> WhoamiResponse | ErrorResponse:
    """The token's owner, or the refusal; raises HomeserverUnreachable when there is no answer."""
    try:
        resp = await client.whoami()
    except (ClientError, OSError, TimeoutError) as err:
        raise HomeserverUnreachable(str(err)) from err
    if isinstance(resp, WhoamiResponse) or resp.status_code in (
        "M_UNKNOWN_TOKEN",
        "M_MISSING_TOKEN",
        "M_FORBIDDEN",
    ):
        return resp
    raise HomeserverUnreachable(f"{resp.status_code} {resp.message}")


async def password_login(client: AsyncClient, config: Config, device_id: str) -> Session:
    """A password login on ``device_id``, saved to ``MATRIX_STORE_PATH``."""
    previous, client.device_id = client.device_id, device_id  # nio logs in on this device
    try:
        resp = await client.login(config.password, device_name=DEVICE_NAME)
    except (ClientError, OSError, TimeoutError) as err:
        client.device_id = previous
        raise HomeserverUnreachable(str(err)) from err
    if not isinstance(resp, LoginResponse):
        client.device_id = previous
        if resp.status_code in ("M_FORBIDDEN", "M_USER_DEACTIVATED", "M_INVALID_USERNAME"):
            raise LoginFailed(f"login refused: {resp.status_code} {resp.message}")
        raise HomeserverUnreachable(f"{resp.status_code} {resp.message}")
    session = Session(config.homeserver, config.user_id, resp.device_id, resp.access_token)
    save_session(config, session)
    return session


async def log_in(client: AsyncClient, config: Config) -> Session:
    """Reuse the saved session; else the configured token; else a password login (saved)."""
    saved = load_session(config)
    device_id = bot_device_id(config.user_id)
    if saved is not None:
        client.restore_login(saved.user_id, saved.device_id, saved.access_token)
        who = await _whoami(client)
        if isinstance(who, WhoamiResponse):
            log.info("session.restored", device_id=saved.device_id)
            return saved
        log.warning("session.expired", device_id=saved.device_id, soft_logout=who.soft_logout)
        device_id = bot_device_id(config.user_id, saved.device_id)
    if config.access_token:
        client.access_token = config.access_token
        who = await _whoami(client)
        if not isinstance(who, WhoamiResponse):
            raise LoginFailed("MATRIX_ACCESS_TOKEN was refused by the homeserver")
        if who.user_id != config.user_id:
            raise LoginFailed(
                f"MATRIX_ACCESS_TOKEN belongs to {who.user_id}, not MATRIX_USER_ID {config.user_id}"
            )
        session = Session(
            config.homeserver, config.user_id, who.device_id or "", config.access_token
        )
        client.restore_login(session.user_id, session.device_id, session.access_token)
        save_session(config, session)
        return session
    if not config.password:
        raise LoginFailed("the saved session is gone and MATRIX_PASSWORD is not set")
    session = await password_login(client, config, device_id)
    log.info("session.created", device_id=session.device_id)
    return session


class SessionClient(AsyncClient):
    """An AsyncClient whose session outlives a revoked token.

    Every request passes through ``_send``, so a refused token (``M_UNKNOWN_TOKEN``) is met
    here, whichever request meets it first: the sync loop or a handler. One password login
    renews the session for all of them, and each refused request is sent again (the server
    did not act on it). Without a password, or when even a fresh token is refused, the
    session is lost: ``on_lost`` is called and every request fails at once with
    ``TokenRefused``, so a dead token is never retried.
    """

    client_session: ClientSession | None  # AsyncClient's (nio is untyped): None until first use

    def __init__(self, settings: Config, config: AsyncClientConfig) -> None:
        super().__init__(settings.homeserver, settings.user_id, config=config)
        self.settings = settings
        self.lost: LoginFailed | None = None
        self._on_lost: Callable[[], object] | None = None  # None: not renewing (at startup)
        self._on_renewed: Callable[[], object] = lambda: None
        self._renewal = asyncio.Lock()
        self._untried: str | None = None  # a renewed token that no request has succeeded with

    def renew_when_refused(
        self, on_lost: Callable[[], object], on_renewed: Callable[[], object] = lambda: None
    ) -> None:
        """From now on, renew a refused token (then call ``on_renewed``); call ``on_lost``
        when that is impossible."""
        self._on_lost, self._on_renewed = on_lost, on_renewed

    async def _send(
        self, response_class: type, method: str, path: str, *args: Any, **kwargs: Any
    ) -> Any:
        if self.client_session is None:  # else nio makes one on first use, with its pool
            self.client_session = ClientSession(
                timeout=ClientTimeout(total=self.config.request_timeout),
                connector=TCPConnector(limit=connection_limit(self.settings.concurrency)),
            )
        for _ in range(2):  # a request is sent again at most once
            if self.lost is not None:
                raise TokenRefused(str(self.lost))
            token = self.access_token
            resp = await super()._send(response_class, method, path, *args, **kwargs)
            if self._on_lost is None or response_class is LoginResponse or not token_refused(resp):
                if token == self._untried:
                    self._untried = None
                return resp
            await self._renew(token, resp.soft_logout, f"{method} {path.split('?')[0]}")
        # Refused again after a renewal (revoked again meanwhile), and renewed once more: the
        # caller retries later, so no request loops here.
        raise TokenRefused("the homeserver refused the renewed access token too")

    async def receive_response(self, response: Any) -> None:
        # nio drops the token on a soft logout, whichever token is current by then: a token
        # just renewed by another request would go too. The session is renewed in _send.
        if not (isinstance(response, ErrorResponse) and response.soft_logout):
            await super().receive_response(response)

    async def _renew(self, refused: str, soft_logout: bool, request: str) -> None:
        """Replace the refused token, once for every request that met it; or lose the session."""
        async with self._renewal:
            if self.lost is not None:
                raise TokenRefused(str(self.lost))
            if self.access_token != refused:
                return  # another request renewed the session meanwhile
            if refused == self._untried:
                self._lose("the homeserver refused the token it had just issued")
            if self.settings.appservice is not None:
                self._lose(
                    "the homeserver refused the appservice's as_token (M_UNKNOWN_TOKEN): is "
                    f"{self.settings.appservice.path} still in its app_service_config_files?"
                )
            if not self.settings.password:
                self._lose(
                    "the homeserver revoked the access token (M_UNKNOWN_TOKEN) and "
                    "MATRIX_PASSWORD is not set"
                )
            old_device = self.device_id
            try:
                session = await password_login(
                    self, self.settings, bot_device_id(self.settings.user_id, old_device)
                )
            except LoginFailed as err:
                self._lose(f"the access token was revoked and a new login failed: {err}")
            except HomeserverUnreachable as err:
                raise TokenRefused(
                    f"the access token was revoked; a new login will be tried again: {err}"
                ) from err
            self._untried = session.access_token
        log.warning(
            "session.relogin",
            old_device_id=old_device,
            device_id=session.device_id,
            soft_logout=soft_logout,
            request=request,
        )
        self._on_renewed()

    def _lose(self, reason: str) -> NoReturn:
        self.lost = LoginFailed(reason)
        assert self._on_lost is not None
        self._on_lost()
        raise TokenRefused(reason)


async def appservice_session(client: AsyncClient, config: Config) -> None:
    """Appservice mode: act with the registration's ``as_token`` (no login, no device, no
    session file), after checking that the homeserver knows it, and register the sender if
    the homeserver has not (``M_USER_IN_USE``: it has). Raises ``LoginFailed`` when the
    homeserver refuses the registration, ``HomeserverUnreachable`` when it does not answer."""
    registration = config.appservice
    assert registration is not None
    client.restore_login(config.user_id, "", registration.as_token)
    who = await _whoami(client)
    if not isinstance(who, WhoamiResponse):
        raise LoginFailed(
            f"the homeserver refused the as_token of {registration.path} ({who.status_code}): "
            "add that file to its app_service_config_files and restart it"
        )
    if who.user_id != config.user_id:
        raise LoginFailed(
            f"the as_token of {registration.path} acts as {who.user_id}, "
            f"not MATRIX_USER_ID {config.user_id}"
        )
    body = json.dumps(
        {
            "type": "m.login.application_service",
            "username": registration.sender_localpart,
            "inhibit_login": True,  # a login would make a device
        }
    )
    try:
        resp = await client._send(RawResponse, "POST", Api._build_path(["register"]), data=body)
    except (ClientError, OSError, TimeoutError) as err:
        raise HomeserverUnreachable(str(err)) from err
    if isinstance(resp, RawResponse):
        log.info("appservice.sender_registered", user_id=config.user_id)
    elif resp.status_code != "M_USER_IN_USE":
        transport = resp.transport_response
        if transport is not None and transport.status < 500:
            raise LoginFailed(f"registering the sender failed: {resp.status_code} {resp.message}")
        raise HomeserverUnreachable(f"{resp.status_code} {resp.message}")
