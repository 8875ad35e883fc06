"""Replicas (SPEC §10): several bot processes on one PostgreSQL share the work, and losing any
of them (kill -9, a stall past its lease) loses nothing and answers nothing twice. The bots
are real processes; the users real clients of the real Synapse."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession
from postgres import LocalPostgres

from adapter.matrix.config import Config, ListenAddr
from adapter.matrix.handlers.chat_rooms import linked_rooms
from tests.integration.conftest import TIMEOUT, BotProcess, doctor_tool, unique

SLOW = "tests.integration.agents:SlowAgent"
HISTORY = "tests.integration.agents:HistoryAgent"


class Replica(BotProcess):
    """A bot process whose log is read as it comes (a pipe nobody reads would stall it)."""

    def __init__(self, config: Config, name: str, **env: str) -> None:
        super().__init__(config, **env)
        self.config = config
        self.name = name
        self._reader: asyncio.Task | None = None

    async def start(self) -> None:
        await super().start()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc and self.proc.stderr
        while raw := await self.proc.stderr.readline():
            try:
                self.lines.append(json.loads(raw))
            except json.JSONDecodeError:
                self.lines.append({"event": "raw", "text": raw.decode(errors="replace")})

    def named(self, event: str, **fields: Any) -> list[dict]:
        return [
            line
            for line in self.lines
            if line.get("event") == event and all(line.get(k) == v for k, v in fields.items())
        ]

    async def wait_for(
        self, event: str, timeout: float = TIMEOUT, count: int = 1, **fields: Any
    ) -> dict:
        deadline = time.monotonic() + timeout
        while len(found := self.named(event, **fields)) < count:
            assert time.monotonic() < deadline, (
                f"{self.name}: no {event} {fields}: {[e.get('event') for e in self.lines[-20:]]}"
            )
            assert self.proc and self.proc.returncode is None, (
                f"{self.name} exited: {self.lines[-5:]}"
            )
            await asyncio.sleep(0.05)
        return found[-1]

    @property
    def syncing(self) -> bool:
        """Whether this replica leads the sync now, as its log says."""
        started = len(self.named("sync.starting"))
        return started > len(self.named("sync.stopped_leading"))

    def stall(self) -> None:
        assert self.proc
        self.proc.send_signal(signal.SIGSTOP)

    def wake(self) -> None:
        assert self.proc
        self.proc.send_signal(signal.SIGCONT)

    async def close(self) -> None:
        if self.proc and self.proc.returncode is None:
            self.wake()
            await self.terminate()
        if self._reader:
            await asyncio.gather(self._reader, return_exceptions=True)


@pytest.fixture
async def replicas(bot_config: Config, pg_url: str, tmp_path: Path):
    """Start replicas of one bot on one fresh PostgreSQL database, each in its own folder."""
    started: list[Replica] = []

    async def start(count: int, **env: str) -> list[Replica]:
        batch = []
        for _ in range(count):
            name = f"r{len(started)}"
            config = replace(bot_config, db_url=pg_url, store_path=tmp_path / name)
            replica = Replica(config, name, **env)
            await replica.start()
            started.append(replica)
            batch.append(replica)
        for replica in batch:
            await replica.wait_for("replica.started")
        return batch

    yield start
    await asyncio.gather(*(r.close() for r in started))


def answers(user, room_id: str, bot_id: str, prefix: str) -> list[str]:
    """The bot's echoes of ``prefix…`` messages in the room, in timeline order."""
    return [
        ev["content"]["body"].removeprefix("Echo: ")
        for ev in user.bot_messages(room_id, bot_id)
        if ev["content"].get("body", "").startswith(f"Echo: {prefix}")
    ]


async def leader(group: list[Replica]) -> Replica:
    deadline = time.monotonic() + TIMEOUT
    while not (found := [r for r in group if r.syncing and r.proc and r.proc.returncode is None]):
        assert time.monotonic() < deadline, "no replica syncs"
        await asyncio.sleep(0.05)
    await found[0].wait_for("bot.ready")
    return found[0]


async def handling(group: list[Replica], text: str) -> Replica:
    """The replica whose agent is thinking about ``text``."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        for replica in group:
            if replica.named("test_agent.thinking", text=text):
                return replica
        assert time.monotonic() < deadline, f"no replica thinks about {text!r}"
        await asyncio.sleep(0.05)


async def test_two_replicas_answer_users_in_parallel_in_order(replicas, make_user, bot_config):
    group = await replicas(2)
    await leader(group)
    bot_id = bot_config.user_id
    users = [await make_user(f"u{i}") for i in range(3)]
    chats = [(await user.onboard(bot_id))[2] for user in users]
    sent = [f"m{i}" for i in range(4)]
    for body in sent:
        for user, chat in zip(users, chats, strict=True):
            await user.send(chat, body)
    for user, chat in zip(users, chats, strict=True):
        await user.wait_for(lambda u=user, c=chat: len(answers(u, c, bot_id, "m")) >= len(sent))
        assert answers(user, chat, bot_id, "m") == sent
    taken = {r.name: len(r.named("room.taken")) for r in group}
    print("rooms taken per replica:", taken)
    # One session, one device: the second replica reused the first one's login.
    assert len({(await r.wait_for("bot.logged_in"))["device_id"] for r in group}) == 1
    code, out, err = await doctor_tool(group[0].config, "--replicas")
    assert code == 0, err
    assert "Replicas: 2 live" in out and out.count("syncs") == 2, out  # the head and its line


@pytest.mark.parametrize("count", [2])
async def test_kill_9_of_the_syncing_replica_another_syncs_on(
    replicas, make_user, bot_config, count
):
    group = await replicas(count)
    first = await leader(group)
    bot_id = bot_config.user_id
    alice = await make_user("alice")
    _, _, chat = await alice.onboard(bot_id)
    await alice.ask(chat, bot_id, "before", "Echo: before")
    await first.kill()
    sent = [f"after {i}" for i in range(3)]
    for body in sent:
        await alice.send(chat, body)
    await leader([r for r in group if r is not first])
    await alice.wait_for(lambda: len(answers(alice, chat, bot_id, "after")) >= len(sent), 60)
    assert answers(alice, chat, bot_id, "") == ["before", *sent]


async def test_kill_9_of_the_replica_answering_a_room_mid_answer_answers_once(
    replicas, make_user, bot_config
):
    group = await replicas(2, LAMBDA_AGENT=SLOW, TEST_AGENT_DELAY_S="3")
    await leader(group)
    bot_id = bot_config.user_id
    alice = await make_user("alice")
    _, _, chat = await alice.onboard(bot_id)
    await alice.send(chat, "once")
    busy = await handling(group, "once")
    await busy.kill()
    other = next(r for r in group if r is not busy)
    await other.wait_for("message.answered", 60)
    await alice.wait_for(lambda: answers(alice, chat, bot_id, "once"))
    await alice.ask(chat, bot_id, "next", "Echo: next")  # anything of "once" came before
    assert answers(alice, chat, bot_id, "") == ["once", "next"]


async def test_each_replica_answers_with_the_rooms_conversation_and_plain_replies(
    replicas, make_user, bot_config
):
    """Whichever replica answers, the agent gets the conversation as the room has it (an edit
    included, whoever saw it), and an answer that follows its question is no rich reply, as
    with one process. Three users' rooms on two replicas: rooms are spread between them."""
    group = await replicas(2, LAMBDA_AGENT=HISTORY)
    await leader(group)
    bot_id = bot_config.user_id
    for i in range(3):
        user = await make_user(f"h{i}")
        _, _, chat = await user.onboard(bot_id)
        first = await user.ask(chat, bot_id, "one", "Echo: one |")
        one = next(e["event_id"] for e in user.timeline[chat] if e["content"].get("body") == "one")
        await user.send_content(
            chat,
            {
                "msgtype": "m.text",
                "body": "* one, edited",
                "m.new_content": {"msgtype": "m.text", "body": "one, edited"},
                "m.relates_to": {"rel_type": "m.replace", "event_id": one},
            },
        )
        second = await user.ask(chat, bot_id, "two", "Echo: two |")
        assert second["content"]["body"] == (
            f"Echo: two | user: one, edited; assistant: {first['content']['body']}"
        )
        for answer in (first, second):
            assert "m.in_reply_to" not in answer["content"].get("m.relates_to", {}), answer
    taken = {r.name: len(r.named("room.taken")) for r in group}
    print("rooms taken per replica:", taken)


async def test_a_replica_stalled_past_its_lease_sends_nothing_when_it_wakes(
    replicas, make_user, bot_config
):
    group = await replicas(2, LAMBDA_AGENT=SLOW, TEST_AGENT_DELAY_S="2")
    await leader(group)
    bot_id = bot_config.user_id
    alice = await make_user("alice")
    _, _, chat = await alice.onboard(bot_id)
    await alice.send(chat, "stalled")
    busy = await handling(group, "stalled")
    busy.stall()
    other = next(r for r in group if r is not busy)
    await other.wait_for("message.answered", 60)
    await alice.wait_for(lambda: answers(alice, chat, bot_id, "stalled"))
    busy.wake()
    await busy.wait_for("delivery.lease_lost")
    await alice.ask(chat, bot_id, "after", "Echo: after")
    assert answers(alice, chat, bot_id, "") == ["stalled", "after"]


async def test_one_users_onboarding_and_creation_throttle_hold_across_replicas(
    replicas, make_user, bot_config
):
    """Two invites at once, each room taken by either replica: one Space. Then five rooms a
    minute, whichever replicas handle the commands (the lobby and the chat are two rooms)."""
    group = await replicas(2)
    await leader(group)
    bot_id = bot_config.user_id
    alice = await make_user("alice")
    lobbies = await asyncio.gather(alice.open_lobby(bot_id), alice.open_lobby(bot_id))
    welcomes = [await alice.wait_reply(lobby, bot_id, "Space") for lobby in lobbies]
    await alice.wait_for(lambda: len(alice.invites) >= 2)
    assert sum(len(r.named("space.created")) for r in group) == 1
    assert len(alice.invites) == 2, alice.invites  # one Space and its first chat
    for room_id in sorted(alice.invites):
        await alice.join(room_id)
    links = [linked_rooms(w["content"]["body"]) for w in welcomes]
    lobby, chat = lobbies[0], next(found for found in links if len(found) >= 2)[1]
    for i in range(5):
        await alice.ask((lobby, chat)[i % 2], bot_id, f"!new n{i}", f"“n{i}”")
    await alice.ask(chat, bot_id, "!new n5", "faster than I can keep up")
    print("rooms taken per replica:", {r.name: len(r.named("room.taken")) for r in group})


async def test_archive_then_confirm_on_another_replica_archives(replicas, make_user, bot_config):
    """The pending confirmation is in the shared store: ``!confirm`` works on whichever
    replica takes the room after the one that asked was killed."""
    group = await replicas(2)
    await leader(group)
    bot_id = bot_config.user_id
    alice = await make_user("alice")
    _, _, chat = await alice.onboard(bot_id)
    await alice.ask(chat, bot_id, "!archive", "Send !confirm")
    # The room's holder now: the replica that took it last (the highest lease term).
    asked = max(
        group,
        key=lambda r: max(e["term"] for e in r.named("room.taken", room_id=chat) or [{"term": -1}]),
    )
    await asked.kill()
    await alice.ask(chat, bot_id, "!confirm", "Archived")
    other = next(r for r in group if r is not asked)
    assert other.named("chat.archived", room_id=chat)


async def health_of(url: str) -> tuple[int, list[str]]:
    """``/health``'s status and the reasons of its problems."""
    async with ClientSession() as http, http.get(f"{url}/health") as resp:
        return resp.status, [p["reason"] for p in (await resp.json()).get("problems", [])]


async def until_health(replica: Replica, status: int, reason: str | None = None) -> None:
    url = (await replica.wait_for("metrics.listening"))["url"]
    deadline = time.monotonic() + TIMEOUT
    while (seen := await health_of(url))[0] != status or (reason and reason not in seen[1]):
        assert time.monotonic() < deadline, f"{replica.name}: /health {seen}, not {status}"
        await asyncio.sleep(0.2)


async def test_each_replica_cut_off_from_the_database_reports_503_then_recovers(
    bot_config: Config, tmp_path: Path
):
    """The one that syncs and the one that stands by: /health says store_refuses_writes while
    PostgreSQL is away, and 200 again once it is back."""
    server = LocalPostgres()
    server.start()
    url = server.create_database(unique("health"))
    group = [
        Replica(
            replace(
                bot_config,
                db_url=url,
                store_path=tmp_path / f"r{i}",
                metrics_addr=ListenAddr("127.0.0.1", 0),
            ),
            f"r{i}",
        )
        for i in range(2)
    ]
    try:
        for replica in group:
            await replica.start()
        await leader(group)
        for replica in group:
            await until_health(replica, 200)
        server.stop()
        for replica in group:
            await until_health(replica, 503, "store_refuses_writes")
        server.start()
        # The one that stands by says so at its next renewal (the syncing one, at its next
        # recorded round: a long poll away when nobody writes).
        await asyncio.wait(
            [asyncio.ensure_future(until_health(r, 200)) for r in group],
            return_when=asyncio.FIRST_COMPLETED,
        )
    finally:
        await asyncio.gather(*(r.close() for r in group))
        server.remove()
