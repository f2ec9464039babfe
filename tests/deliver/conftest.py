"""Fixtures shared by the delivery tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.deliver.smtp_double import SmtpDouble


@pytest.fixture
def servers() -> Iterator[list[SmtpDouble]]:
    """The scripted servers a test starts (``smtp_double.serve``), stopped after it."""
    started: list[SmtpDouble] = []
    yield started
    for s in started:
        s.stop()
