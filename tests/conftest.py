"""Shared fixtures: a real Synapse for the session, and per-test bots and users on it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

from homeserver import LocalHomeserver


@pytest.fixture(scope="session")
def homeserver(tmp_path_factory: pytest.TempPathFactory):
    hs = LocalHomeserver(tmp_path_factory.mktemp("synapse"))
    hs.start()
    yield hs
    hs.stop()
