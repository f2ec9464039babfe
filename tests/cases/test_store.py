"""The case store on SQLite and PostgreSQL: ids, dedupe, sealing at rest, hostile messages."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from mailhub.app import Hub
from mailhub.cases.export import show_case
from mailhub.cases.filing import file_inbound
from mailhub.cases.ids import allocate_case_id
from mailhub.cases.service import create_case
from mailhub.cases.store import open_message, open_subject
from mailhub.crypto.protection import Protection
from mailhub.parse.msgid import MAX_REFERENCES
from mailhub.store import audit
from mailhub.store.models import Attachment, MessageRef, StoredMessage, utcnow
from tests.cases.case_support import (  # noqa: F401
    CLINIC,
    PATIENT,
    hub_fixture,
    mail,
    session,
    with_attachment,
)
from tests.pgserver import session_server


def _in(hub: Hub, raw: bytes, **kw):  # type: ignore[no-untyped-def]
    with session(hub) as s:
        result = file_inbound(s, hub, raw, **kw)
        s.commit()
        return result


def _count(hub: Hub, model: type) -> int:
    with session(hub) as s:
        return int(s.execute(select(func.count()).select_from(model)).scalar() or 0)


def test_case_ids_count_up_per_year_and_skip_taken_ones(hub: Hub) -> None:
    year = utcnow().year
    with session(hub) as s:
        first = allocate_case_id(s)
        create_case(s, patient_name="A", patient_email="a@x.example", actor="t")  # takes 0002
        s.commit()
        with s.begin_nested():
            s.execute(text("UPDATE case_counters SET last = 1"))  # a counter behind the cases
        again = allocate_case_id(s)
        s.commit()
    assert first == f"MT-{year}-0001"
    assert again == f"MT-{year}-0003"


def test_case_ids_are_unique_under_concurrency(hub: Hub) -> None:
    """Four writers allocating at once (threads, own sessions): no id handed out twice."""
    ids: list[str] = []
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def writer() -> None:
        try:
            start.wait()
            for _ in range(8):
                with session(hub) as s:
                    ids.append(create_case(s, patient_name="P", patient_email="p@x.example",
                                           actor="t").id)
                    s.commit()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(ids) == 32 and len(set(ids)) == 32
    with session(hub) as s:
        assert audit.verify(s).ok


def test_same_message_twice_is_stored_once(hub: Hub) -> None:
    raw = mail(msgid="<twice@patient.example>", subject="x-ray")
    a = _in(hub, raw)
    b = _in(hub, raw)  # redelivered: same bytes
    c = _in(hub, b"Received: from imap.example by hub; Mon, 2 Nov 2026 10:01:00 +0000\r\n" + raw)
    assert not a.duplicate and b.duplicate and c.duplicate  # by SMTP and again by IMAP
    assert a.case_id == b.case_id == c.case_id and a.message_pk == b.message_pk == c.message_pk
    assert _count(hub, StoredMessage) == 1


def test_message_without_message_id_gets_one_and_dedupes(hub: Hub) -> None:
    raw = mail(msgid=None, subject="no id here", body="please call me")
    a = _in(hub, raw)
    b = _in(hub, b"X-Loop: again\r\n" + raw)
    assert not a.duplicate and b.duplicate and a.message_pk == b.message_pk
    other = _in(hub, mail(msgid=None, subject="no id here", body="another text"))
    assert not other.duplicate
    with session(hub) as s:
        rows = s.execute(select(StoredMessage).order_by(StoredMessage.id)).scalars().all()
        assert len(rows) == 2 and all(r.message_id_assigned for r in rows)
        assert rows[0].message_id != rows[1].message_id
        assert rows[0].message_id.startswith("<") and "@medvoyage.example>" in rows[0].message_id
        stored = open_message(hub.sealer, rows[0])
        assert stored.startswith(b"Message-ID: " + rows[0].message_id.encode())
    # a reply naming the assigned id threads into the case
    reply = _in(hub, mail(msgid="<re@clinic-a.example>", frm=CLINIC, irt=[rows[0].message_id]))
    assert (reply.case_id, reply.reason) == (a.case_id, "in-reply-to")


def _files_holding(root: Path, needle: bytes) -> list[str]:
    found = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath, name)
            try:
                if needle in path.read_bytes():
                    found.append(str(path))
            except OSError:
                continue
    return found


def test_nothing_plaintext_at_rest(hub: Hub, request: pytest.FixtureRequest) -> None:
    marker_s, marker_b, marker_f = "SUBJMARK-7f3a9", "BODYMARK-c41e2", "FILEMARK-91bd0"
    headers = (f"From: Ana <{PATIENT}>\r\nTo: intake@medvoyage.example\r\n"
               f"Subject: {marker_s} results\r\nMessage-ID: <rest@patient.example>")
    raw = with_attachment(headers, f"the {marker_b} text", f"{marker_f}.pdf",
                          b"%PDF-1.4 " + marker_b.encode() * 3)
    r = _in(hub, raw, protection=Protection("openpgp", "verified", "A" * 40))
    with session(hub) as s:
        view = show_case(s, hub.sealer, r.case_id)
    (m,) = view["messages"]
    assert m["subject"] == f"{marker_s} results"  # really stored, and readable with the key
    assert m["attachments"] == [{"filename": f"{marker_f}.pdf", "content_type":
                                 "application/pdf", "size": 9 + 3 * len(marker_b)}]
    assert (m["encryption"], m["signature"], m["signer"]) == ("openpgp", "verified", "A" * 40)
    if hub.engine.dialect.name == "postgresql":
        with hub.engine.connect() as conn:
            conn.execute(text("CHECKPOINT"))
        root = session_server(request.config).data
    else:
        root = hub.config.hub.data_dir
    hub.engine.dispose()
    for marker in (marker_s, marker_b, marker_f):
        assert _files_holding(root, marker.encode()) == []
    # the instance folder as a whole (data, keys, spool) holds none of it either
    assert _files_holding(hub.config.base_dir, marker_b.encode()) == []


def test_sealed_rows_are_bound_to_their_message(hub: Hub) -> None:
    a = _in(hub, mail(msgid="<s1@patient.example>", subject="first"))
    b = _in(hub, mail(msgid="<s2@patient.example>", subject="second"))
    with session(hub) as s:
        ra, rb = s.get(StoredMessage, a.message_pk), s.get(StoredMessage, b.message_pk)
        assert ra is not None and rb is not None
        assert open_subject(hub.sealer, ra) == "first"
        rb.subject_sealed = ra.subject_sealed  # a blob moved to another row
        from mailhub.errors import CryptoError

        with pytest.raises(CryptoError):
            open_subject(hub.sealer, rb)


def test_hostile_messages_are_filed(hub: Hub) -> None:
    long_subject = "Ü" + "x" * 10 * 1024
    refs = [f"<r{i}@flood.example>" for i in range(5000)]
    a = _in(hub, mail(msgid="<big@patient.example>", subject=long_subject, refs=refs))
    garbage = (b"From: \xff\xfe <odd@patient.example>\r\nSubject: =?x-unknown?B?////?= \xe9t\xe9\r\n"
               b"Message-ID: <bad@@@>\r\nIn-Reply-To: <<<<\r\nReferences: (unclosed <a@b\r\n"
               b"Content-Type: multipart/mixed; boundary=\"nope\"\r\n\r\n\x00\xff body")
    b = _in(hub, garbage)
    empty = _in(hub, b"")
    assert not a.duplicate and not b.duplicate and not empty.duplicate
    with session(hub) as s:
        row = s.get(StoredMessage, a.message_pk)
        assert row is not None
        assert open_subject(hub.sealer, row) == long_subject
        assert len(row.references.split()) == MAX_REFERENCES
        assert row.references.split()[-1] == "<r4999@flood.example>"
        n_refs = s.execute(select(func.count()).select_from(MessageRef)
                           .where(MessageRef.message_pk == a.message_pk)).scalar()
        assert n_refs == MAX_REFERENCES
        odd = s.get(StoredMessage, b.message_pk)
        assert odd is not None and odd.from_addr == "odd@patient.example"
        assert open_message(hub.sealer, odd).endswith(garbage)
        view = show_case(s, hub.sealer, a.case_id)
        assert any(m["subject"] == long_subject for m in view["messages"])


def test_very_long_message_ids_are_indexed_by_digest(hub: Hub) -> None:
    long_id = "<" + "\u00e9" * 600 + "@x.example>"
    a = _in(hub, mail(msgid=long_id, subject="long id"))
    reply = _in(hub, mail(msgid="<lr@clinic-a.example>", frm=CLINIC, refs=[long_id]))
    assert (reply.case_id, reply.reason) == (a.case_id, "references")
    with session(hub) as s:
        row = s.get(StoredMessage, a.message_pk)
        assert row is not None and row.message_id == long_id
        assert row.message_id_norm.startswith("#sha256:")


def test_attachment_metadata_and_audit(hub: Hub) -> None:
    raw = with_attachment(f"From: <{CLINIC}>\r\nSubject: labs\r\nMessage-ID: <att@clinic-a.example>",
                          "see attached", "labs.pdf", b"0123456789")
    r = _in(hub, raw)
    with session(hub) as s:
        (att,) = s.execute(select(Attachment)).scalars().all()
        assert (att.message_pk, att.content_type, att.size) == (r.message_pk, "application/pdf", 10)
        entries = list(audit.iter_entries(s, case_id=r.case_id))
        assert [e.action for e in entries] == ["case-opened", "filed"]
        detail = json.loads(entries[1].detail)
        assert detail["reason"] == "new-case" and detail["direction"] == "in"
        assert entries[1].message_id == "<att@clinic-a.example>"
        assert audit.verify(s).ok


def test_two_copies_filed_at_once_make_one_message_and_one_case(hub: Hub) -> None:
    """The same first contact arriving by SMTP and by IMAP at the same moment."""
    raw = mail(msgid="<race@newcomer.example>", frm="newcomer@newcomer.example", name="New")
    results = []
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def worker() -> None:
        try:
            start.wait()
            results.append(_in(hub, raw))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(r.duplicate for r in results) == [False, True]
    assert results[0].case_id == results[1].case_id
    assert _count(hub, StoredMessage) == 1
    from mailhub.store.models import Case

    assert _count(hub, Case) == 1
    with session(hub) as s:
        assert audit.verify(s).ok
        assert [e.action for e in audit.iter_entries(s)] == ["case-opened", "filed"]


def test_a_copy_filed_while_the_first_is_uncommitted(hub: Hub) -> None:
    """The second copy waits for the first transaction and then files nothing new."""
    raw = mail(msgid="<slow@newcomer.example>", frm="newcomer@newcomer.example", name="New")
    first = session(hub)
    a = file_inbound(first, hub, raw)  # not committed yet: holds the write locks
    results = []
    t = threading.Thread(target=lambda: results.append(_in(hub, raw)))
    t.start()
    t.join(0.5)  # gives the second copy time to reach the locks (outcome is the same anyway)
    first.commit()
    first.close()
    t.join()
    (b,) = results
    assert not a.duplicate and b.duplicate and b.case_id == a.case_id
    from mailhub.store.models import Case

    assert _count(hub, Case) == 1 and _count(hub, StoredMessage) == 1
    with session(hub) as s:
        assert [e.action for e in audit.iter_entries(s)] == ["case-opened", "filed"]


def test_message_id_is_kept_as_written(hub: Hub) -> None:
    r = _in(hub, mail(msgid='(a comment) <"ab.c"@Host.example> trailing'))
    with session(hub) as s:
        row = s.get(StoredMessage, r.message_pk)
        assert row is not None
        assert (row.message_id, row.message_id_norm) == ('<"ab.c"@Host.example>',
                                                         "<ab.c@Host.example>")
