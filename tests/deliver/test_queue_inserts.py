"""Multi-row inserts of queue rows and payloads, on SQLite and on PostgreSQL: every id handed
back belongs to the row (or sealed payload) it is handed back for, in input order, whatever
order the database returned them in."""

from __future__ import annotations

import os

from sqlalchemy import event, select
from sqlalchemy.engine import Engine
from sqlmodel import Session

from mailhub.crypto.atrest import AtRest
from mailhub.deliver import payloads, queue
from mailhub.store.models import OutboundItem


def _rows(n: int) -> list[dict[str, object]]:
    return [queue.item_row(source_id=f"spool-{i // 3}", recipient=f"r{i}@clinic.example",
                           message_id=f"<m{i}@x.example>", sender="coord@medvoyage.example",
                           reason=f"row {i}") for i in range(n)]


def test_item_ids_come_back_in_input_order_in_one_statement(engine: Engine) -> None:
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute",
                 lambda *a: statements.append(a[2].split(" ", 1)[0]))
    rows = _rows(40)
    with Session(engine) as s:
        ids = queue.insert_items(s, rows)
        s.commit()
    assert statements.count("INSERT") == 1
    with Session(engine) as s:
        got = {r.id: r for r in s.execute(select(OutboundItem)).scalars()}
    assert len(set(ids)) == 40
    for row_id, row in zip(ids, rows, strict=True):
        assert (got[row_id].recipient, got[row_id].reason) == (row["recipient"], row["reason"])


def test_each_payload_opens_under_the_id_it_was_given(engine: Engine) -> None:
    sealer = AtRest(os.urandom(32), [])
    datas = [f"message {i}\r\n".encode() * (i + 1) for i in range(25)]
    with Session(engine) as s:
        pids = payloads.insert_payloads(s, datas, sealer)
        s.commit()
    sealed = payloads.load_payloads(engine, pids)
    assert [sealer.open(sealed[pid], str(pid).encode()) for pid in pids] == datas
