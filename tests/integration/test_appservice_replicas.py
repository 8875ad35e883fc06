"""Appservice mode with replicas (SPEC §10): every replica listens, behind a round-robin load
balancer that the homeserver's registration URL points at, so any replica may be pushed any
transaction. The replicas are real processes on one PostgreSQL; the homeserver is the
module's Synapse with its registrations (``test_appservice``); the users are real clients."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest
from homeserver import free_port

from adapter.matrix.config import Config, ListenAddr
from tests.integration.balancer import RoundRobin
from tests.integration.test_appservice import (  # noqa: F401 (its Synapse: this module's too)
    AppserviceHomeserver,
    appservice_config,
    homeserver,
    message,
    push,
)
from tests.integration.test_replicas import SLOW, Replica, answers, handling


@pytest.fixture
def account(homeserver: AppserviceHomeserver, tmp_path: Path) -> Config:  # noqa: F811
    """A bot account of its own, with the registration the balancer listens for."""
    return appservice_config(homeserver, homeserver.take(), tmp_path)


async def test_replicas_behind_a_balancer_answer_once_in_order_and_survive_a_kill_9(
    account: Config, pg_url: str, tmp_path: Path, make_user
):
    assert account.appservice_listen is not None
    bot_id = account.user_id
    configs = [
        replace(
            account,
            db_url=pg_url,
            store_path=tmp_path / f"r{n}",
            appservice_listen=ListenAddr("127.0.0.1", free_port()),
            agent=SLOW,
        )
        for n in range(2)
    ]
    backends = [c.appservice_listen for c in configs if c.appservice_listen is not None]
    balancer = RoundRobin(account.appservice_listen, backends)
    await balancer.start()
    group: list[Replica] = []
    try:
        for n, config in enumerate(configs):  # one by one: each one's ping reaches a listener
            group.append(Replica(config, f"r{n}", TEST_AGENT_DELAY_S="1"))
            await group[-1].start()
            await group[-1].wait_for("appservice.ping")
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
        pushes = (push(c, "both-at-once", [twice]) for c in configs)
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
        assert balancer.failed[backends[group.index(busy)]] >= 1
    finally:
        await asyncio.gather(*(r.close() for r in group))
        await balancer.stop()
