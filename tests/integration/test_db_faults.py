"""A local DB that refuses writes (SPEC §8): a full disk while the bot runs holds messages
back, tells their owner, and answers each once when space returns; a DB that is read-only at
start stops the bot with exit 1 and the remedy. Nothing is lost, duplicated or crashed.

The disk is "filled" for the bot's process only, unprivileged: its file-size limit
(RLIMIT_FSIZE, set from outside with prlimit) drops to one byte, so every write SQLite makes
fails while reads still work, and is lifted again to give the space back. Read-only is a
chmod for a user, and the immutable attribute for root (whom modes do not stop)."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from adapter.matrix.delivery.inbox import PREFIX as INBOX_PREFIX
from core.store import SQLiteStore
from tests.integration.conftest import BotProcess, BotRunner

STORE_DOWN = "my local storage is full or read-only"
STATE = r"/rooms/[^/]+/state$"


def fill_disk(proc: BotProcess) -> None:
    """From now on every write of the bot's process to a file fails (EFBIG)."""
    assert proc.proc
    _, hard = resource.prlimit(proc.proc.pid, resource.RLIMIT_FSIZE)
    resource.prlimit(proc.proc.pid, resource.RLIMIT_FSIZE, (1, hard))


def free_disk(proc: BotProcess) -> None:
    assert proc.proc
    _, hard = resource.prlimit(proc.proc.pid, resource.RLIMIT_FSIZE)
    resource.prlimit(proc.proc.pid, resource.RLIMIT_FSIZE, (hard, hard))


@contextmanager
def read_only(path: Path) -> Iterator[None]:
    """``path`` (a file or folder) cannot be written by the bot's user inside the block."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(mode & ~0o222)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    if (
        not shutil.which("chattr")
        or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0
    ):
        pytest.skip("running as root, and chattr +i is not available here")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


async def wait_line(proc: BotProcess, event: str, **fields: object) -> dict:
    """The next line of the process's log with ``event`` and these field values."""
    while True:
        line = await proc.wait_log(event)
        if all(line.get(k) == v for k, v in fields.items()):
            return line


def echoes(user, room_id: str, bot_id: str) -> list[str]:
    return [
        ev["content"]["body"].removeprefix("Echo: ")
        for ev in user.bot_messages(room_id, bot_id)
        if ev["content"]["body"].startswith("Echo: ")
    ]


def store_notices(user, room_id: str, bot_id: str) -> list[dict]:
    return [ev for ev in user.bot_messages(room_id, bot_id) if STORE_DOWN in ev["content"]["body"]]


async def inbox_left(config) -> list[str]:
    store = await SQLiteStore.open(config.db_path)
    try:
        return [key for key, _ in await store.scan(INBOX_PREFIX)]
    finally:
        await store.close()


@pytest.mark.parametrize("recovery", ["space_returns", "restart_after_space_returns"])
async def test_a_full_disk_holds_messages_back_and_answers_each_once_when_space_returns(
    bot, make_user, recovery
):
    alice = await make_user("alice")
    _, _, chat = await alice.onboard(bot.user_id)
    await bot.stop()
    proc = BotProcess(bot.config, LOG_LEVEL="info")
    await proc.start()
    await proc.wait_log("bot.ready")
    fill_disk(proc)
    sent = ["full 1", "full 2", "full 3"]
    for body in sent:
        await alice.send(chat, body)
    failed = await wait_line(proc, "store.write_failed", during="sync")
    assert "retries by itself" in failed["remedy"] and failed["level"] == "error"
    await alice.wait_for(lambda: len(store_notices(alice, chat, bot.user_id)) == len(sent))
    assert echoes(alice, chat, bot.user_id) == []
    assert proc.proc and proc.proc.returncode is None  # still running, still syncing
    if recovery == "space_returns":
        free_disk(proc)
        assert (await proc.wait_log("store.recovered"))["waited"] == len(sent)
        await alice.wait_for(lambda: len(echoes(alice, chat, bot.user_id)) == len(sent), 90)
        assert await proc.terminate() == 0
    else:
        assert await proc.terminate() == 0  # stopped while the disk is still full
    await bot.start()
    await alice.ask(chat, bot.user_id, "after", "Echo: after")
    await bot.restart()
    await alice.ask(chat, bot.user_id, "later", "Echo: later")
    assert echoes(alice, chat, bot.user_id) == [*sent, "after", "later"]
    assert len(store_notices(alice, chat, bot.user_id)) == len(sent)


@pytest.mark.warnings_expected("the heal fails on the homeserver first")
@pytest.mark.parametrize(
    "lost, told", [("everything", 0), ("chat", 1)], ids=["owner_unknown", "owner_known"]
)
async def test_a_heal_whose_records_cannot_be_written_is_retried_and_answered_once(
    bot_config, proxy, make_user, logs, lost, told
):
    config = replace(bot_config, homeserver=proxy.url)
    runner = BotRunner(config, logs)
    await runner.start()
    alice = await make_user("alice")
    _, _, chat = await alice.onboard(runner.user_id)
    await runner.stop()
    await runner.lose(lost)
    proxy.fail(STATE, 502, {"errcode": "M_UNKNOWN", "error": "bad gateway"})
    proc = BotProcess(config, LOG_LEVEL="info")
    await proc.start()
    await proc.wait_log("bot.ready")
    await alice.send(chat, "heal me")
    await alice.wait_reply(chat, runner.user_id, "I'll retry")
    fill_disk(proc)
    proxy.heal()  # the next try fetches the room's state, and cannot write what it learnt
    failed = await wait_line(proc, "store.write_failed", during="handling")
    assert failed["room_id"] == chat
    free_disk(proc)
    await alice.wait_reply(chat, runner.user_id, "Echo: heal me", timeout=90)
    assert await proc.terminate() == 0
    await runner.start()
    await alice.ask(chat, runner.user_id, "after", "Echo: after")
    await runner.stop()
    assert echoes(alice, chat, runner.user_id) == ["heal me", "after"]
    # Told once that it will be retried, and once about the DB when the bot still knows whose
    # room this is (after a total loss it learns that only from the heal it cannot write).
    bodies = [ev["content"]["body"] for ev in alice.bot_messages(chat, runner.user_id)]
    assert len([b for b in bodies if "I'll retry" in b]) == 1
    assert len(store_notices(alice, chat, runner.user_id)) == told


async def test_an_answered_message_the_full_disk_keeps_in_the_inbox_is_not_answered_again(
    bot, make_user
):
    alice = await make_user("alice")
    _, _, chat = await alice.onboard(bot.user_id)
    await bot.stop()
    proc = BotProcess(
        bot.config,
        LOG_LEVEL="info",
        TEST_AGENT_DELAY_S="2",
        LAMBDA_AGENT="tests.integration.agents:SlowAgent",
    )
    await proc.start()
    await proc.wait_log("bot.ready")
    event_id = await alice.send(chat, "answered, not dropped")
    await proc.wait_log("test_agent.thinking")
    fill_disk(proc)  # the answer goes out; dropping it from the inbox fails
    await wait_line(proc, "store.write_failed", during="done")
    await alice.wait_reply(chat, bot.user_id, "Echo: answered, not dropped")
    free_disk(proc)
    await proc.wait_log("store.recovered")  # the next round drops the finished entry
    assert await proc.terminate() == 0
    assert await inbox_left(bot.config) == []
    await bot.start()
    await alice.ask(chat, bot.user_id, "after", "Echo: after")
    assert echoes(alice, chat, bot.user_id) == ["answered, not dropped", "after"]
    assert not bot.logs.named("message.answered", event_id=event_id)


@pytest.mark.warnings_expected("a read-only DB is an error")
@pytest.mark.parametrize("what", ["file", "folder"])
async def test_a_db_read_only_at_start_stops_the_bot_with_the_remedy_and_loses_nothing(
    bot, make_user, what
):
    alice = await make_user("alice")
    _, _, chat = await alice.onboard(bot.user_id)
    await alice.ask(chat, bot.user_id, "before", "Echo: before")
    await bot.stop()
    db = bot.config.db_path
    target = db if what == "file" else db.parent
    content, started = db.read_bytes(), len(bot.logs.named("bot.starting"))
    await alice.send(chat, "sent while it was refused")
    with read_only(target):
        await bot.start(wait_ready=False)
        assert await bot.exit_code() == 1
        [line] = bot.logs.named("store.read_only")
        assert line["path"] == str(target) and line["log_level"] == "error"
        assert "chmod" in line["remedy"] and "do not reset" in line["remedy"]
    assert db.read_bytes() == content and len(bot.logs.named("bot.starting")) == started
    await bot.start()
    await alice.wait_reply(chat, bot.user_id, "Echo: sent while it was refused")
    await alice.ask(chat, bot.user_id, "after", "Echo: after")
    assert echoes(alice, chat, bot.user_id) == ["before", "sent while it was refused", "after"]


@pytest.mark.warnings_expected("a read-only DB is an error at the next start")
async def test_a_db_made_read_only_while_running_keeps_answering_and_the_next_start_refuses(
    bot, make_user
):
    alice = await make_user("alice")
    _, _, chat = await alice.onboard(bot.user_id)
    with read_only(bot.config.db_path):
        # The open file keeps taking writes (SQLite's write-ahead log): nothing to refuse yet.
        await alice.ask(chat, bot.user_id, "while read-only", "Echo: while read-only")
        assert await bot.stop() == 0
        await bot.start(wait_ready=False)
        assert await bot.exit_code() == 1
        assert bot.logs.named("store.read_only", path=str(bot.config.db_path))
    await bot.start()
    await alice.ask(chat, bot.user_id, "after", "Echo: after")
    assert echoes(alice, chat, bot.user_id) == ["while read-only", "after"]
    assert bot.logs.named("sync.starting", resume=True)[-1]["inbox"] == 0
