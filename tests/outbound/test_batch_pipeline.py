"""``OutboundPipeline.process_many``: a batch of spooled submissions to queue rows, with a real
hub (real spool, at-rest key and database: SQLite and PostgreSQL; real gpg for encryption).

A batch shares its queries and commits, but one bad message must fail only itself: a spool id
that is not there, an entry sealed under a key the hub does not hold, or a message that breaks
the shared write. The others get their rows and leave the spool; the failing ones stay pending
(retried, then shunted, by the runner). Nothing is written twice on a replay.
"""

from __future__ import annotations

import asyncio
import secrets
from email.parser import BytesParser
from email.policy import default
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlmodel import Session

from mailhub.app import Hub
from mailhub.cases.filing import OutboundItem, file_outbound_many
from mailhub.cases.service import open_case
from mailhub.config import load_config
from mailhub.crypto.atrest import AtRest
from mailhub.crypto.engine import CryptoEngine
from mailhub.errors import CryptoError
from mailhub.outbound.pipeline import OutboundPipeline, Prepared
from mailhub.spool.spool import Envelope, Spool
from mailhub.store.audit import AuditEntry, verify
from mailhub.store.models import OutboundItem as QueueRow
from mailhub.store.models import Payload, StoredMessage
from tests.cases.case_support import hub_fixture, session  # noqa: F401
from tests.conftest import Instance
from tests.deliver.test_relay_e2e import gpg, make_recipient

COORD = "lena@medvoyage.example"
PATIENT = "ana@patient.example"  # no key: held
AIRLINE = "bookings@airline.example"  # the default policy's plaintext exception
CLINIC = "dr.kaya@clinic-a.example"  # a partner: encrypted when its key is known
LISTENER = "submission"


def _raw(n: int, *, to: tuple[str, ...], subject: str = "Note",
         msgid: bool = True) -> bytes:
    lines = [f"From: Lena <{COORD}>", f"To: {', '.join(to)}", f"Subject: {subject}"]
    if msgid:
        lines += [f"Message-ID: <batch-{n}@medvoyage.example>",
                  "Date: Mon, 02 Nov 2026 10:00:00 +0000"]
    lines += ["MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8", "",
              f"Fasting from midnight, note {n}.", ""]
    return "\r\n".join(lines).encode()


def _spool(hub: Hub, n: int, *, to: tuple[str, ...] = (AIRLINE, PATIENT), sender: str = COORD,
           subject: str = "Note", msgid: bool = True) -> str:
    env = Envelope(mail_from=sender, rcpt_tos=list(to), listener=LISTENER, auth_user=COORD,
                   tls=True)
    return hub.spool.accept(env, _raw(n, to=to, subject=subject, msgid=msgid))


def _unopenable(hub: Hub) -> str:
    """An entry sealed under an at-rest key this hub does not hold (a lost key)."""
    other = Spool(hub.spool.root, AtRest(secrets.token_bytes(32)))
    return other.accept(Envelope(COORD, [AIRLINE], LISTENER), _raw(99, to=(AIRLINE,)))


def _case_hook(hub: Hub):  # type: ignore[no-untyped-def]
    """Files each batch into its cases, as the serving process does."""
    def hook(s: Session, preps: list[Prepared]) -> list[str | None]:
        return file_outbound_many(s, hub, [OutboundItem(p.raw, p.sender, list(p.decisions))
                                           for p in preps])
    return hook


def _rows(hub: Hub) -> list[QueueRow]:
    with session(hub) as s:
        return list(s.execute(select(QueueRow).order_by(QueueRow.id)).scalars())


def _counts(hub: Hub) -> tuple[int, ...]:
    with session(hub) as s:
        return tuple(int(s.execute(select(func.count()).select_from(t)).scalar() or 0)
                     for t in (QueueRow, Payload, AuditEntry, StoredMessage))


def _payload(hub: Hub, pid: int | None) -> bytes:
    with session(hub) as s:
        row = s.get(Payload, pid)
        assert row is not None and pid is not None
        return hub.sealer.open(row.sealed, str(pid).encode())


def _mail_by_source(hub: Hub) -> dict[str, set[tuple[str, str]]]:
    out: dict[str, set[tuple[str, str]]] = {}
    for r in _rows(hub):
        if r.kind == "mail":
            out.setdefault(r.source_id, set()).add((r.recipient, r.status))
    return out



def _open_ana(hub: Hub) -> str:
    """Open the patient's case; its id."""
    with session(hub) as s:
        case = open_case(s, patient_name="Ana", patient_email=PATIENT, timezone="Europe/Lisbon",
                         language="pt", procedure="hip-replacement", clinic="Clinic A",
                         actor="test")
        s.commit()
        return str(case.id)

def test_missing_and_unopenable_entries_fail_alone(hub: Hub) -> None:
    pipeline = OutboundPipeline(hub, CryptoEngine(0))
    good = [_spool(hub, n) for n in range(3)]
    locked = _unopenable(hub)
    missing = "18e0000000000000-00000000aa"
    ids = [good[0], missing, good[1], locked, good[2]]
    assert sorted(hub.spool.pending(LISTENER)) == sorted([*good, locked])

    failed = asyncio.run(pipeline.process_many(LISTENER, ids))

    assert set(failed) == {missing, locked}
    assert isinstance(failed[missing], FileNotFoundError)
    assert isinstance(failed[locked], CryptoError)
    assert _mail_by_source(hub) == {sid: {(AIRLINE, "queued"), (PATIENT, "held")}
                                    for sid in good}
    assert hub.spool.pending(LISTENER) == [locked]  # the good ones left the spool
    for r in _rows(hub):
        if r.kind == "mail" and r.recipient == AIRLINE:  # the plaintext copy is the message
            n = good.index(r.source_id)
            assert f"note {n}.".encode() in _payload(hub, r.payload_id)
            assert r.message_id == f"<batch-{n}@medvoyage.example>"
    notices = [r for r in _rows(hub) if r.kind == "notice"]
    assert sorted(r.source_id for r in notices) == sorted(f"{g}:held:{PATIENT}" for g in good)

    before = _counts(hub)
    again = asyncio.run(pipeline.process_many(LISTENER, ids))  # a replay: nothing twice
    assert set(again) == {*good, missing, locked}
    assert all(isinstance(again[sid], FileNotFoundError) for sid in (*good, missing))
    assert isinstance(again[locked], CryptoError)
    assert _counts(hub) == before
    assert hub.spool.pending(LISTENER) == [locked]
    with session(hub) as s:
        assert verify(s).ok


def test_a_message_that_breaks_the_shared_write_fails_alone(hub: Hub) -> None:
    cid = _open_ana(hub)
    queued: list[int] = []
    pipeline = OutboundPipeline(hub, CryptoEngine(0), case_hook=_case_hook(hub),
                                on_queued=lambda: queued.append(1))
    tagged = _spool(hub, 1, to=(AIRLINE,), subject=f"[{cid}] travel dates")
    to_patient = _spool(hub, 2, to=(PATIENT,), subject="Your fasting plan")
    # a held copy's notice goes to the envelope sender, which cannot be put in a header
    broken = _spool(hub, 3, to=(PATIENT,), sender="lena@medvoyage.example\r\nBcc: x@y.example")
    plain = _spool(hub, 4, to=(AIRLINE,), subject="not case mail")

    failed = asyncio.run(pipeline.process_many(LISTENER, [tagged, to_patient, broken, plain]))

    assert list(failed) == [broken] and isinstance(failed[broken], ValueError)
    assert hub.spool.pending(LISTENER) == [broken]
    assert _mail_by_source(hub) == {tagged: {(AIRLINE, "queued")}, to_patient: {(PATIENT, "held")},
                                    plain: {(AIRLINE, "queued")}}
    rows = {r.source_id: r for r in _rows(hub) if r.kind == "mail"}
    assert (rows[tagged].case_id, rows[to_patient].case_id, rows[plain].case_id) == (cid, cid,
                                                                                     None)
    for sid in (tagged, to_patient):  # the [ID] tag went into the copy that is sent or held
        subject = BytesParser(policy=default).parsebytes(_payload(hub, rows[sid].payload_id))
        assert f"[{cid}]" in str(subject["Subject"])
    assert "[" not in _payload(hub, rows[plain].payload_id).split(b"\r\n\r\n")[0].decode()
    with session(hub) as s:  # filed once each, although the first try was rolled back
        stored = list(s.execute(select(StoredMessage.message_id, StoredMessage.case_id)
                                .order_by(StoredMessage.id)))
        filed = s.execute(select(func.count()).select_from(AuditEntry)
                          .where(AuditEntry.action == "filed")).scalar()
        result = verify(s)
    assert sorted(stored) == [("<batch-1@medvoyage.example>", cid),
                              ("<batch-2@medvoyage.example>", cid),
                              ("<batch-3@medvoyage.example>", cid)]  # broken one filed, not sent
    assert filed == 3
    assert result.ok, result.problem
    assert queued  # delivery was woken for the rows written


def test_rows_committed_before_a_crash_are_not_written_again(hub: Hub) -> None:
    """A crash after the rows' commit but before the spool entries were removed: on restart
    the batch is processed again and only removes the entries."""
    pipeline = OutboundPipeline(hub, CryptoEngine(0), case_hook=_case_hook(hub))
    ids = [_spool(hub, n, to=(AIRLINE, PATIENT, CLINIC)) for n in range(4)]
    preps = [pipeline.prepare(hub.spool.load(LISTENER, sid)) for sid in ids]

    async def first_run_until_the_crash() -> None:
        with Session(hub.engine) as s:
            pipeline.file_cases_in(s, preps)
            s.commit()
        await asyncio.gather(*(pipeline.protect(p) for p in preps))
        with Session(hub.engine) as s:
            assert pipeline.writer.write_many(s, [pipeline.job(p) for p in preps]) == [3] * 4
            s.commit()

    asyncio.run(first_run_until_the_crash())
    before = _counts(hub)
    assert sorted(hub.spool.pending(LISTENER)) == sorted(ids)
    assert asyncio.run(pipeline.process_many(LISTENER, ids)) == {}
    assert _counts(hub) == before
    assert hub.spool.pending(LISTENER) == []


def test_a_retried_batch_files_a_message_without_message_id_once(hub: Hub) -> None:
    cid = _open_ana(hub)
    pipeline = OutboundPipeline(hub, CryptoEngine(0), case_hook=_case_hook(hub))
    no_id = _spool(hub, 1, to=(AIRLINE,), subject=f"[{cid}] flights", msgid=False)
    broken = _spool(hub, 2, to=("nokey@elsewhere.example",), sender="x@medvoyage.example\r\nX: y")
    assert list(asyncio.run(pipeline.process_many(LISTENER, [no_id, broken]))) == [broken]
    row = next(r for r in _rows(hub) if r.source_id == no_id)
    with session(hub) as s:
        stored = list(s.execute(select(StoredMessage.message_id)
                                .where(StoredMessage.case_id == cid)).scalars())
    assert stored == [row.message_id]


def test_a_batch_encrypts_to_a_known_key(instance: Instance, short_tmp: Path) -> None:
    """With the hub's real keys: every message of a batch encrypted to the clinic's key (and
    readable by the clinic's gpg), the keyless patient held, the airline in plaintext."""
    home, pub = make_recipient(short_tmp, CLINIC)
    code, _, err = instance.run("keys", "import", str(pub))
    assert code == 0, err
    code, hub_key, err = instance.run("keys", "export-hub")
    assert code == 0, err
    assert gpg(home, "--import", data=hub_key.encode()).returncode == 0
    hub = Hub(load_config(instance.config))
    try:
        pipeline = OutboundPipeline(hub, CryptoEngine(0))
        ids = [_spool(hub, n, to=(CLINIC, AIRLINE, PATIENT)) for n in range(3)]
        assert asyncio.run(pipeline.process_many(LISTENER, ids)) == {}
        rows = [r for r in _rows(hub) if r.kind == "mail"]
        assert {(r.source_id, r.recipient, r.status, r.method) for r in rows} == {
            (sid, rcpt, status, method) for sid in ids for rcpt, status, method in (
                (CLINIC, "queued", "openpgp"), (AIRLINE, "queued", "plaintext"),
                (PATIENT, "held", ""))}
        for r in rows:
            if r.recipient != CLINIC:
                continue
            wire = _payload(hub, r.payload_id)
            n = ids.index(r.source_id)
            assert b"multipart/encrypted" in wire and f"note {n}".encode() not in wire
            armored = wire[wire.index(b"-----BEGIN PGP MESSAGE-----"):]
            armored = armored[: armored.index(b"-----END PGP MESSAGE-----") + 25]
            dec = gpg(home, "--status-fd", "2", "--decrypt", data=armored)
            assert dec.returncode == 0, dec.stderr
            assert f"Fasting from midnight, note {n}.".encode() in dec.stdout
            assert b"[GNUPG:] GOODSIG" in dec.stderr  # signed by the hub
        with session(hub) as s:
            actions: dict[str, Any] = {}
            for e in s.execute(select(AuditEntry).where(AuditEntry.actor == "outbound")).scalars():
                actions[e.detail_data()["recipient"]] = actions.get(
                    e.detail_data()["recipient"], set()) | {e.action}
            assert actions == {CLINIC: {"encrypted"}, AIRLINE: {"queued"}, PATIENT: {"held"}}
            assert verify(s).ok
        assert hub.spool.pending(LISTENER) == []
    finally:
        hub.engine.dispose()
