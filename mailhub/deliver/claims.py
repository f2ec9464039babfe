"""The delivery worker's bookkeeping of rows it holds: "sent" marks waiting for a commit.

Kept apart from ``worker`` so that module stays about sending; these are group-commit jobs and
their callbacks, which run on the commit thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future

from sqlmodel import Session

from mailhub.deliver import queue

log = logging.getLogger("mailhub.deliver")


class SentFlush:
    """A group-commit job that marks every pending sent row; rerun after a failed batch, it
    marks the same rows again (it takes them once)."""

    def __init__(self, take: Callable[[], list[tuple[int, str]]]) -> None:
        self.take = take
        self.batch: list[tuple[int, str]] | None = None

    def __call__(self, session: Session) -> None:
        if self.batch is None:
            self.batch = self.take()
        queue.mark_sent_many(session, self.batch)


def log_failed_write(fut: Future[object]) -> None:
    """A done-callback: an outcome that could not be recorded is logged, never lost silently."""
    exc = fut.exception()
    if exc is not None:
        log.error("recording a delivery outcome failed (the row is retried after a restart): "
                  "%s", exc)
