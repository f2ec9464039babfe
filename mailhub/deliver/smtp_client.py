"""The client side towards the smarthost or the internal relay: smtplib, one connection reused.

STARTTLS follows ``[delivery].starttls``: "required" checks the server's certificate against the
system store or ``ca_file`` and refuses to send without TLS; "opportunistic" uses TLS when offered
(without certificate checks, as opportunistic TLS does); "off" never uses it. A message marked
``require_tls`` (explicit plaintext exceptions) is never sent over a connection without TLS.
"""

from __future__ import annotations

import logging
import smtplib
import ssl
from dataclasses import dataclass
from pathlib import Path

from mailhub.errors import DeliveryError

log = logging.getLogger("mailhub.deliver")


@dataclass(frozen=True)
class SendResult:
    ok: bool
    permanent: bool
    reply: str


def client_tls_context(mode: str, ca_file: Path | None) -> ssl.SSLContext:
    if mode == "required":
        ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    else:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class SmtpConnection:
    """A reusable connection to one next hop; reconnects when the server closed it."""

    def __init__(self, host: str, port: int, *, starttls: str = "opportunistic",
                 ca_file: Path | None = None, helo: str = "mailhub", timeout: float = 60) -> None:
        self.host, self.port = host, port
        self.starttls = starttls
        self.ca_file = ca_file
        self.helo = helo
        self.timeout = timeout
        self._smtp: smtplib.SMTP | None = None
        self._tls = False

    def _connect(self) -> smtplib.SMTP:
        try:
            smtp = smtplib.SMTP(self.host, self.port, local_hostname=self.helo, timeout=self.timeout)
            smtp.ehlo()
            self._tls = False
            if self.starttls != "off" and smtp.has_extn("starttls"):
                smtp.starttls(context=client_tls_context(self.starttls, self.ca_file))
                smtp.ehlo()
                self._tls = True
            elif self.starttls == "required":
                smtp.close()
                raise DeliveryError(f"{self.host}:{self.port} does not offer STARTTLS and "
                                    "[delivery].starttls is \"required\"")
        except (OSError, smtplib.SMTPException, ssl.SSLError) as exc:
            raise DeliveryError(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        return smtp

    def send(self, sender: str, recipient: str, data: bytes, *, require_tls: bool = False,
             smtputf8: bool = False) -> SendResult:
        """Send one message to one recipient; map every outcome to ok/temporary/permanent."""
        for attempt in (1, 2):
            try:
                if self._smtp is None:
                    self._smtp = self._connect()
                if require_tls and not self._tls:
                    return SendResult(False, False, f"{self.host}:{self.port} offered no TLS and "
                                      "this message may only travel over TLS")
                options = ["SMTPUTF8"] if smtputf8 and self._smtp.has_extn("smtputf8") else []
                refused = self._smtp.sendmail(sender, [recipient], data, rcpt_options=[],
                                              mail_options=options)
                if refused:
                    code, text = refused[recipient]
                    return SendResult(False, code >= 500, f"{code} {text.decode('utf-8', 'replace')}")
                return SendResult(True, False, "250 accepted")
            except smtplib.SMTPRecipientsRefused as exc:
                code, text = exc.recipients.get(recipient, (450, b"refused"))
                self._reset()
                return SendResult(False, code >= 500, f"{code} {text.decode('utf-8', 'replace')}")
            except smtplib.SMTPResponseException as exc:
                text = exc.smtp_error.decode("utf-8", "replace") if isinstance(exc.smtp_error, bytes) else str(exc.smtp_error)
                self._reset()
                return SendResult(False, exc.smtp_code >= 500, f"{exc.smtp_code} {text}")
            except (TimeoutError, smtplib.SMTPServerDisconnected, ConnectionError) as exc:
                self.close()
                if attempt == 2:
                    return SendResult(False, False, f"connection to {self.host}:{self.port} lost: {exc}")
            except DeliveryError as exc:
                self.close()
                return SendResult(False, False, str(exc))
            except (OSError, smtplib.SMTPException) as exc:
                self.close()
                return SendResult(False, False, f"{self.host}:{self.port}: {exc}")
        return SendResult(False, False, "unreachable")

    def _reset(self) -> None:
        try:
            if self._smtp is not None:
                self._smtp.rset()
        except (OSError, smtplib.SMTPException):
            self.close()

    def close(self) -> None:
        if self._smtp is not None:
            try:
                self._smtp.quit()
            except (OSError, smtplib.SMTPException):
                try:
                    self._smtp.close()
                except OSError:
                    pass
            self._smtp = None
