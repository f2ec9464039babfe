"""Fixtures for the IMAP tests: a private Dovecot per test, and a tiny real inbound path."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.ingress.dovecot import Dovecot
from tests.ingress.imap_support import MemoryHub


@pytest.fixture
def dovecot() -> Iterator[Dovecot]:
    """A running private Dovecot (default maildir separator ".")."""
    with Dovecot() as server:
        yield server


@pytest.fixture
def dovecot_slash() -> Iterator[Dovecot]:
    """A private Dovecot whose namespace uses "/" as hierarchy separator."""
    with Dovecot(separator="/") as server:
        yield server


@pytest.fixture
def memory_hub() -> MemoryHub:
    """A fresh in-memory inbound path (dict keyed by digest)."""
    return MemoryHub()
