"""``queue drop`` and ``queue release`` next to a running ``mailhub serve`` (two processes, one
SQLite database): what the CLI reports is what happened, and nothing it wrote is overwritten."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import Instance
from tests.deliver.test_crash import (
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


def test_a_row_being_sent_is_not_reported_dropped(short_tmp: Path,
                                                  smarthost: tuple[SlowSink, int]) -> None:
    """A drop that lands while the serving hub is sending the row used to say "dropped" and
    then the row was sent anyway (its "sent" overwrote the drop): now it is refused."""
    sink, port = smarthost
    inst = prepared_instance(short_tmp, port)
    serve = Serve(inst)
    serve.start()
    sink.delay = 4.0
    try:
        burst = Burst(inst, "drop", 1, [PLAIN_RCPT], threads=1).start()
        burst.join()
        assert len(burst.acked) == 1
        wait_until(lambda: bool(sql(inst, "SELECT id FROM outbound WHERE sending_since "
                                          "IS NOT NULL AND status = 'queued'")))
        (row_id,), = sql(inst, "SELECT id FROM outbound WHERE recipient = "
                               f"'{PLAIN_RCPT}'")
        code, out, err = inst.run("queue", "drop", str(row_id), "--reason", "sent by mistake")
        assert code == 1 and "Traceback" not in err, (code, out, err)
        assert err.startswith(f"mailhub: error: queue entry {row_id} is being sent"), err
        assert "mailhub: hint:" in err
        wait_until(lambda: len(sink.delivered()) == 1)
        wait_until(lambda: sql(inst, f"SELECT status FROM outbound WHERE id = {row_id}")
                   == [("sent",)])
    finally:
        serve.stop()
    rows = {r["id"]: r for r in json.loads(inst.run("queue", "list", "--json")[1])}
    assert rows[row_id]["status"] == "sent"
    assert not sql(inst, "SELECT seq FROM audit_entry WHERE action = 'dropped'")


def test_an_id_that_is_no_queue_id_is_a_usage_error(instance: Instance) -> None:
    for action in (("release",), ("drop", "--reason", "test")):
        for bad in ("99999999999999999999", "abc", "0"):
            code, out, err = instance.run("queue", *action, "--", bad)
            assert code == 2 and out == "", (action, bad, err)
            assert "is not a queue id" in err and "internal error" not in err, err
        code, out, err = instance.run("queue", *action, "--", "77")
        assert code == 1 and err.startswith("mailhub: error: no queue entry 77"), err
