"""Fixtures for the store's tests: an audit log on a fresh SQLite file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlmodel import create_engine

from mailhub.store.audit import AUDIT_TABLES
from tests.pgserver import throwaway_engine


@pytest.fixture
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """The audit tables on a new SQLite file (a module may override it, e.g. to add
    PostgreSQL)."""
    with throwaway_engine("sqlite", request.config, tmp_path / "audit.db", create_engine,
                          list(AUDIT_TABLES)) as eng:
        yield eng
