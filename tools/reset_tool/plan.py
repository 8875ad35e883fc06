"""What the reset will do, decided from the inspected facts alone (pure, no I/O).

Only what is the bot's is removed: its SQLite file (judged by schema) and the files it
writes in MATRIX_STORE_PATH. Everything else is left, with the reason, and the folder is
removed only when nothing else is in it. ``--force`` removes a DB file that is not the
bot's (or cannot be judged); nothing removes a directory at LAMBDA_MATRIX_DB.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adapter.matrix.homeserver.session import session_file
from reset_tool.facts import DbFacts, LocalFacts, StoreFacts

FORCE_HINT = "to delete it anyway, rerun with --force"
DAMAGED_HINT = (
    "If the bot stopped with store.unreadable naming this file, it is the bot's "
    "database, damaged: rerun with --force to delete it. Otherwise check "
    "LAMBDA_MATRIX_DB."
)


def bot_session_files(store_path: Path) -> tuple[Path, Path]:
    """What the bot writes in MATRIX_STORE_PATH (adapter/matrix/homeserver/session.py): the session,
    and its temporary copy, left behind by a crash between the write and the rename."""
    path = session_file(store_path)
    return path, path.with_suffix(".tmp")


@dataclass(frozen=True)
class Removal:
    path: Path
    size: int
    backup_name: str  # where it goes inside the backup folder


@dataclass(frozen=True)
class Kept:
    path: Path
    reason: str


@dataclass(frozen=True)
class ResetPlan:
    """Files to delete (or move to the backup), then the folder to remove once empty.
    A ``refusal`` says why nothing at all may be done."""

    removals: tuple[Removal, ...] = ()
    remove_store_dir: Path | None = None
    kept: tuple[Kept, ...] = ()
    forced: str | None = None  # what --force overrode, said in the plan
    refusal: str | None = None


def plan_reset(facts: LocalFacts, force: bool = False) -> ResetPlan:
    """Decide the reset from what exists. A refused plan holds no action at all."""
    db_removals, forced, refusal = _plan_db(facts.db, force)
    if refusal:
        return ResetPlan(refusal=refusal)
    store_removals, kept, remove_dir = _plan_store(facts.store)
    return ResetPlan(db_removals + store_removals, remove_dir, kept, forced)


def _plan_db(db: DbFacts, force: bool) -> tuple[tuple[Removal, ...], str | None, str | None]:
    """(removals, what --force overrode, refusal) for LAMBDA_MATRIX_DB."""
    removals = tuple(Removal(f.path, f.size, f.path.name) for f in db.files)
    name = f"LAMBDA_MATRIX_DB ({db.path})"
    if db.kind == "directory":
        return (
            (),
            None,
            (
                f"{name} is a directory. The reset tool never deletes a directory "
                "there, even with --force: check the variable."
            ),
        )
    problem = _not_the_bots(db, name)
    if problem is None:
        return removals, None, None
    if force:
        return removals, problem, None
    damaged = db.kind in ("not_sqlite", "unreadable")
    hint = DAMAGED_HINT if damaged else f"Check the variable; {FORCE_HINT}."
    return (), None, f"{problem}. {hint}"


def _not_the_bots(db: DbFacts, name: str) -> str | None:
    """Why the file at LAMBDA_MATRIX_DB cannot be deleted as the bot's, or None if it can."""
    if db.kind in ("bot", "empty") or (db.kind == "missing" and not db.files):
        return None
    if db.kind == "missing":
        leftovers = " and ".join(f.path.name for f in db.files)
        return (
            f"{leftovers} {'is' if len(db.files) == 1 else 'are'} there without {name}, "
            "so whose cannot be told; a fresh database must not inherit them"
        )
    if db.kind == "foreign":
        return f"{name} is an SQLite database but not the bot's: {db.detail}"
    if db.kind == "not_sqlite":
        return f"{name} is not an SQLite database ({db.detail})"
    return f"{name} cannot be read ({db.detail}), so whose it is cannot be told"


def _plan_store(store: StoreFacts) -> tuple[tuple[Removal, ...], tuple[Kept, ...], Path | None]:
    """(removals, kept, folder to remove) for MATRIX_STORE_PATH."""
    name = f"MATRIX_STORE_PATH ({store.path})"
    if store.kind == "missing":
        return (), (), None
    if store.kind == "not_dir":
        return (
            (),
            (Kept(store.path, f"{name} is not a folder, so not the bot's session folder"),),
            None,
        )
    bot_files = bot_session_files(store.path)
    removals, kept = [], []
    for entry in store.entries:
        if entry.db_file:
            continue  # LAMBDA_MATRIX_DB's own files, decided above
        if entry.path in bot_files and entry.session:
            removals.append(Removal(entry.path, entry.size, f"{store.path.name}/{entry.path.name}"))
        elif entry.path in bot_files:
            kept.append(
                Kept(entry.path, "named like the bot's session file, but does not hold one")
            )
        else:
            kept.append(Kept(entry.path, "not written by the bot"))
    # The folder's own line comes first: a long list of foreign entries may be cut short.
    if store.holds_db:
        kept.insert(0, Kept(store.path, "the folder holds LAMBDA_MATRIX_DB"))
    elif kept:
        kept.insert(
            0,
            Kept(
                store.path,
                f"the folder still holds {len(kept)} "
                f"entr{'y' if len(kept) == 1 else 'ies'} not the bot's",
            ),
        )
    remove_dir = None if kept else store.path
    return tuple(removals), tuple(kept), remove_dir
