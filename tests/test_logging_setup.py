"""The serving processes' log handler: lines written in batches, nothing lost on close."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import time

from mailhub.logging_setup import FORMAT, BatchingStreamHandler


class CountingStream(io.StringIO):
    """Counts write calls: the point of the handler is fewer of them."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def _logger(name: str, *, capacity: int = 100, interval: float = 60,
            fmt: str = "%(message)s") -> tuple[CountingStream, BatchingStreamHandler,
                                                logging.Logger]:
    """A logger of its own writing through a batching handler into a counting stream."""
    stream = CountingStream()
    handler = BatchingStreamHandler(stream, capacity=capacity, interval=interval)
    handler.setFormatter(logging.Formatter(fmt))
    log = logging.getLogger(name)
    log.propagate = False
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    return stream, handler, log


def test_info_lines_wait_and_go_out_in_one_write() -> None:
    stream, handler, log = _logger("t.batch")
    for i in range(10):
        log.info("line %d", i)
    assert stream.getvalue() == ""  # still buffered
    handler.flush()
    assert stream.getvalue() == "".join(f"line {i}\n" for i in range(10))
    assert stream.writes == 1
    handler.close()


def test_a_warning_is_written_at_once_after_the_lines_before_it() -> None:
    stream, handler, log = _logger("t.warn", fmt="%(levelname)s %(message)s")
    log.info("first")
    log.warning("second")
    assert stream.getvalue() == "INFO first\nWARNING second\n"
    handler.close()


def test_a_full_buffer_is_written_without_waiting() -> None:
    stream, handler, log = _logger("t.full", capacity=3)
    for i in range(7):
        log.info("%d", i)
    assert stream.getvalue() == "0\n1\n2\n3\n4\n5\n"
    assert stream.writes == 2
    handler.close()
    assert stream.getvalue().endswith("6\n")


def test_the_flusher_writes_waiting_lines_within_its_interval() -> None:
    stream, handler, log = _logger("t.timer", interval=0.05)
    log.info("soon")
    deadline = time.monotonic() + 10
    while stream.getvalue() == "" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stream.getvalue() == "soon\n"
    handler.close()


def test_the_record_is_formatted_when_logged_not_when_written() -> None:
    stream, handler, log = _logger("t.args")
    items = ["a"]
    log.info("items=%s", items)
    items.append("b")
    handler.close()
    assert stream.getvalue() == "items=['a']\n"


def test_lines_waiting_at_exit_are_written() -> None:
    code = (
        "import logging\n"
        "from mailhub.logging_setup import configure\n"
        "configure('INFO')\n"
        "logging.getLogger('mailhub.t').info('bye')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stderr.rstrip().endswith("INFO mailhub.t: bye")
    assert FORMAT.startswith("%(asctime)s")


def test_library_start_up_chatter_stays_out_of_the_log_unless_debugging(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A serving process upgrades its database with alembic at start: its plugin set-up lines
    are noise at INFO, and come back with --debug."""
    code = (
        "import sys\n"
        "from sqlalchemy import create_engine\n"
        "from mailhub.logging_setup import configure\n"
        "from mailhub.store.db import migrate\n"
        "configure('INFO', debug=sys.argv[2] == 'debug')\n"
        "migrate(create_engine('sqlite:///' + sys.argv[1]))\n"
    )
    quiet = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.db"), "info"],
                           capture_output=True, text=True, timeout=120, check=True)
    loud = subprocess.run([sys.executable, "-c", code, str(tmp_path / "b.db"), "debug"],
                          capture_output=True, text=True, timeout=120, check=True)
    assert "alembic" in loud.stderr  # the lines exist: the level is what keeps them out
    assert "alembic" not in quiet.stderr
