"""The hub's side of IMAP: the watcher's ingest callback, and case-folder copies of SMTP mail.

A message from a watched mailbox goes through the same inbound path as SMTP mail (open with the
hub's keys, learn Autocrypt keys, thread, store sealed); it is not spooled because it stays in the
watched folder until it is stored. The copy appended to the case folder is the opened message
with the hub's Mailhub-Protection header, the same bytes every time (so a replay appends nothing
twice). Mail the hub sends or receives by SMTP for a case is appended to its folder too, from a
worker thread, best effort: the case store already holds it.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import select
from sqlmodel import Session

from mailhub.cases.folder_merge import MergeFollower
from mailhub.crypto.inbound import open_message
from mailhub.ingress.imap_session import ImapSettings, file_copy
from mailhub.ingress.imap_watcher import FiledResult, ImapWatcher
from mailhub.ingress.inbound_flow import InboundFlow
from mailhub.ingress.inbound_gate import InboundGate
from mailhub.spool.spool import Envelope, SpooledMessage

log = logging.getLogger("mailhub.imap")


class ImapLink:
    def __init__(self, hub, flow: InboundFlow, gate: InboundGate) -> None:  # type: ignore[no-untyped-def]
        self.hub = hub
        self.flow = flow
        self.gate = gate
        self.settings = ImapSettings.from_config(hub.config.imap)
        self.watcher = ImapWatcher(self.settings, self.ingest,
                                   follow_merges=MergeFollower(self.merged))
        self._copies = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imap-copy")

    def merged(self, case_ids: list[str]) -> dict[str, tuple[str, str]]:
        """Where each of these cases' mail lives now and under which patient name: the case
        merged into, or the case itself with its current name (watcher thread)."""
        from mailhub.cases.service import merged_targets
        from mailhub.store.models import Case, Patient

        with Session(self.hub.engine) as session:
            out = merged_targets(session, case_ids)
            rows = session.execute(
                select(Case.id, Patient.name)
                .join(Patient, Case.patient_id == Patient.id)  # type: ignore[arg-type]
                .where(Case.id.in_(case_ids), Case.merged_into.is_(None)))  # type: ignore[attr-defined,union-attr]
            for case_id, name in rows:
                out[case_id] = (case_id, name or "")
            return out

    def ingest(self, raw: bytes, origin: str) -> FiledResult:
        """Open, thread and store one message from a watched folder (watcher thread)."""
        keys, _ = self.gate.keys()
        opened = self.gate.bind(open_message(raw, keys))
        sm = SpooledMessage(spool_id="imap", content=opened.raw,
                            envelope=Envelope(mail_from="", rcpt_tos=[], listener="imap",
                                              peer=origin))
        filed = self.flow.commit(sm, origin="imap")
        return FiledResult(filed.case_id, filed.patient_name, filed_bytes=opened.raw)

    def copy(self, case_id: str, patient_name: str | None, raw: bytes) -> None:
        """Append a message to its case folder in the background."""
        self._copies.submit(self._copy, case_id, patient_name, raw)

    def _copy(self, case_id: str, patient_name: str | None, raw: bytes) -> None:
        try:
            if patient_name is None:
                from mailhub.cases.filing import _patient_name

                with Session(self.hub.engine) as session:
                    patient_name = _patient_name(session, case_id)
            folder = file_copy(self.settings, case_id, patient_name, raw)
            log.info("filed a copy into IMAP folder %r", folder)
        except Exception as exc:  # the case store has the message; the folder copy is extra
            log.warning("could not append to the IMAP folder of %s: %s", case_id, exc)

    def start(self) -> None:
        self.watcher.start()

    def stop(self) -> None:
        self.watcher.stop()
        self._copies.shutdown(wait=True)
