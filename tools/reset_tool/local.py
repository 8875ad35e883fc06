"""Carrying out the local part of a reset plan, under the DB's process lock."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from core.store import ProcessLock, SQLiteStore
from reset_tool.plan import ResetPlan


class ResetLock:
    """The DB's process lock (the one a running bot holds), held while the tool runs.

    Its file goes on release when this tool created it, or when the DB was reset (the
    lock file belongs to the old DB). It is unlinked before the lock is let go, so a bot
    that starts meanwhile simply makes a new one.
    """

    def __init__(self, db_path: Path) -> None:
        self._lock = ProcessLock(db_path)
        self.discard = not self._lock.path.exists()

    def acquire(self) -> None:
        self._lock.acquire()  # StoreLocked while a bot runs

    def holder_pid(self) -> str:
        return self._lock.holder_pid()

    def release(self) -> None:
        if self.discard:
            self._lock.path.unlink(missing_ok=True)
        self._lock.release()


def backup_folder(backup: Path) -> Path:
    """A new timestamped folder in ``backup`` for what a reset moves away."""
    target = backup / time.strftime("reset-%Y%m%d-%H%M%S")
    target.mkdir(parents=True, exist_ok=False)
    return target


def carry_out(plan: ResetPlan, backup: Path | None, target: Path | None = None) -> Path | None:
    """Delete the plan's files (or move them to a timestamped folder in ``backup``, or to
    ``target`` when given, which is returned), then remove the emptied session folder."""
    if plan.refusal:
        raise ValueError(f"a refused plan cannot be carried out: {plan.refusal}")
    if target is None and backup is not None and plan.removals:
        target = backup_folder(backup)
    for removal in plan.removals:
        if target is None:
            removal.path.unlink()
        else:
            dest = target / removal.backup_name
            dest.parent.mkdir(exist_ok=True)
            shutil.move(removal.path, dest)
    if plan.remove_store_dir is not None:
        plan.remove_store_dir.rmdir()  # fails, rather than deletes, if something appeared
    return target


async def create_fresh_db(db_path: Path) -> None:
    """A new DB whose birth record says local_reset, so heals of older rooms say so."""
    store = await SQLiteStore.open(db_path, birth_cause="local_reset")
    await store.close()
