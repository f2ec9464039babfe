"""aiosmtpd handlers for the two listeners: thin, async, and 250 only after the spool fsync.

* Submission (coordinators): AUTH is enforced by the protocol object; the envelope sender must be
  at the hub's domain, any recipient is allowed (the outbound policy decides per recipient).
* Inbound (MX-facing): only recipients at the hub's domain (and ``case+ID@``) are accepted, so
  the port is never an open relay. An optional ``gate`` runs at the end of DATA (decryption and
  partner policy) and may refuse the message before anything is kept.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from mailhub.errors import MailhubError, PolicyRefusal
from mailhub.parse.checks import check_message
from mailhub.spool.spool import Envelope, Spool

log = logging.getLogger("mailhub.smtp")

MAX_RECIPIENTS = 100
_ADDR = re.compile(r"^[^\s@<>()\[\],;:\"]+@[A-Za-z0-9.-]+\.[A-Za-z0-9-]{2,}$|^[^\s@]+@\[[0-9.:a-fA-F]+\]$")

Gate = Callable[[Envelope, bytes], Awaitable[bytes | None]]


def valid_address(address: str) -> bool:
    return len(address) <= 254 and bool(_ADDR.match(address))


def _peer(session: Any) -> str:
    peer = getattr(session, "peer", "")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)


class _BaseHandler:
    listener = "submission"

    def __init__(self, *, domain: str, spool: Spool,
                 on_spooled: Callable[[str, str], None] | None = None) -> None:
        self.domain = domain.lower()
        self.spool = spool
        self.on_spooled = on_spooled

    def at_hub_domain(self, address: str) -> bool:
        return address.rpartition("@")[2].lower() == self.domain

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        if responses and not any("ENHANCEDSTATUSCODES" in r for r in responses):
            responses.insert(len(responses) - 1, "250-ENHANCEDSTATUSCODES")
        return responses

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        if not valid_address(address):
            return "553 5.1.3 Recipient address is not a valid mail address"
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return f"452 4.5.3 Too many recipients: at most {MAX_RECIPIENTS} per message"
        refusal = self.refuse_recipient(address)
        if refusal:
            return refusal
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Recipient OK"

    def refuse_recipient(self, address: str) -> str | None:
        return None

    async def gate(self, envelope: Envelope, content: bytes) -> bytes | None:
        """Hook run before spooling; may raise PolicyRefusal. Returns content to spool."""
        return None

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        content: bytes = envelope.original_content or b""
        auth = getattr(session, "auth_data", None)
        login = getattr(auth, "login", None)
        env = Envelope(
            mail_from=envelope.mail_from or "",
            rcpt_tos=list(envelope.rcpt_tos),
            listener=self.listener,
            peer=_peer(session),
            auth_user=login.decode("utf-8", "replace") if isinstance(login, bytes) else "",
            tls=getattr(session, "ssl", None) is not None,
            smtputf8="SMTPUTF8" in [o.upper() for o in envelope.mail_options],
        )
        try:
            msg = check_message(content)
            message_id = (msg.get("Message-ID") or "").strip()[:200]
            replaced = await self.gate(env, content)
            if replaced is not None:
                content = replaced
            spool_id = await self.spool.accept_async(env, content)
        except PolicyRefusal as exc:
            log.info("refused at DATA listener=%s peer=%s: %s", self.listener, env.peer, exc)
            return exc.smtp_reply()
        except MailhubError as exc:
            log.error("could not accept message listener=%s: %s", self.listener, exc)
            return "451 4.3.0 Temporary problem storing the message; please try again later"
        except Exception:  # the listener must keep serving whatever a message does
            log.exception("unexpected error at DATA listener=%s", self.listener)
            return "451 4.3.0 Temporary problem processing the message; please try again later"
        log.info("accepted listener=%s spool_id=%s message_id=%s rcpts=%d", self.listener,
                 spool_id, message_id or "(none: the hub assigns one)", len(env.rcpt_tos))
        if self.on_spooled is not None:
            self.on_spooled(self.listener, spool_id)
        return f"250 2.0.0 Ok: queued as {spool_id}"


class SubmissionHandler(_BaseHandler):
    """Coordinators' clients; AUTH has already been required by the protocol object."""

    listener = "submission"

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          mail_options: list[str]) -> str:
        if not session.authenticated:
            return "530 5.7.0 Authentication required: log in with your coordinator account"
        if not valid_address(address) or not self.at_hub_domain(address):
            return (f"553 5.7.1 Sender address must be at {self.domain}: the submission port "
                    "sends only as the organisation")
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender OK"


class InboundHandler(_BaseHandler):
    """Mail from clinics and patients, for the hub's own domain only."""

    listener = "inbound"

    def __init__(self, *, domain: str, spool: Spool,
                 on_spooled: Callable[[str, str], None] | None = None,
                 gate: Gate | None = None) -> None:
        super().__init__(domain=domain, spool=spool, on_spooled=on_spooled)
        self._gate = gate

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          mail_options: list[str]) -> str:
        if address and not valid_address(address):
            return "553 5.1.7 Sender address is not a valid mail address"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender OK"

    def refuse_recipient(self, address: str) -> str | None:
        if not self.at_hub_domain(address):
            return (f"550 5.7.1 Relaying denied: this server accepts mail only for "
                    f"@{self.domain}")
        return None

    async def gate(self, envelope: Envelope, content: bytes) -> bytes | None:
        if self._gate is None:
            return None
        return await self._gate(envelope, content)


__all__ = ["InboundHandler", "SubmissionHandler", "PolicyRefusal", "valid_address"]
