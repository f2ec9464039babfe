"""The audit chain across savepoints: a rolled-back or released savepoint never breaks it."""

from __future__ import annotations

from sqlalchemy import Engine
from sqlmodel import Session

from mailhub.store.audit import AuditHead, append, entry_hash, verify


def test_rolled_back_savepoint_is_not_chained_to(engine: Engine) -> None:
    with Session(engine) as s:
        append(s, "x", "accepted")
        try:
            with s.begin_nested():
                append(s, "x", "held")
                raise RuntimeError("undo the savepoint")
        except RuntimeError:
            pass
        entry = append(s, "x", "sent")
        s.commit()
        assert entry.seq == 2
    with Session(engine) as s:
        result = verify(s)
        assert result.ok, result.problem
        assert result.entries == 2


def test_released_savepoint_entries_stay_in_the_chain(engine: Engine) -> None:
    with Session(engine) as s:
        append(s, "x", "accepted")
        with s.begin_nested():
            append(s, "x", "filed")
            append(s, "x", "encrypted")
        last = append(s, "x", "sent")
        s.commit()
        assert last.seq == 4
        assert last.hash == entry_hash(last)
    with Session(engine) as s:
        result = verify(s)
        assert result.ok and result.entries == 4
        head = s.get(AuditHead, 1)
        assert head is not None and head.seq == 4 and head.hash == last.hash


def test_two_sessions_one_after_another_share_one_chain(engine: Engine) -> None:
    for action in ("accepted", "sent"):
        with Session(engine) as s:
            append(s, "x", action)
            append(s, "x", "filed")
            s.commit()
    with Session(engine) as s:
        result = verify(s)
        assert result.ok and result.entries == 4
