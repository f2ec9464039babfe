"""After an inbound message is spooled (opened, with the hub's protection header): learn keys,
file it into its case, and queue the copy for the organisation's own mail server.

All of it is one database transaction; the spool file is removed only after the commit, and a
replay after a crash files nothing twice (the case store dedupes by digest, queue rows are unique
per spool id and recipient).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from sqlmodel import Session

from mailhub.crypto import autocrypt_learn
from mailhub.crypto.inbound import protection_of
from mailhub.crypto.protection import Protection
from mailhub.outbound.queueing import QueueWriter, RowSpec
from mailhub.parse.rawheaders import get_header
from mailhub.spool.spool import SpooledMessage
from mailhub.store.models import StoredMessage

log = logging.getLogger("mailhub.cases")

Filed = Callable[[str, str, bytes], None]  # (case_id, patient_name, raw) -> None


class InboundFlow:
    def __init__(self, hub, writer: QueueWriter, *,  # type: ignore[no-untyped-def]
                 on_queued: Callable[[], None] | None = None,
                 on_filed: Filed | None = None) -> None:
        self.hub = hub
        self.writer = writer
        self.on_queued = on_queued
        self.on_filed = on_filed

    def commit(self, sm: SpooledMessage, *, origin: str = "smtp"):  # type: ignore[no-untyped-def]
        from mailhub.cases.filing import file_inbound

        raw = sm.content
        enc, sig, signer = protection_of(raw)
        message_id = (get_header(raw, "Message-ID") or "").strip()
        with Session(self.hub.engine, expire_on_commit=False) as session:
            learnt = autocrypt_learn.learn(session, self.hub, raw)
            filed = file_inbound(session, self.hub, raw, Protection(enc, sig, signer),
                                 envelope_from=sm.envelope.mail_from,
                                 recipients=sm.envelope.rcpt_tos, actor=f"inbound:{origin}")
            log.info("autocrypt message_id=%s: %s", message_id, learnt)
            relay = self.hub.config.delivery.internal_relay
            if relay is not None and sm.envelope.rcpt_tos:
                specs = [RowSpec(recipient=r, status="queued", method="plaintext",
                                 relay="internal", data=raw,
                                 reason="decrypted copy for the organisation's mail server")
                         for r in sm.envelope.rcpt_tos]
                self.writer.write(session, source_id=sm.spool_id, message_id=message_id,
                                  sender=sm.envelope.mail_from, specs=specs,
                                  case_id=filed.case_id, actor="inbound")
            if not message_id:  # the store gave it one: log that, so the lines join up
                stored = session.get(StoredMessage, filed.message_pk)
                message_id = stored.message_id if stored is not None else "(none)"
            session.commit()
        self.hub.spool.remove(sm.envelope.listener, sm.spool_id)
        log.info("filed message_id=%s case=%s encryption=%s signature=%s", message_id,
                 filed.case_id, enc, sig)
        return filed

    async def process(self, listener: str, spool_id: str) -> None:
        sm = await asyncio.to_thread(self.hub.spool.load, listener, spool_id)
        filed = await asyncio.to_thread(self.commit, sm)
        if self.on_queued:
            self.on_queued()
        if self.on_filed and filed.case_id:
            self.on_filed(filed.case_id, filed.patient_name, sm.content)
