"""The spool journal on real files: round trip, sealing, pending/remove/restart, segment
deletion, contains, shunt, and reading the old one-file-per-message layout."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import pytest

from mailhub.errors import StoreError
from mailhub.spool.spool import Spool, pack_message, unpack_message
from tests.spool.support import body, envelope, files, sealer, segments


def test_round_trip_keeps_envelope_and_content_sealed_at_rest(tmp_path: Path) -> None:
    spool = Spool(tmp_path, sealer())
    big = body(1, size=700_000)  # larger than a scan chunk: blobs are skipped, not parsed
    sids = [spool.accept(envelope(n=0), body(0)), spool.accept(envelope(n=1), big),
            spool.accept(envelope("inbound", 2), body(2), spool_id="fixed-id-2")]
    assert sids[2] == "fixed-id-2"
    msg = spool.load("submission", sids[0])
    assert msg.content == body(0) and msg.spool_id == sids[0]
    assert msg.envelope.rcpt_tos == ["r0@clinic.example"] and msg.envelope.tls is True
    assert spool.load("submission", sids[1]).content == big
    assert spool.load("inbound", "fixed-id-2").envelope.listener == "inbound"
    [seg] = segments(spool)
    assert stat.S_IMODE(seg.stat().st_mode) == 0o600
    raw = seg.read_bytes()
    assert b"fasting from midnight" not in raw and b"clinic.example" not in raw
    # a fresh process (a second Spool) scans the same records, across the big blob
    other = Spool(tmp_path, spool.sealer)
    assert other.load("submission", sids[1]).content == big
    assert other.pending("submission") == sorted(sids[:2])
    spool.close()
    other.close()


def test_bad_references_are_refused(tmp_path: Path) -> None:
    spool = Spool(tmp_path, sealer())
    with pytest.raises(StoreError):
        spool.accept(envelope(), b"x", spool_id="../escape")
    with pytest.raises(StoreError):
        spool.load("nowhere", "abc")
    with pytest.raises(StoreError):
        spool.contains("submission", "a" * 300)
    with pytest.raises(FileNotFoundError):
        spool.load("submission", "never-spooled")


def test_pending_remove_restart_and_segment_deletion(tmp_path: Path) -> None:
    box = sealer()
    first = Spool(tmp_path, box)
    sids = [first.accept(envelope(n=i), body(i)) for i in range(3)]
    first.remove("submission", sids[0])
    first.remove("submission", sids[0])  # idempotent
    assert first.pending("submission") == sorted(sids[1:])
    with pytest.raises(FileNotFoundError):  # the runner reads this as "already processed"
        first.load("submission", sids[0])
    first.close()  # the writer closes its segment; records still pending keep it
    assert len(segments(first)) == 1

    restarted = Spool(tmp_path, box)
    assert restarted.pending("submission") == sorted(sids[1:])
    assert restarted.pending_count("submission") == 2
    assert restarted.load("submission", sids[1]).content == body(1)
    restarted.remove("submission", sids[1])
    assert len(segments(restarted)) == 1
    restarted.remove("submission", sids[2])
    assert files(restarted) == []  # closed and all done: segment and .done file deleted
    assert restarted.pending("submission") == []
    restarted.remove("submission", sids[2])  # still idempotent once the segment is gone
    restarted.close()


def test_a_rotated_segment_is_deleted_once_done_while_the_writer_goes_on(tmp_path: Path) -> None:
    spool = Spool(tmp_path, sealer(), segment_limit=8_000)  # two records a segment
    sids = [spool.accept(envelope(n=i), body(i)) for i in range(5)]
    assert len(segments(spool)) == 3
    for sid in sids[:4]:
        spool.remove("submission", sid)
    assert len(segments(spool)) == 1  # the two finished segments went, the open one stays
    assert spool.pending("submission") == sids[4:]
    assert spool.load("submission", sids[4]).content == body(4)
    spool.close()


def test_contains_and_spooling_the_same_id_again(tmp_path: Path) -> None:
    spool = Spool(tmp_path, sealer())
    assert not spool.contains("scheduler", "sched-7")
    spool.accept(envelope("scheduler"), b"first", spool_id="sched-7")
    assert spool.contains("scheduler", "sched-7")
    assert not spool.contains("submission", "sched-7")
    other = Spool(tmp_path, spool.sealer)  # another process sees it too
    assert other.contains("scheduler", "sched-7")
    spool.accept(envelope("scheduler"), b"retried", spool_id="sched-7")  # a retried step
    assert spool.load("scheduler", "sched-7").content == b"retried"
    assert spool.pending("scheduler") == ["sched-7"]
    spool.remove("scheduler", "sched-7")
    assert not spool.contains("scheduler", "sched-7")
    assert spool.pending("scheduler") == []
    spool.accept(envelope("scheduler"), b"again", spool_id="sched-7")  # after its done-mark
    assert spool.contains("scheduler", "sched-7")
    assert spool.load("scheduler", "sched-7").content == b"again"
    spool.close()
    other.close()


def test_shunt_keeps_a_sealed_durable_copy_and_stops_it_pending(tmp_path: Path) -> None:
    spool = Spool(tmp_path, sealer())
    sid = spool.accept(envelope(), body(9))
    keep = spool.accept(envelope(), body(10))
    target = spool.shunt("submission", sid)
    assert target == tmp_path / "shunt" / f"submission-{sid}.msg"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    raw = target.read_bytes()
    assert b"fasting" not in raw
    kept = unpack_message(sid, spool.sealer.open(raw, sid.encode()))
    assert kept.content == body(9) and kept.envelope.rcpt_tos == envelope().rcpt_tos
    assert spool.pending("submission") == [keep]
    with pytest.raises(FileNotFoundError):
        spool.load("submission", sid)
    assert spool.shunt("submission", sid) is None  # nothing left to set aside
    spool.close()


def test_old_one_file_per_message_layout_is_still_read(tmp_path: Path) -> None:
    box = sealer()
    folder = tmp_path / "submission"
    folder.mkdir()
    (folder / "18e0-old.msg").write_bytes(box.seal(pack_message(envelope(), b"legacy"),
                                                   b"18e0-old"))
    spool = Spool(tmp_path, box)
    new = spool.accept(envelope(), b"new")
    assert spool.pending("submission") == sorted(["18e0-old", new])
    assert spool.contains("submission", "18e0-old")
    assert spool.load("submission", "18e0-old").content == b"legacy"
    spool.remove("submission", "18e0-old")
    assert not (folder / "18e0-old.msg").exists()
    assert spool.pending("submission") == [new]
    spool.close()


def test_an_idle_segment_is_closed_so_its_done_records_can_go(tmp_path: Path) -> None:
    """A writer that stops receiving mail closes its segment after ``idle_close``: processed
    mail does not stay on disk (even sealed) until a rotation that may never come."""
    spool = Spool(tmp_path, sealer(), idle_close=0.2)
    sids = [spool.accept(envelope(n=i), body(i)) for i in range(2)]
    for sid in sids:
        spool.remove("submission", sid)
    assert len(segments(spool)) == 1  # still open: the writer may append more
    deadline = time.monotonic() + 10
    while segments(spool) and time.monotonic() < deadline:
        time.sleep(0.05)
        spool.pending("submission")  # the reader notices the closed, all-done segment
    assert files(spool) == []
    later = spool.accept(envelope(n=9), body(9))  # a new segment opens on the next message
    assert spool.load("submission", later).content == body(9)
    assert len(segments(spool)) == 1
    spool.close()
