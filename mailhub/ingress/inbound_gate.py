"""The inbound listener's end-of-DATA gate: open the message, then apply the partner policy.

It runs before the 250, so a refused message is refused in the SMTP conversation (550 5.7.x with
a text that says what to do) and nothing of it is kept. Accepted messages are spooled opened,
with the hub's Mailhub-Protection header; the spool seals them at rest.
"""

from __future__ import annotations

import logging
import time
from email.utils import getaddresses

from sqlmodel import Session, select

from mailhub.crypto.engine import CryptoEngine
from mailhub.crypto.inbound import InboundKeys, Opened, open_message
from mailhub.crypto.signer_binding import bind_to_sender
from mailhub.errors import DecryptionFailed, PolicyRefusal
from mailhub.parse.rawheaders import get_header
from mailhub.policy.inbound import ProtectionFacts, check_inbound
from mailhub.policy.trace import log_decision
from mailhub.spool.spool import Envelope
from mailhub.store import audit
from mailhub.store.models import KeyRecord

log = logging.getLogger("mailhub.crypto")


class InboundGate:
    def __init__(self, hub, crypto: CryptoEngine, refresh_every: float = 5.0) -> None:  # type: ignore[no-untyped-def]
        self.hub = hub
        self.crypto = crypto
        self.refresh_every = refresh_every
        self._keys: tuple[float, InboundKeys, str] | None = None

    def keys(self) -> tuple[InboundKeys, str]:
        """The hub's decryption material and partner certificates, refreshed every few seconds."""
        now = time.monotonic()
        if self._keys is None or now - self._keys[0] > self.refresh_every:
            ids = tuple((i.key_pem(), i.cert_pem()) for i in self.hub.keys.smime_identities())
            with Session(self.hub.engine) as session:
                certs = tuple((r.material or "").encode() for r in session.exec(
                    select(KeyRecord).where(KeyRecord.kind == "smime",
                                            KeyRecord.own == False)))  # noqa: E712
            fpr = self.hub.hub_fingerprint()
            self._keys = (now, InboundKeys(str(self.hub.keys.gnupg_home), ids,
                                           tuple(c for c in certs if c)), fpr)
        return self._keys[1], self._keys[2]

    def bind(self, opened: Opened, message_id: str = "") -> Opened:
        """A good signature by a key that is not the sender's is not "verified" (see
        signer_binding); also for IMAP ingest, which opens mail without this gate."""
        if opened.signature != "verified":
            return opened
        with Session(self.hub.engine) as session:
            bound = bind_to_sender(session, opened)
        if bound is not opened:
            log.info("signature message_id=%s: signer %s is not a key of the sender, so "
                     "unknown-key", message_id or "(none)", opened.signer)
        return bound

    def _refuse(self, envelope: Envelope, message_id: str, exc: PolicyRefusal | DecryptionFailed) -> None:
        with Session(self.hub.engine) as session:
            audit.append(session, "inbound", "refused", message_id=message_id or None,
                         detail={"from": envelope.mail_from[:200], "peer": envelope.peer,
                                 "reason": str(exc)[:300]})
            session.commit()

    async def __call__(self, envelope: Envelope, content: bytes) -> bytes:
        message_id = (get_header(content, "Message-ID") or "")[:300]
        keys, fpr = self.keys()
        try:
            opened: Opened = await self.crypto.call(open_message, content, keys)
        except DecryptionFailed as exc:
            refusal = DecryptionFailed(
                f"cannot decrypt this message: {exc.message}",
                hint=f"encrypt to the hub's key (OpenPGP fingerprint {fpr}; "
                     "ask your coordinator for it or for the hub's S/MIME certificate)")
            log.info("refused message_id=%s: %s", message_id, exc.message)
            self._refuse(envelope, message_id, refusal)
            raise PolicyRefusal(str(refusal), status="5.7.5") from exc
        opened = self.bind(opened, message_id)
        header_from = [a for _, a in getaddresses([get_header(content, "From") or ""]) if a]
        sender = header_from[0] if header_from else envelope.mail_from
        decision = check_inbound(sender, ProtectionFacts(opened.encryption != "none",
                                                         opened.signature),
                                 self.hub.policy_cache.current(), fpr)
        log_decision(message_id, decision.trace, recipient=None)
        if not decision.accept:
            refusal = decision.as_error()
            self._refuse(envelope, message_id, refusal)
            raise refusal
        return opened.raw
