"""Shared fixtures: a real Synapse and a real PostgreSQL for the session (each started on first
use, one per pytest-xdist worker), and per-test bots, users and databases on them."""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

from homeserver import LocalHomeserver
from postgres import LocalPostgres

_databases = itertools.count()


@pytest.fixture(scope="session")
def homeserver(tmp_path_factory: pytest.TempPathFactory):
    hs = LocalHomeserver(tmp_path_factory.mktemp("synapse"))
    hs.start()
    yield hs
    hs.stop()


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL cluster (``tools/postgres.py``): trust on its socket, a
    password on 127.0.0.1."""
    server = LocalPostgres()
    server.start()
    yield server
    server.remove()


@pytest.fixture
def pg_url(postgres: LocalPostgres) -> str:
    """The URL of a fresh, empty database on the session's PostgreSQL (password included)."""
    return postgres.create_database(f"t{os.getpid()}_{next(_databases)}")
