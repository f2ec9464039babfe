"""The delivery worker's bookkeeping of rows it holds: "sent" marks waiting for a commit, and
the claims of rows it is still sending, renewed so that they never look abandoned.

Kept apart from ``worker`` so that module stays about sending; these are group-commit jobs and
their callbacks, which run on the commit thread.
"""

from __future__ import annotations

import asyncio
import functools
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


async def renew_claims(held: Callable[[], set[int]],
                       write: Callable[[Callable[[Session], None]], None],
                       stop: asyncio.Event, every: float) -> None:
    """Every ``every`` s, stamp the rows still ``held`` as claimed now (``write`` commits,
    blocking): a send that takes longer than ``queue.STALE_AFTER`` (a big message on a slow
    link, a smarthost that takes minutes), or rows waiting behind one, must not be taken over
    by another instance on the same database and sent twice."""
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), every)
        except TimeoutError:
            pass
        ids = held()
        if ids and not stop.is_set():
            try:
                await asyncio.to_thread(write, functools.partial(_renew, ids))
            except Exception:  # noqa: BLE001 - the next round tries again
                log.exception("renewing %d delivery claims failed", len(ids))


def _renew(ids: set[int], session: Session) -> None:
    queue.renew_claims_in(session, ids)
