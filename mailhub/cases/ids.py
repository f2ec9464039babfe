"""Case ids ``MT-<year>-<NNNN>``, allocated atomically from ``case_counters``.

One statement bumps the year's counter and returns the new value
(``INSERT ... ON CONFLICT (year) DO UPDATE SET last = last + 1 RETURNING last``): on PostgreSQL
the row lock it takes is held to the end of the transaction, so two hub instances opening cases
at the same moment get different numbers; on SQLite the statement takes the database's write
lock. A number whose case already exists (a restored database, a counter edited by hand) is
skipped.
"""

from __future__ import annotations

import logging
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from mailhub.cases.subjects import format_case_id
from mailhub.errors import StoreError
from mailhub.store.models import Case, CaseCounter, utcnow

log = logging.getLogger("mailhub.cases")

_MAX_SKIPS = 1000


def _upsert(session: Session, year: int):  # type: ignore[no-untyped-def]
    """The dialect's ``INSERT ... ON CONFLICT DO UPDATE ... RETURNING last``."""
    table = CaseCounter.__table__  # type: ignore[attr-defined]
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
    else:
        raise StoreError(f"case ids need PostgreSQL or SQLite, not {dialect}")
    stmt = insert(table).values(year=year, last=1)
    stmt = stmt.on_conflict_do_update(index_elements=[table.c.year],
                                      set_={"last": table.c.last + 1})
    return stmt.returning(table.c.last)


def next_number(session: Session, year: int) -> int:
    """The next case number of ``year``, in the caller's transaction (commit promptly)."""
    value = session.execute(_upsert(session, year)).scalar_one()
    return int(value)


def allocate_case_id(session: Session, now: datetime | None = None) -> str:
    """A new, unused case id for the current (UTC) year; the caller inserts the case."""
    year = (now or utcnow()).year
    for _ in range(_MAX_SKIPS):
        cid = format_case_id(year, next_number(session, year))
        taken = session.execute(select(Case.id).where(Case.id == cid)).first()  # type: ignore[arg-type]
        if taken is None:
            return cid
        log.warning("case id %s is already taken; the counter for %d was behind", cid, year)
    raise StoreError(f"could not find a free case id for {year}",
                     hint="check the case_counters table against the cases table")
