"""Unit fixtures: a fresh SQLite store per test."""

from __future__ import annotations

import pytest

from core.store import SQLiteStore


@pytest.fixture
async def store(tmp_path):
    s = await SQLiteStore.open(tmp_path / "t.db")
    yield s
    await s.close()
