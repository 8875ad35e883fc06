"""What only the SQLite file has: reopening, a corrupt file, the process lock, a folder it
cannot be created in. The contract both backends keep is tests/unit/test_store_contract.py."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest

from core.store import ProcessLock, SQLiteStore, StoreLocked, StoreUnreadable


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
