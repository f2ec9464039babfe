"""The audit log's hash chain: appends verify, and every kind of tampering is caught."""

from __future__ import annotations

import hashlib

import pytest
from sqlalchemy import Engine, text
from sqlmodel import Session

from mailhub.errors import StoreError
from mailhub.store.audit import (
    GENESIS,
    AuditEntry,
    AuditError,
    append,
    entry_hash,
    iter_entries,
    verify,
)


def fill(engine: Engine, n: int = 6) -> None:
    actions = ["accepted", "decrypted", "filed", "encrypted", "held", "sent"]
    with Session(engine) as s:
        for i in range(n):
            append(s, "smtp-inbound", actions[i % len(actions)], message_id=f"<m{i}@x.example>",
                   case_id="MT-2026-0001", detail={"recipient": "p@mail.example", "i": i})
        s.commit()


def sql(engine: Engine, statement: str, **params: object) -> None:
    with engine.begin() as conn:
        conn.execute(text(statement), params)


def check(engine: Engine) -> tuple[bool, int | None, str]:
    with Session(engine) as s:
        r = verify(s)
    return r.ok, r.first_bad_seq, r.problem


def test_clean_chain_verifies(engine: Engine) -> None:
    with Session(engine) as s:
        assert verify(s).ok and verify(s).entries == 0
    fill(engine)
    with Session(engine) as s:
        r = verify(s)
        entries = list(iter_entries(s))
    assert r.ok and r.entries == 6 and r.first_bad_seq is None and r.problem == ""
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5, 6]
    assert entries[0].prev_hash == GENESIS
    assert all(b.prev_hash == a.hash for a, b in zip(entries, entries[1:], strict=False))
    assert r.last_hash == entries[-1].hash
    assert all(e.hash == entry_hash(e) for e in entries)  # stable across a database round trip
    assert entries[2].detail_data() == {"i": 2, "recipient": "p@mail.example"}


def test_appends_in_later_transactions_extend_the_chain(engine: Engine) -> None:
    fill(engine, 2)
    with Session(engine, expire_on_commit=False) as s:
        append(s, "cli", "released", message_id="<m0@x.example>")
        s.commit()
        append(s, "cli", "sent", message_id="<m0@x.example>")
        s.commit()
        assert verify(s).entries == 4
        mine = list(iter_entries(s, message_id="<m0@x.example>"))
        assert [e.action for e in mine] == ["accepted", "released", "sent"]
        assert len(list(iter_entries(s, case_id="MT-2026-0001"))) == 2


def test_rolled_back_append_leaves_no_gap(engine: Engine) -> None:
    fill(engine, 2)
    with Session(engine) as s:
        append(s, "x", "held")
        s.rollback()
        entry = append(s, "x", "sent")
        s.commit()
        assert entry.seq == 3
    assert check(engine)[0]


def test_changed_entry_is_caught(engine: Engine) -> None:
    fill(engine)
    sql(engine, "UPDATE audit_entry SET actor = 'mallory' WHERE seq = 3")
    ok, seq, problem = check(engine)
    assert not ok and seq == 3 and "changed" in problem


def test_changed_detail_is_caught(engine: Engine) -> None:
    fill(engine)
    sql(engine, "UPDATE audit_entry SET detail = :d WHERE seq = 5",
        d='{"i":4,"recipient":"q@mail.example"}')
    assert check(engine)[:2] == (False, 5)


def test_changed_entry_with_recomputed_hash_breaks_the_chain(engine: Engine) -> None:
    fill(engine)
    with Session(engine) as s:
        e = s.get(AuditEntry, 2)
        assert e is not None
        e.action = "dropped"
        forged = entry_hash(e)
    sql(engine, "UPDATE audit_entry SET action = 'dropped', hash = :h WHERE seq = 2", h=forged)
    ok, seq, problem = check(engine)
    assert not ok and seq == 3 and "prev_hash" in problem


def test_changed_last_entry_with_recomputed_hash_is_caught_by_head(engine: Engine) -> None:
    fill(engine)
    with Session(engine) as s:
        e = s.get(AuditEntry, 6)
        assert e is not None
        e.actor = "mallory"
        forged = entry_hash(e)
    sql(engine, "UPDATE audit_entry SET actor = 'mallory', hash = :h WHERE seq = 6", h=forged)
    ok, seq, problem = check(engine)
    assert not ok and seq == 6 and "head" in problem


@pytest.mark.parametrize("seq", [1, 3])
def test_deleted_entry_is_caught(engine: Engine, seq: int) -> None:
    fill(engine)
    sql(engine, "DELETE FROM audit_entry WHERE seq = :s", s=seq)
    ok, bad, problem = check(engine)
    assert not ok and bad == seq and "missing" in problem


def test_deleted_and_renumbered_is_caught(engine: Engine) -> None:
    fill(engine)
    sql(engine, "DELETE FROM audit_entry WHERE seq = 3")
    for s in (4, 5, 6):
        sql(engine, "UPDATE audit_entry SET seq = :n WHERE seq = :s", n=s - 1, s=s)
    sql(engine, "UPDATE audit_head SET seq = 5")
    ok, bad, _ = check(engine)
    assert not ok and bad == 3


def test_truncated_tail_is_caught(engine: Engine) -> None:
    fill(engine)
    sql(engine, "DELETE FROM audit_entry WHERE seq >= 5")
    ok, bad, problem = check(engine)
    assert not ok and bad == 5 and "removed" in problem


def test_deleted_head_is_caught(engine: Engine) -> None:
    fill(engine)
    sql(engine, "DELETE FROM audit_head")
    ok, _, problem = check(engine)
    assert not ok and "head" in problem


def test_entry_added_behind_the_logs_back_is_caught(engine: Engine) -> None:
    fill(engine, 3)
    with Session(engine) as s:
        last = s.get(AuditEntry, 3)
        assert last is not None
        forged = AuditEntry(seq=4, at=last.at, actor="mallory", action="released",
                            detail="{}", prev_hash=last.hash, hash="")
        forged.hash = entry_hash(forged)
        s.add(forged)
        s.commit()
    ok, bad, problem = check(engine)
    assert not ok and bad == 4 and "outside" in problem


def test_refuses_bodies_keys_and_passwords(engine: Engine) -> None:
    with Session(engine) as s:
        for detail in ({"body": "Dear patient"}, {"nested": {"Pass_Word": "x"}},
                       {"list": [{"private-key": "x"}]},
                       {"key": "-----BEGIN PGP PUBLIC KEY BLOCK-----\n..."},
                       {"note": "x" * 9000}, {"when": object()}):
            with pytest.raises(AuditError):
                append(s, "x", "held", detail=detail)  # type: ignore[arg-type]
        with pytest.raises(StoreError, match="lower-case word"):
            append(s, "x", "Held; DROP TABLE")
        with pytest.raises(AuditError, match="actor"):
            append(s, " ", "held")
        s.rollback()
    with Session(engine) as s:
        assert verify(s).entries == 0


def test_long_message_id_is_clipped_but_distinct(engine: Engine) -> None:
    a, b = "<" + "a" * 2000 + "1@x>", "<" + "a" * 2000 + "2@x>"
    with Session(engine) as s:
        ea = append(s, "x", "accepted", message_id=a)
        eb = append(s, "x", "accepted", message_id=b)
        s.commit()
        assert ea.message_id is not None and eb.message_id is not None
        assert len(ea.message_id) <= 998 and ea.message_id != eb.message_id
        assert hashlib.sha256(a.encode()).hexdigest()[:16] in ea.message_id
        assert verify(s).ok


def test_the_hashed_form_of_an_entry_does_not_change() -> None:
    """Chains written by earlier versions must keep verifying: the canonical bytes are pinned
    (sorted compact JSON, UTF-8, the time in UTC with microseconds)."""
    from datetime import datetime

    entry = AuditEntry(seq=7, at=datetime(2026, 11, 23, 12, 0, 0, 123456), actor="delivery",
                       action="sent", message_id="<a@medvoyage.example>", case_id="MT-2026-0042",
                       detail='{"queue_id":3,"recipient":"dr.kaya@clinic-a.example",'
                              '"reply":"250 ok \u00e9"}',
                       prev_hash="0" * 64)
    assert entry_hash(entry) == (
        "cc6b18d14b0cf7026d99ffea571ee2fae8c25e049d82bef2b6dda9b172a29e34")
