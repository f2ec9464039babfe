"""The case index answers a batch of outbound messages needs, fetched with three queries.

``outbound_case`` asks, for every coordinator message, whether its tagged or addressed case
exists, which cases its References name, and which open cases each recipient is the patient of.
Asked one message at a time that is a query per recipient of every message; the serving
process files messages in batches, so it asks for the whole batch at once and then decides
each message from these answers (the same decision function, over plain dictionaries).
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from mailhub.cases.store import SqlCaseIndex, msgid_key
from mailhub.parse.headers import normalize_address
from mailhub.store.models import Case, Patient

_CASES_IN = select(Case.id).where(Case.id.in_(bindparam("ids", expanding=True)))  # type: ignore[union-attr]
_OPEN_FOR_EMAILS = (
    select(Patient.email, Case.id).join(Patient, Patient.id == Case.patient_id)  # type: ignore[arg-type]
    .where(Patient.email.in_(bindparam("emails", expanding=True)),  # type: ignore[attr-defined]
           Case.status != "closed", Case.merged_into.is_(None))  # type: ignore[union-attr]
    .order_by(Case.created_at, Case.id))


class PrefetchedIndex:
    """The part of ``threading.CaseIndex`` that ``filing.outbound_case`` uses, answered from
    one batch's prefetched rows (questions outside the batch's values answer "none")."""

    def __init__(self, session: Session, hub_domain: str, *, case_ids: Iterable[str],
                 message_ids: Iterable[str], emails: Iterable[str]) -> None:
        sql = SqlCaseIndex(session, hub_domain)
        self.hub_domain = sql.hub_domain
        ids = sorted(set(case_ids))
        self._cases = set(session.execute(_CASES_IN, {"ids": ids}).scalars()) if ids else set()
        self._known = {msgid_key(m): cid for m, cid in
                       sql.cases_for_message_ids(list(dict.fromkeys(message_ids))).items()}
        norms = sorted({n for n in (normalize_address(e) for e in emails) if n})
        self._open: dict[str, list[str]] = {}
        if norms:
            for email, cid in session.execute(_OPEN_FOR_EMAILS, {"emails": norms}):
                self._open.setdefault(email, []).append(cid)

    def case_exists(self, case_id: str) -> bool:
        return case_id in self._cases

    def cases_for_message_ids(self, msgids: list[str]) -> dict[str, str]:
        return {m: self._known[k] for m in msgids if (k := msgid_key(m)) in self._known}

    def learn(self, message_id_key: str, case_id: str) -> None:
        """A message this batch stored (``StoredMessage.message_id_norm``): later messages of
        the batch that refer to it find its case, as one at a time (the first holder keeps
        an id)."""
        self._known.setdefault(message_id_key, case_id)

    def open_cases_for_patient(self, address: str) -> list[str]:
        norm = normalize_address(address)
        return list(self._open.get(norm, [])) if norm else []
