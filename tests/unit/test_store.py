"""The SQLite key/value store: one contract, plus the errors a developer meets."""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.store import Birth, ProcessLock, SQLiteStore, StoreLocked, StoreUnreadable


async def test_get_set_delete_round_trip_json(store):
    assert store.created
    await store.set("a", {"x": [1, "two"]})
    assert await store.get("a") == {"x": [1, "two"]}
    await store.delete("a")
    assert await store.get("a") is None


async def test_prefix_scan_is_literal_and_ordered(store):
    for key in ["chat:@a:x:2", "chat:@a:x:1", "chat:@ab:x:1", "chat_%", "other"]:
        await store.set(key, key)
    assert [k for k, _ in await store.scan("chat:@a:")] == ["chat:@a:x:1", "chat:@a:x:2"]
    assert [k for k, _ in await store.scan("chat_%")] == ["chat_%"]


async def test_prefix_scan_is_case_sensitive(store):
    for key in ["chat:@A:x:1", "chat:@a:x:1", "CHAT:@a:x:2"]:
        await store.set(key, key)
    assert [k for k, _ in await store.scan("chat:@a:")] == ["chat:@a:x:1"]
    assert [k for k, _ in await store.scan("chat:@A:")] == ["chat:@A:x:1"]


async def test_prefix_scan_treats_like_wildcards_as_plain_characters(store):
    for key in ["a%b", "a%c", "axb", "a_b", "a_", "aXb", "a\\b"]:
        await store.set(key, key)
    assert [k for k, _ in await store.scan("a%")] == ["a%b", "a%c"]
    assert [k for k, _ in await store.scan("a_")] == ["a_", "a_b"]
    assert [k for k, _ in await store.scan("a\\")] == ["a\\b"]


@pytest.mark.parametrize("prefix", ["k\U0010ffff", "\U0010ffff\U0010ffff", "k\ud7ff", ""])
async def test_prefix_scan_at_the_edges_of_unicode(store, prefix):
    """A prefix ending in the highest code point, or just below the surrogates, still
    bounds the range correctly; an empty prefix lists everything."""
    keys = [
        "k",
        "k\ud7ff",
        "k\ud7ffz",
        "k\ue000",
        "k\U0010ffff",
        "k\U0010ffff\U0010ffffz",
        "l",
        "\U0010ffff",
        "\U0010ffff\U0010ffff",
        "\U0010ffff\U0010ffffa",
    ]
    for key in keys:
        await store.set(key, 1)
    got = [k for k, _ in await store.scan(prefix)]
    assert got == sorted(k for k in [*keys, "birth"] if k.startswith(prefix))


async def test_transaction_is_all_or_nothing(store):
    await store.set("keep", 1)
    with pytest.raises(RuntimeError):
        async with store.transaction() as tx:
            tx.set("a", 1)
            tx.delete("keep")
            raise RuntimeError("boom")
    assert await store.get("a") is None and await store.get("keep") == 1
    async with store.transaction() as tx:
        tx.set("a", 1)
        tx.delete("keep")
    assert await store.get("a") == 1 and await store.get("keep") is None


async def test_reopen_sees_data_and_is_not_created(tmp_path):
    s = await SQLiteStore.open(tmp_path / "t.db")
    await s.set("k", "v")
    await s.close()
    s = await SQLiteStore.open(tmp_path / "t.db")
    assert not s.created and await s.get("k") == "v"
    await s.close()


async def test_corrupt_file_raises_clear_error_naming_the_reset_tool_and_is_kept(tmp_path):
    path = tmp_path / "t.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreUnreadable) as err:
        await SQLiteStore.open(path)
    assert "tools/reset_local.py" in str(err.value)
    assert path.read_bytes() == b"this is not sqlite" * 100


def test_process_lock_is_exclusive(tmp_path):
    first, second = ProcessLock(tmp_path / "t.db"), ProcessLock(tmp_path / "t.db")
    first.acquire()
    with pytest.raises(StoreLocked):
        second.acquire()
    first.release()
    second.acquire()
    second.release()


async def test_a_new_file_records_its_birth_and_keeps_it_across_reopens(tmp_path):
    s = await SQLiteStore.open(tmp_path / "t.db", birth_cause="local_reset")
    born = s.birth
    assert born is not None and born.cause == "local_reset" and born.at <= time.time()
    await s.close()
    s = await SQLiteStore.open(tmp_path / "t.db")  # reopened by the bot: still the reset's
    assert not s.created and s.birth == born
    await s.close()


async def test_a_legacy_reset_marker_reads_as_a_local_reset_birth(tmp_path):
    s = await SQLiteStore.open(tmp_path / "t.db")
    await s.delete("birth")
    await s.set("reset_marker", {"at": "2026-01-02T03:04:05Z", "by": "reset_local"})
    await s.close()
    s = await SQLiteStore.open(tmp_path / "t.db")
    assert s.birth == Birth(1767323045, "local_reset")
    await s.close()


def test_a_db_that_cannot_be_created_is_unwritable_not_unreadable(tmp_path):
    """A full disk (here: a file-size limit of 0 for the process) at the first start: the
    error names the disk, not the reset tool, and no half-made file is left."""
    code = (
        "import asyncio, sys\n"
        "from core.store import SQLiteStore, StoreUnwritable\n"
        "try:\n"
        f"    asyncio.run(SQLiteStore.open({str(tmp_path / 'new.db')!r}))\n"
        "except StoreUnwritable as err:\n"
        "    print(err)\n"
        "    sys.exit(3)\n"
    )

    def no_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))

    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        preexec_fn=no_disk,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 3, done.stderr
    assert "free disk space" in done.stdout and "reset" not in done.stdout
    assert not (tmp_path / "new.db").exists()
