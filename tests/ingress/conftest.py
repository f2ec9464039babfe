"""Fixtures for the ingress tests: a private Dovecot per test, a tiny real inbound path, and a
serving hub (both SMTP listeners on loopback, in this process) with a coordinator account."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import Instance, RunningHub
from tests.deliver.test_relay_e2e import add_user
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


@pytest.fixture
def served(instance: Instance) -> Iterator[Instance]:
    """A hub serving both listeners in this process (its log records reach ``caplog``), with
    the coordinator account of ``test_relay_e2e``."""
    add_user(instance)
    hub = RunningHub(instance.config).start()
    try:
        yield instance
    finally:
        hub.stop()
