"""What a send's outcome means for its row: sent, retried after an exponential backoff, or
failed (permanent refusal, or too old). Pure functions over plain data, tested without a server."""

from __future__ import annotations

from datetime import datetime, timedelta

from mailhub.config import DeliveryConfig
from mailhub.deliver.smtp_client import SendResult


def backoff_delay(attempts: int, initial: int, maximum: int) -> timedelta:
    """Exponential backoff: initial, 2*initial, 4*initial ... capped at maximum (seconds)."""
    return timedelta(seconds=min(maximum, initial * (2 ** max(0, attempts - 1))))


def next_step(result: SendResult, *, attempts: int, created_at: datetime, now: datetime,
              cfg: DeliveryConfig) -> tuple[str, datetime | None]:
    """Decide what a send result means: ("sent"|"retry"|"failed", next attempt time)."""
    if result.ok:
        return "sent", None
    if result.permanent:
        return "failed", None
    if now - created_at >= timedelta(seconds=cfg.give_up_after):
        return "failed", None
    return "retry", now + backoff_delay(attempts, cfg.retry_initial, cfg.retry_max)
