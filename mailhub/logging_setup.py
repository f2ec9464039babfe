"""Logging for the serving processes: one write for many lines, not one write per line.

A busy relay logs two INFO lines a message (the policy decision and the delivery). Written one
by one, each line is a ``write(2)`` on stderr, and in a process whose threads share the GIL every
such call lets another thread in and makes this one wait to get it back. So ``serve`` and its
submission processes format each record when it is logged (its arguments may change later) but
write the lines in batches: when ``capacity`` lines wait, when a WARNING or worse arrives (it is
written at once, after the lines before it), every ``interval`` seconds from a small thread, and
on close and at exit. The cost: a ``kill -9`` can lose the last ``interval`` of INFO lines. The
audit log in the database, not this log, is the record of what happened to case mail.
"""

from __future__ import annotations

import atexit
import logging
import sys
import threading
from typing import TextIO

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class BatchingStreamHandler(logging.Handler):
    """A stream handler that joins formatted lines and writes them in one call."""

    def __init__(self, stream: TextIO | None = None, *, capacity: int = 256,
                 interval: float = 0.25) -> None:
        super().__init__()
        self.stream = stream
        self.capacity = capacity
        self.interval = interval
        self._lines: list[str] = []
        self._stopping = threading.Event()
        self._flusher: threading.Thread | None = None

    def _target(self) -> TextIO:
        # sys.stderr as it is when written (tests and daemons replace it)
        return self.stream if self.stream is not None else sys.stderr

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 - as logging.StreamHandler: report, never raise
            self.handleError(record)
            return
        with self.lock:  # type: ignore[union-attr]
            self._lines.append(line)
            urgent = record.levelno >= logging.WARNING or len(self._lines) >= self.capacity
            if urgent:
                self._write_locked()
            elif self._flusher is None and not self._stopping.is_set():
                self._flusher = threading.Thread(target=self._run, name="log-flush",
                                                 daemon=True)
                self._flusher.start()

    def _write_locked(self) -> None:
        if not self._lines:
            return
        text = "\n".join(self._lines) + "\n"
        self._lines.clear()
        try:
            stream = self._target()
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):  # stderr closed or gone: nothing to tell it to
            pass

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write_locked()

    def _run(self) -> None:
        while not self._stopping.wait(self.interval):
            self.flush()

    def close(self) -> None:
        self._stopping.set()
        self.flush()
        super().close()


def configure(level: str | int, *, debug: bool = False) -> BatchingStreamHandler:
    """Set up the root logger of a serving process (the parent or a submission child).

    Library loggers that dump message content stay quiet at every level (see below).
    Below DEBUG, aiosmtpd's own lines are kept to warnings (its five INFO lines per message cost
    more CPU than receiving the message), so are alembic's and apscheduler's, and records skip what the format never shows: the
    calling file and line, thread, process names."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    handler = BatchingStreamHandler()
    handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    # Never, not even with --debug: imapclient turns imaplib's wire trace on and sends it here at
    # DEBUG, every line the IMAP server sends, so every fetched case message in the clear.
    # (SQLAlchemy, which would log rows and so password hashes, keeps its loggers at WARNING.)
    logging.getLogger("imapclient.imaplib").setLevel(logging.WARNING)
    if not debug and root.getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("mail.log").setLevel(logging.WARNING)
        # libraries' start-up chatter (alembic's plugin set-up, apscheduler's job bookkeeping at
        # every wake-up) says nothing about mail: mailhub.store and mailhub.scheduler log what
        # matters, and --debug shows it all
        for noisy in ("alembic", "apscheduler"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        # documented switches (Logging HOWTO, "Optimization") for fields the format omits
        logging.logThreads = False
        logging.logProcesses = False
        logging.logMultiprocessing = False
        logging._srcfile = None  # type: ignore[attr-defined]  # no stack walk per record
    atexit.register(handler.close)
    return handler
