"""A send's outcome to the row's next state: pure decisions, no server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from mailhub.config import DeliveryConfig, HostPort
from mailhub.deliver.retry import backoff_delay, next_step
from mailhub.deliver.smtp_client import SENT, SendResult

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
CFG = DeliveryConfig(smarthost=HostPort("127.0.0.1", 2526), retry_initial=60, retry_max=3600,
                     give_up_after=86400)


def test_backoff_doubles_from_the_initial_delay_up_to_the_cap() -> None:
    assert [backoff_delay(n, 60, 3600).total_seconds() for n in (0, 1, 2, 3, 7, 8, 30)] == [
        60, 60, 120, 240, 3600, 3600, 3600]


def test_sent_refused_deferred_and_too_old() -> None:
    young = NOW - timedelta(hours=1)
    assert next_step(SENT, attempts=1, created_at=young, now=NOW, cfg=CFG) == ("sent", None)
    refused = SendResult(False, True, "550 5.1.1 no such user")
    assert next_step(refused, attempts=1, created_at=young, now=NOW, cfg=CFG) == ("failed", None)
    deferred = SendResult(False, False, "451 4.3.0 try later")
    assert next_step(deferred, attempts=3, created_at=young, now=NOW, cfg=CFG) == (
        "retry", NOW + timedelta(seconds=240))
    old = NOW - timedelta(seconds=CFG.give_up_after)
    assert next_step(deferred, attempts=3, created_at=old, now=NOW, cfg=CFG) == ("failed", None)
