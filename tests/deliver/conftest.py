"""Fixtures shared by the delivery tests."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from mailhub.crypto.atrest import AtRest
from mailhub.store.db import make_engine, migrate
from mailhub.store.models import OutboundItem, Payload
from tests.deliver.smtp_double import SmtpDouble
from tests.deliver.worker_support import Store
from tests.pgserver import throwaway_engine


@pytest.fixture
def servers() -> Iterator[list[SmtpDouble]]:
    """The scripted servers a test starts (``smtp_double.serve``), stopped after it."""
    started: list[SmtpDouble] = []
    yield started
    for s in started:
        s.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """The queue's two tables on a new SQLite file, and on a new PostgreSQL database."""
    tables = [OutboundItem.__table__, Payload.__table__]  # type: ignore[attr-defined]
    with throwaway_engine(request.param, request.config, tmp_path / "queue.db", make_engine,
                          tables) as eng:
        yield eng


@pytest.fixture
def store() -> Iterator[Store]:
    """A migrated hub database on a throwaway SQLite file, with a fresh at-rest key."""
    root = Path(tempfile.mkdtemp(prefix="mhw", dir="/tmp"))
    engine = make_engine(f"sqlite:///{root}/hub.sqlite")
    migrate(engine)
    try:
        yield Store(engine, AtRest(os.urandom(32)), root)
    finally:
        engine.dispose()
        shutil.rmtree(root, ignore_errors=True)
