"""Writers in other processes, as in ``mailhub serve`` (the submission children append, the
parent loads and removes), and kill -9 of a writer in the middle of appending."""

from __future__ import annotations

import os
import queue
import secrets
import signal
import subprocess
import sys
import threading
from pathlib import Path

from mailhub.spool.spool import Spool
from tests.conftest import REPO
from tests.spool.support import body, envelope, files, sealer, segments


def start_writer(root: Path, key: bytes, limit: int | None = None) -> subprocess.Popen[str]:
    args = [str(root), key.hex()] + ([str(limit)] if limit is not None else [])
    return subprocess.Popen([sys.executable, "-m", "tests.spool.writer_proc", *args], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)


def kill(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL


def check_message(spool: Spool, sid: str) -> None:
    msg = spool.load("submission", sid)
    assert msg.envelope.mail_from == envelope().mail_from
    assert msg.content == body(int(msg.envelope.rcpt_tos[0][1:].split("@")[0]))


def remove_all(spool: Spool) -> None:
    """Process what is left: afterwards nothing stays behind (but a segment a kill caught
    half-created, ``.<name>.tmp``, which goes after a minute)."""
    for sid in spool.pending("submission"):
        spool.remove("submission", sid)
    assert spool.pending("submission") == []
    assert [f for f in files(spool) if not f.endswith(".tmp")] == []


def test_every_acknowledged_id_survives_sigkill(tmp_path: Path) -> None:
    key = secrets.token_bytes(32)
    proc = start_writer(tmp_path, key)
    assert proc.stdout is not None
    acked: list[str] = []
    try:
        for line in proc.stdout:
            acked.append(line.strip())
            if len(acked) >= 400:
                break
    finally:
        kill(proc)
    acked += [line.strip() for line in proc.stdout if line.endswith("\n")]

    spool = Spool(tmp_path, sealer(key))
    assert set(acked) <= set(spool.pending("submission"))
    for sid in acked:
        check_message(spool, sid)
    remove_all(spool)
    spool.close()


def test_the_parent_follows_child_writers_through_rotations(tmp_path: Path) -> None:
    """Each id a child acknowledges is at once loadable by the parent, which marks it done;
    finished segments go while the children still write."""
    key = secrets.token_bytes(32)
    children = [start_writer(tmp_path, key, limit=350) for _ in range(2)]
    notes: queue.Queue[str] = queue.Queue()

    def relay(proc: subprocess.Popen[str]) -> None:  # the children's pipe to the parent
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.endswith("\n"):
                notes.put(line.strip())

    readers = [threading.Thread(target=relay, args=(c,), daemon=True) for c in children]
    for r in readers:
        r.start()
    parent = Spool(tmp_path, sealer(key))
    seen = 0
    try:
        while seen < 700:
            sid = notes.get(timeout=60)
            check_message(parent, sid)
            parent.remove("submission", sid)
            seen += 1
        # ~16 segments were written; all but the two the idle children hold open are gone
        assert len(segments(parent)) <= 2
        assert parent.pending("submission") == []
    finally:
        for child in children:
            kill(child)
    for r in readers:
        r.join(30)
    assert notes.empty()
    remove_all(parent)
    parent.close()
