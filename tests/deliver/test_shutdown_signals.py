"""SIGTERM / SIGINT under load: ``mailhub serve`` exits 0, and nothing acknowledged is lost."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.deliver.test_crash import (
    PGP_RCPT,
    PLAIN_RCPT,
    Burst,
    Serve,
    SlowSink,
    prepared_instance,
    smarthost,
    sql,
    wait_until,
)

__all__ = ["smarthost"]


def stop_then_deliver_the_rest(serve: Serve, burst: Burst, sink: SlowSink,
                               signals: list[int]) -> None:
    """Send ``signals`` (0.3 s apart) to the serving hub: it exits 0 without a traceback, and
    once started again it delivers every message that got a 250."""
    assert serve.proc is not None
    for n, signum in enumerate(signals):
        if n:
            time.sleep(0.3)
        serve.proc.send_signal(signum)
    code = serve.proc.wait(90)
    serve.proc = None
    burst.join()
    log = serve.log.read_text(errors="replace")
    assert code == 0, log[-3000:]
    assert "Traceback" not in log, log[-5000:]
    sink.delay = 0.0
    serve.start()
    acked = set(burst.acked)
    wait_until(lambda: acked <= set(sink.delivered()))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_a_burst_exits_cleanly_and_loses_nothing(
        short_tmp: Path, smarthost: tuple[SlowSink, int], signum: int) -> None:
    sink, port = smarthost
    inst = prepared_instance(short_tmp, port)
    serve = Serve(inst)
    serve.start()
    sink.delay = 0.1
    burst = Burst(inst, "sig", 150, [PGP_RCPT, PLAIN_RCPT]).start()
    try:
        wait_until(lambda: burst.count() >= 30)
        stop_then_deliver_the_rest(serve, burst, sink, [signum])
        wait_until(lambda: not sql(inst, "SELECT id FROM outbound WHERE status = 'queued'"))
    finally:
        serve.stop()
    log = serve.log.read_text(errors="replace")
    assert "Traceback" not in log, log[-5000:]


def test_a_second_signal_during_shutdown(short_tmp: Path, smarthost: tuple[SlowSink, int]) -> None:
    sink, port = smarthost
    inst = prepared_instance(short_tmp, port)
    serve = Serve(inst)
    serve.start()
    sink.delay = 1.5
    burst = Burst(inst, "twice", 60, [PLAIN_RCPT]).start()
    try:
        wait_until(lambda: burst.count() >= 20 and bool(sql(
            inst, "SELECT id FROM outbound WHERE sending_since IS NOT NULL")))
        stop_then_deliver_the_rest(serve, burst, sink,
                                   [signal.SIGTERM, signal.SIGINT, signal.SIGTERM])
    finally:
        serve.stop()
