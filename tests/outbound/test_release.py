"""Held messages tried again: at once when a key arrives, after a backoff when a usable key
still fails (a failure that repeats is not retried, audited and notified at every pass of the
auto-release loop), with a real hub, real gpg and a real database."""

from __future__ import annotations

import asyncio
import logging
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlmodel import Session

from mailhub.app import Hub
from mailhub.config import load_config
from mailhub.crypto.engine import CryptoEngine
from mailhub.outbound.pipeline import OutboundPipeline
from mailhub.outbound.release import auto_release, release_due
from mailhub.spool.spool import Envelope
from mailhub.store.audit import AuditEntry
from mailhub.store.models import OutboundItem, Payload
from tests.conftest import Instance
from tests.deliver.test_relay_e2e import gpg, make_recipient

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
COORD = "lena@medvoyage.example"
CLINIC = "dr.kaya@clinic-a.example"


def test_release_due_after_backoff_or_when_a_key_arrives() -> None:
    decided = NOW - timedelta(minutes=10)
    # held by the pipeline: no backoff yet
    assert release_due(decided, decided, None, NOW)
    # a failed try pushed the next one out: not yet, whatever the loop's pace
    assert not release_due(NOW + timedelta(minutes=5), decided, decided - timedelta(days=1), NOW)
    # ... unless a key for the recipient arrived (or changed) since
    assert release_due(NOW + timedelta(minutes=5), decided, decided + timedelta(seconds=1), NOW)
    # naive values from SQLite are UTC
    assert release_due(decided.replace(tzinfo=None), decided.replace(tzinfo=None), None, NOW)
    assert not release_due((NOW + timedelta(hours=1)).replace(tzinfo=None),
                           decided.replace(tzinfo=None), None, NOW)


def _row(hub: Hub) -> OutboundItem:
    with Session(hub.engine) as s:
        row = s.execute(select(OutboundItem).where(OutboundItem.recipient == CLINIC)).scalar_one()
        s.expunge(row)
        return row


def _still_held(hub: Hub) -> int:
    with Session(hub.engine) as s:
        return len(s.execute(select(AuditEntry).where(AuditEntry.action == "still-held")).all())


def test_a_usable_key_that_fails_is_retried_after_a_backoff(instance: Instance,
                                                            short_tmp: Path) -> None:
    _, pub = make_recipient(short_tmp, CLINIC)
    assert instance.run("keys", "import", str(pub))[0] == 0
    hub = Hub(load_config(instance.config))
    home = str(hub.keys.gnupg_home)
    # the database says usable, but the hub's keyring lost the key: gpg refuses every try
    listed = subprocess.run(["gpg", "--homedir", home, "--batch", "--with-colons",
                             "--list-keys", CLINIC], capture_output=True, text=True, check=True)
    fpr = next(line.split(":")[9] for line in listed.stdout.splitlines() if line.startswith("fpr"))
    subprocess.run(["gpg", "--homedir", home, "--batch", "--yes", "--delete-keys", fpr],
                   capture_output=True, check=True)
    pipeline = OutboundPipeline(hub, CryptoEngine(0))
    try:
        raw = (f"From: {COORD}\r\nTo: {CLINIC}\r\nSubject: labs\r\n"
               "Message-ID: <r1@medvoyage.example>\r\n\r\nHb 13.2\r\n").encode()
        sid = hub.spool.accept(Envelope(COORD, [CLINIC], "submission", auth_user=COORD), raw)
        assert asyncio.run(pipeline.process_many("submission", [sid])) == {}
        first = _row(hub)
        assert first.status == "held" and "encryption failed" in first.reason

        assert asyncio.run(auto_release(hub, pipeline)) == 0  # due: tried, fails again
        tried = _row(hub)
        assert (tried.status, tried.attempts, _still_held(hub)) == ("held", 1, 1)
        assert tried.next_attempt_at.replace(tzinfo=UTC) > datetime.now(UTC)
        for _ in range(3):  # the loop's next passes leave it alone
            assert asyncio.run(auto_release(hub, pipeline)) == 0
        assert (_row(hub).attempts, _still_held(hub)) == (1, 1)

        # the key comes back: tried at once, released, and its held original deleted
        assert instance.run("keys", "import", str(pub))[0] == 0
        hub.key_snapshot.refresh(force=True)
        assert asyncio.run(auto_release(hub, pipeline)) == 1
        released = _row(hub)
        assert (released.status, released.attempts) == ("queued", 0)
        with Session(hub.engine) as s:
            assert s.get(Payload, first.payload_id) is None
            assert s.get(Payload, released.payload_id) is not None
    finally:
        pipeline.crypto.close()
        hub.engine.dispose()


class _FirstCallFails(CryptoEngine):
    """The real (inline) engine, except that its first batch fails as a crashed pool does."""

    def __init__(self) -> None:
        super().__init__(0)
        self.calls = 0

    async def protect_many(self, items):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("worker process died")
        return await super().protect_many(items)


def test_a_failure_that_does_not_repeat_neither_holds_nor_notifies(
        instance: Instance, short_tmp: Path, caplog: pytest.LogCaptureFixture) -> None:
    home, pub = make_recipient(short_tmp, CLINIC)
    assert instance.run("keys", "import", str(pub))[0] == 0
    code, hub_key, _ = instance.run("keys", "export-hub")
    assert code == 0 and gpg(home, "--import", data=hub_key.encode()).returncode == 0
    hub = Hub(load_config(instance.config))
    engine = _FirstCallFails()
    pipeline = OutboundPipeline(hub, engine)
    try:
        raw = (f"From: {COORD}\r\nTo: {CLINIC}\r\nSubject: labs\r\n"
               "Message-ID: <r2@medvoyage.example>\r\n\r\nHb 13.2\r\n").encode()
        sid = hub.spool.accept(Envelope(COORD, [CLINIC], "submission", auth_user=COORD), raw)
        with caplog.at_level(logging.WARNING, logger="mailhub.outbound"):
            assert asyncio.run(pipeline.process_many("submission", [sid])) == {}
        assert engine.calls == 2
        row = _row(hub)
        assert (row.status, row.method) == ("queued", "openpgp")
        with Session(hub.engine) as s:  # no hold, so no notice to the coordinator
            rows = s.execute(select(OutboundItem)).scalars().all()
            assert [(r.recipient, r.kind) for r in rows] == [(CLINIC, "mail")]
            actions = {e.action for e in s.execute(select(AuditEntry)).scalars()}
            assert "held" not in actions and "encrypted" in actions
            payload = s.get(Payload, row.payload_id)
            assert payload is not None
            wire = hub.sealer.open(payload.sealed, str(row.payload_id).encode())
        armored = wire[wire.index(b"-----BEGIN PGP MESSAGE-----"):]
        dec = gpg(home, "--status-fd", "2", "--decrypt",
                  data=armored[: armored.index(b"-----END PGP MESSAGE-----") + 25])
        assert dec.returncode == 0 and b"Hb 13.2" in dec.stdout
        assert b"[GNUPG:] GOODSIG" in dec.stderr  # signed by the hub
        assert ["protecting message_id=<r2@medvoyage.example> failed (internal error); trying "
                "once more"] == [r.getMessage() for r in caplog.records]
    finally:
        hub.engine.dispose()


def test_a_release_holds_its_row_against_other_writers_while_it_decides(
        instance: Instance, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between reading the row's status and writing its outcome, a `queue drop` or the serving
    hub must not change it (it used to be read, then written: a lost update)."""
    import sqlite3

    from mailhub.deliver import queue
    from mailhub.outbound import release as release_mod

    hub = Hub(load_config(instance.config))
    pipeline = OutboundPipeline(hub, CryptoEngine(0))
    raw = (f"From: {COORD}\r\nTo: {CLINIC}\r\nSubject: labs\r\n"
           "Message-ID: <r2@medvoyage.example>\r\n\r\nHb 13.2\r\n").encode()
    sid = hub.spool.accept(Envelope(COORD, [CLINIC], "submission", auth_user=COORD), raw)
    assert asyncio.run(pipeline.process_many("submission", [sid])) == {}
    row = _row(hub)
    assert row.status == "held"  # no key for the clinic
    other_writer: list[str] = []
    real_get_item = queue.get_item

    def get_item_then_try_a_write(session: Session, item_id: int) -> OutboundItem:
        got = real_get_item(session, item_id)
        db = sqlite3.connect(hub.engine.url.database or "", timeout=0.2)
        try:
            db.execute("UPDATE outbound SET reason = 'dropped meanwhile' WHERE id = ?", (item_id,))
            db.commit()
            other_writer.append("wrote")
        except sqlite3.OperationalError as exc:
            other_writer.append(str(exc))
        finally:
            db.close()
        return got

    monkeypatch.setattr(release_mod.queue, "get_item", get_item_then_try_a_write)
    result = asyncio.run(release_mod.release_async(hub, pipeline, row.id or 0, actor="test"))
    # the first read (loading the message) decides nothing and locks nothing; the second is the
    # status check whose outcome is then written: no other writer gets in between
    assert other_writer == ["wrote", "database is locked"]
    assert result.status == "held" and "dropped meanwhile" not in _row(hub).reason
