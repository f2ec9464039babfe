"""Fixtures shared by the delivery tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from mailhub.store.db import make_engine
from mailhub.store.models import OutboundItem, Payload
from tests.deliver.smtp_double import SmtpDouble
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
