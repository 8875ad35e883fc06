"""The process around the bot: the checks before it starts (agent, DB, lock, listener), the
login with backoff, the exit codes, and the signals that stop it (SPEC §3)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from functools import partial

import structlog
from nio import AsyncClient

from adapter.matrix.bot import Bot, client_config
from adapter.matrix.config import Config
from adapter.matrix.homeserver.session import (
    HomeserverUnreachable,
    LoginFailed,
    Session,
    SessionClient,
    TokenRefused,
    appservice_session,
    log_in,
)
from adapter.matrix.homeserver.shared_session import SharedSessionClient, log_in_shared
from adapter.matrix.modes.parts import MAX_BACKOFF_S, sleep_or_stop
from adapter.matrix.observe.health import Health
from adapter.matrix.observe.listener import ListenerUnavailable, MetricsListener
from adapter.matrix.observe.metrics import Metrics
from core.agent import Agent, AgentLoadError, load_agent
from core.store import (
    ProcessLock,
    Store,
    StoreLocked,
    StoreMisconfigured,
    StoreRefused,
    StoreUnreachable,
    StoreUnreadable,
    StoreUnwritable,
    open_store,
    unwritable,
)
from core.store.coordination import Coordinator, coordinator_for

log = structlog.get_logger()


async def _log_in_with_backoff(
    client: AsyncClient,
    config: Config,
    stop: asyncio.Event,
    health: Health,
    log_in: Callable[[AsyncClient, Config], Awaitable[Session]] = log_in,
) -> bool:
    backoff = 1.0
    while not stop.is_set():
        try:
            if config.appservice is not None:  # no login, no device: the as_token
                await appservice_session(client, config)
                log.info("bot.appservice", user_id=config.user_id, id=config.appservice.id)
            else:
                session = await log_in(client, config)
                log.info("bot.logged_in", user_id=session.user_id, device_id=session.device_id)
            health.homeserver_answered()
            return True
        except (HomeserverUnreachable, TokenRefused, StoreRefused) as err:
            health.homeserver_failed(str(err))
            log.warning(
                "homeserver.unreachable",
                homeserver=config.homeserver,
                error=str(err),
                retry_in_s=backoff,
            )
            await sleep_or_stop(stop, backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)
    return False


async def run_bot(config: Config, stop: asyncio.Event, agent: Agent | None = None) -> int:
    """Run until ``stop`` is set (or the session is lost for good, which sets it). Returns the
    process exit code. ``agent`` overrides ``config.agent`` (tests and the benchmark pass one)."""
    if agent is None:
        try:
            agent = load_agent(config.agent)
        except AgentLoadError as err:
            log.error("config.invalid", error=str(err))
            return 2
    lock = None
    if config.db_url is None:  # SQLite: a file for one process
        if (read_only := unwritable(config.db_path)) is not None:
            log.error(
                "store.read_only",
                db=str(config.db_path),
                path=str(read_only),
                error=f"{read_only} is not writable by this user",
                remedy=f"make {read_only} writable by the bot's user (chmod u+w, or chattr -i "
                "if it is immutable), or set LAMBDA_MATRIX_DB to a writable place; the "
                "DB is intact: do not reset it",
            )
            return 1
        lock = ProcessLock(config.db_path)
        try:
            lock.acquire()
        except StoreLocked:
            log.error(
                "store.locked",
                db=str(config.db_path),
                pid=lock.holder_pid(),
                remedy="another bot is running with this LAMBDA_MATRIX_DB; stop it first",
            )
            return 1
    try:
        opened = await _open_store(config, stop)
        if isinstance(opened, int):
            return opened
        store = opened
        coordinator = coordinator_for(store)
        structlog.contextvars.bind_contextvars(replica=coordinator.replica)
        metrics, health = Metrics(), Health(config.outage_after_s)
        listener = None
        if config.metrics_addr is not None:
            try:  # after the DB checks: /health can then tell a homeserver outage at login
                listener = await MetricsListener.start(config.metrics_addr, metrics, health)
            except ListenerUnavailable as err:
                log.error("config.invalid", error=str(err))
                await store.close()
                return 2
        client: SessionClient
        login: Callable[[AsyncClient, Config], Awaitable[Session]] = log_in
        if coordinator.shared and config.appservice is None:  # replicas share one session
            client = SharedSessionClient(config, client_config(), store, coordinator)
            login = partial(shared_log_in, store=store, coordinator=coordinator)
        else:
            client = SessionClient(config, client_config())
        try:
            log.info(
                "bot.starting",
                homeserver=config.homeserver,
                user_id=config.user_id,
                db=config.db_shown,
                db_created=store.created,
            )
            if not await _log_in_with_backoff(client, config, stop, health, login):
                return 0
            client.renew_when_refused(on_lost=stop.set, on_renewed=metrics.session_renewals.inc)
            await Bot(client, store, agent, config, metrics, health, coordinator).run(stop)
            if client.lost is not None:
                raise client.lost
            log.info("bot.stopped")
            return 0
        except LoginFailed as err:
            log.error(
                "login.failed",
                error=str(err),
                remedy="check MATRIX_PASSWORD / MATRIX_ACCESS_TOKEN"
                if config.appservice is None
                else f"check {config.appservice.path} and app_service_config_files",
            )
            return 1
        except ListenerUnavailable as err:  # the appservice's address
            log.error("config.invalid", error=str(err))
            return 2
        finally:
            if listener is not None:
                await listener.stop()
            await client.close()
            await store.close()
    finally:
        if lock is not None:
            lock.release()


async def _open_store(config: Config, stop: asyncio.Event) -> Store | int:
    """The store, or the exit code when it cannot be opened. A file that cannot be used and a
    URL that cannot work stop the bot (exit 1); a PostgreSQL that does not answer yet is
    waited for, with backoff (a supervisor often starts the bot and its database together)."""
    backoff = 1.0
    while True:
        try:
            return await open_store(config.db)
        except StoreUnreadable as err:
            log.error(
                "store.unreadable",
                db=config.db_shown,
                error=str(err),
                remedy="python tools/reset_local.py",
            )
            return 1
        except StoreUnwritable as err:
            log.error(
                "store.write_failed",
                during="start",
                db=str(config.db_path),
                error=str(err),
                remedy="free disk space or make the folder writable; "
                "there is no DB yet, nothing to reset",
            )
            return 1
        except StoreMisconfigured as err:
            log.error("store.misconfigured", db=config.db_shown, error=str(err), remedy=err.remedy)
            return 1
        except StoreUnreachable as err:
            log.warning(
                "store.unreachable",
                db=config.db_shown,
                error=str(err),
                remedy="start PostgreSQL, or check the host and port in LAMBDA_MATRIX_DB; "
                "the bot waits for it",
                retry_in_s=backoff,
            )
        await sleep_or_stop(stop, backoff)
        if stop.is_set():
            return 0
        backoff = min(backoff * 2, MAX_BACKOFF_S)


async def shared_log_in(
    client: AsyncClient, config: Config, store: Store, coordinator: Coordinator
) -> Session:
    assert isinstance(client, SessionClient)
    return await log_in_shared(client, config, store, coordinator)


def main(config: Config) -> int:
    async def runner() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await run_bot(config, stop)

    return asyncio.run(runner())
