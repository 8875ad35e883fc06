"""A throwaway local Synapse with a bot configured on it, for the demo and the benchmarks:
everything lives in one temporary folder, removed afterwards."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from homeserver import LocalHomeserver

from adapter.matrix.config import Config  # the caller puts the repository on sys.path


@contextmanager
def throwaway_homeserver(prefix: str) -> Iterator[tuple[LocalHomeserver, Path]]:
    """A started Synapse and the temporary folder that holds it (and the bots' state)."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    hs = LocalHomeserver(work / "synapse")
    hs.start()
    try:
        yield hs, work
    finally:
        hs.stop()
        shutil.rmtree(work, ignore_errors=True)


def bot_config(hs: LocalHomeserver, work: Path, name: str) -> Config:
    """A bot account ``name`` on ``hs``, with its DB and session in ``work``."""
    account = hs.register(name, f"{name}-pw")
    return Config(
        homeserver=hs.url,
        user_id=account.user_id,
        password=account.password,
        access_token=None,
        db_path=work / f"{name}.db",
        store_path=work / f"{name}_store",
        log_format="json",
        log_level="info",
    )
