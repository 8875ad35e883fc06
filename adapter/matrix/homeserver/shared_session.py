"""One session for all the replicas (SPEC §5, §10): on PostgreSQL the bot's session (user id,
device id, access token) is kept in the store, under ``session``, and shared. The first
replica logs in; the others reuse its token, so the account keeps one device and the
homeserver's transaction-id dedup covers every replica's sends (a second guard, beside the
fence, against a stale replica's send). A replica that meets a revoked token renews it once
for all, under the lease ``login`` (kept renewed however slow the login): one that comes
second finds the new token in the store.

Each replica still writes the session to its own ``MATRIX_STORE_PATH`` (mode 0600), so the
rest of ``session`` works as with one process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict

import structlog
from nio import AsyncClientConfig

from adapter.matrix.config import Config
from adapter.matrix.homeserver.session import (
    Session,
    SessionClient,
    TokenRefused,
    load_session,
    log_in,
    save_session,
)
from core.store import Store, StoreRefused
from core.store.contract import Lease
from core.store.coordination import Coordinator, renewed

log = structlog.get_logger()

SESSION_KEY = "session"
LOGIN_LEASE = "login"
LOGIN_WAIT_S = 60.0


async def _hold_login(coordinator: Coordinator) -> Lease:
    """The ``login`` lease, waited for while another replica logs in."""
    deadline = time.monotonic() + LOGIN_WAIT_S
    while (lease := await coordinator.acquire(LOGIN_LEASE)) is None:
        if time.monotonic() > deadline:
            raise TokenRefused("another replica has been logging in for too long")
        await asyncio.sleep(0.2)
    return lease


@asynccontextmanager
async def _logging_in(coordinator: Coordinator, lease: Lease) -> AsyncIterator[None]:
    """The block under the ``login`` lease, kept renewed however slow the login, then the
    lease given up."""
    try:
        async with renewed(coordinator, lease):
            yield
    finally:
        try:
            await coordinator.release([lease])
        except StoreRefused:
            pass  # it expires by itself


async def _stored(store: Store, config: Config) -> Session | None:
    data = await store.get(SESSION_KEY)
    if not isinstance(data, dict):
        return None
    try:
        session = Session(**data)
    except TypeError:
        return None
    if session.user_id != config.user_id or session.homeserver != config.homeserver:
        return None
    return session


class SharedSessionClient(SessionClient):
    """A ``SessionClient`` whose renewals go through the store: at most one replica logs in
    again, the others adopt its token."""

    def __init__(
        self, settings: Config, config: AsyncClientConfig, store: Store, coordinator: Coordinator
    ) -> None:
        super().__init__(settings, config)
        self._store = store
        self._coordinator = coordinator

    async def _renew(self, refused: str, soft_logout: bool, request: str) -> None:
        try:
            lease = await _hold_login(self._coordinator)
        except StoreRefused as err:
            raise TokenRefused(f"the access token was revoked; the DB is down: {err}") from err
        async with _logging_in(self._coordinator, lease):
            stored = await _stored(self._store, self.settings)
            if stored is not None and stored.access_token not in (refused, self.access_token):
                self.restore_login(stored.user_id, stored.device_id, stored.access_token)
                save_session(self.settings, stored)
                log.info("session.adopted", device_id=stored.device_id, request=request)
                return
            await super()._renew(refused, soft_logout, request)
            renewed_session = load_session(self.settings)
            if renewed_session is not None:
                await self._store.set(SESSION_KEY, asdict(renewed_session))


async def log_in_shared(
    client: SessionClient, config: Config, store: Store, coordinator: Coordinator
) -> Session:
    """``log_in``, starting from the session the replicas share, and sharing what it ends
    with. One replica at a time, so replicas started together log in once."""
    async with _logging_in(coordinator, await _hold_login(coordinator)):
        stored = await _stored(store, config)
        local = load_session(config)
        if stored is not None and stored != local:
            save_session(config, stored)  # log_in tries it first
        session = await log_in(client, config)
        if session != stored:
            await store.set(SESSION_KEY, asdict(session))
        return session
