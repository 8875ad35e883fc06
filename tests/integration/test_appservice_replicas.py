"""Appservice mode with replicas (SPEC §10): every replica listens, behind a round-robin load
balancer that the homeserver's registration URL points at, so any replica may be pushed any
transaction. The replicas are real processes on one PostgreSQL; the homeserver is the Synapse
with appservice registrations (``appservice_homeserver``); the users are real clients."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest
from homeserver import free_port

from adapter.matrix.config import Config, ListenAddr
from core.store.postgres import drop_bot_tables
from tests.integration.balancer import RoundRobin
from tests.integration.conftest import AppserviceHomeserver
from tests.integration.test_appservice import appservice_config, message, push
from tests.integration.test_replicas import SLOW, Replica, answers, handling


class Deployment:
    """Replicas of one appservice bot on one PostgreSQL, each listening on a port of its own,
    behind a round-robin balancer on the registration's URL."""

    def __init__(self, account: Config, pg_url: str, tmp_path: Path, count: int = 2) -> None:
        assert account.appservice_listen is not None
        self.bot_id = account.user_id
        self.pg_url = pg_url
        self.configs = [
            replace(
                account,
                db_url=pg_url,
                store_path=tmp_path / f"r{n}",
                appservice_listen=ListenAddr("127.0.0.1", free_port()),
                agent=SLOW,
            )
            for n in range(count)
        ]
        self.backends = [c.appservice_listen for c in self.configs if c.appservice_listen]
        self.balancer = RoundRobin(account.appservice_listen, self.backends)
        self.replicas: list[Replica] = []

    async def start(self, at_once: bool = False) -> list[Replica]:
        """Start every replica: one by one (each one's start ping reaches a listener), or all
        at once, as a supervisor would after an outage."""
        group = [
            Replica(config, f"r{len(self.replicas) + n}", TEST_AGENT_DELAY_S="1")
            for n, config in enumerate(self.configs)
        ]
        self.replicas += group
        for replica in group:
            await replica.start()
            if not at_once:
                await replica.wait_for("appservice.ping")
        for replica in group:
            await replica.wait_for("bot.ready")
        return group

    async def stop(self) -> None:
        await asyncio.gather(*(r.close() for r in self.replicas))


@pytest.fixture
def homeserver(appservice_homeserver: AppserviceHomeserver) -> AppserviceHomeserver:
    """Overrides the shared homeserver for this module: users are made on this one too."""
    return appservice_homeserver


@pytest.fixture
async def deployment(homeserver: AppserviceHomeserver, pg_url: str, tmp_path: Path):
    account = appservice_config(homeserver, homeserver.take(), tmp_path)
    made = Deployment(account, pg_url, tmp_path)
    await made.balancer.start()
    yield made
    await made.stop()
    await made.balancer.stop()


async def test_replicas_behind_a_balancer_answer_once_in_order_and_survive_a_kill_9(
    deployment: Deployment, make_user
):
    bot_id, balancer = deployment.bot_id, deployment.balancer
    group = await deployment.start()
    users = [await make_user(f"u{n}") for n in range(3)]
    chats = [c for _, _, c in await asyncio.gather(*(u.onboard(bot_id) for u in users))]
    sent: list[list[str]] = [[] for _ in users]

    async def write(texts: list[str]) -> None:
        for text in texts:
            for n, (user, chat) in enumerate(zip(users, chats, strict=True)):
                sent[n].append(f"{text} {n}")
                await user.send(chat, f"{text} {n}")

    async def all_answered() -> None:
        for n, (user, chat) in enumerate(zip(users, chats, strict=True)):
            await user.wait_for(
                lambda u=user, c=chat, n=n: len(answers(u, c, bot_id, "")) >= len(sent[n]), 60
            )

    await write(["a", "b"])
    await all_answered()
    assert all(r.named("appservice.transaction") for r in group)  # both were pushed some

    # The same transaction pushed to both replicas at once (a retry that lands on the
    # other while the first still records): recorded once.
    twice = message(chats[0], users[0].user_id, "twice at once")
    sent[0].append("twice at once")
    pushes = (push(c, "both-at-once", [twice]) for c in deployment.configs)
    assert await asyncio.gather(*pushes) == [(200, {})] * 2
    await all_answered()

    # kill -9 of a replica while it answers: its room is finished by the other, and the
    # homeserver's pushes that the balancer could not hand to it are pushed again.
    await write(["c"])
    busy = await handling(group, "c 1")
    await busy.kill()
    await write(["d", "e"])
    await all_answered()
    for n, (user, chat) in enumerate(zip(users, chats, strict=True)):
        assert answers(user, chat, bot_id, "") == sent[n]
    print("pushed:", dict(balancer.pushed), "failed:", dict(balancer.failed))
    assert balancer.failed[deployment.backends[group.index(busy)]] >= 1
    assert sum(len(r.named("sync.swept")) for r in group) == 1  # the first start's catch-up


async def test_after_a_total_loss_replicas_started_at_once_catch_up_once(
    deployment: Deployment, make_user
):
    """The messages sent while every replica was down and the DB lost: the homeserver holds
    them and pushes them to any replica at start, while one replica's catch-up reads them too.
    Each is answered once, in order, and the catch-up runs once for the deployment."""
    bot_id = deployment.bot_id
    await deployment.start()
    alice = await make_user("alice")
    _, _, chat = await alice.onboard(bot_id)
    await alice.ask(chat, bot_id, "before", "Echo: before")
    await deployment.stop()
    conn = await asyncpg.connect(deployment.pg_url)
    try:
        await drop_bot_tables(conn)
    finally:
        await conn.close()
    lost = [f"while lost {n}" for n in range(3)]
    for body in lost:
        await alice.send(chat, body)
    group = await deployment.start(at_once=True)
    await alice.wait_for(lambda: len(answers(alice, chat, bot_id, "")) >= 1 + len(lost), 60)
    await alice.ask(chat, bot_id, "after", "Echo: after")
    assert answers(alice, chat, bot_id, "") == ["before", *lost, "after"]
    catchups = [r.name for r in group for _ in r.named("sync.swept")]
    assert len(catchups) == 1, catchups
