"""The queue's payloads: a message's wire bytes (or its original while held), sealed at rest.

Recipients of one message share a payload row. Sealing uses the row's id as associated data, so
a payload cannot be swapped for another row's. Large payloads of the serving process lie in
segment files instead of their rows when the database is SQLite (``payload_files``); readers
here return the same sealed bytes either way.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.engine import Engine
from sqlmodel import Session

from mailhub.deliver.payload_files import Location, PayloadFiles, store_large
from mailhub.errors import StoreError
from mailhub.spool.spool import Sealer  # the at-rest key, as the worker and the spool use it
from mailhub.store.models import Payload, utcnow

_P = Payload.__table__  # type: ignore[attr-defined]
_SEAL_PAYLOAD = (update(_P).where(_P.c.id == bindparam("pid")).values(sealed=bindparam("blob")))
_SEALED = (select(_P.c.id, _P.c.sealed, _P.c.segment, _P.c.seg_offset, _P.c.seg_length)
           .where(_P.c.id.in_(bindparam("ids", expanding=True))))
# Multi-row INSERT ... RETURNING: asked to return ids in parameter order, SQLAlchemy falls
# back to one statement per row on SQLite (no sentinel column to sort by), a database call and
# a GIL hand-off each. Unsorted, all rows go in one statement; the ids are matched up instead.
_INSERT_PAYLOADS = insert(_P).returning(_P.c.id)


def insert_payloads(session: Session, datas: list[bytes], sealer: Sealer,
                    files: PayloadFiles | None = None) -> list[int]:
    """Store each of ``datas`` sealed: one INSERT for the ids, one UPDATE for the sealed
    bytes (and, with ``files``, one for where the large ones were appended)."""
    if not datas:
        return []
    now = utcnow()
    # the new rows are alike (empty) until sealed below: any id may go with any data
    result = session.execute(_INSERT_PAYLOADS, [{"sealed": b"", "created_at": now}] * len(datas))
    pids = sorted(int(pid) for pid in result.scalars())
    sealed = {pid: sealer.seal(data, str(pid).encode())
              for pid, data in zip(pids, datas, strict=True)}
    if files is not None:
        sealed = store_large(session, files, sealed)
    if sealed:
        session.execute(_SEAL_PAYLOAD, [{"pid": pid, "blob": blob}
                                        for pid, blob in sealed.items()])
    return pids


def insert_payload(session: Session, data: bytes, sealer: Sealer,
                   files: PayloadFiles | None = None) -> int:
    return insert_payloads(session, [data], sealer, files)[0]


def add_payload(session: Session, sealed: bytes) -> int:
    """A row for bytes the caller sealed (kept in the row)."""
    payload = Payload(sealed=sealed)
    session.add(payload)
    session.flush()
    assert payload.id is not None
    return payload.id


def sealed_payloads_in(session: Session, ids: Iterable[int],
                       files: PayloadFiles | None = None,
                       broken: dict[int, str] | None = None) -> dict[int, bytes]:
    """Payload id -> sealed bytes (plain rows, no ORM objects: read for every delivery).
    With ``broken``, a payload whose file cannot be read is reported there (id -> why)
    instead of failing the whole read: one damaged segment must not stop other rows."""
    wanted = sorted(set(ids))
    if not wanted:
        return {}
    out: dict[int, bytes] = {}
    for pid, sealed, segment, offset, length in session.connection().execute(
            _SEALED, {"ids": wanted}):
        if segment is None:
            out[int(pid)] = sealed
            continue
        try:
            if files is None:
                raise StoreError(f"queue payload {pid} lies in a payload file, and this "
                                 "process does not know the folder",
                                 hint="run it with the hub's config")
            out[int(pid)] = files.read(Location(int(segment), int(offset), int(length)))
        except StoreError as exc:
            if broken is None:
                raise
            broken[int(pid)] = str(exc)
    return out


def load_payloads(engine: Engine, ids: Iterable[int],
                  files: PayloadFiles | None = None) -> dict[int, bytes]:
    with Session(engine) as session:
        return sealed_payloads_in(session, ids, files)
