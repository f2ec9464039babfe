"""The client side towards the smarthost or the internal relay: one connection, reused.

smtplib opens the connection (greeting, EHLO, STARTTLS, EHLO again: once per connection); the
transactions are then spoken on its socket directly, through ``smtp_wire``. When the server
advertises PIPELINING (RFC 2920), MAIL, RCPT and DATA leave in one write and their replies are
read together, then the dot-stuffed body and its terminator leave in one write: two round trips
a message. ``send_many`` chains messages: each body leaves together with the next message's
MAIL, RCPT and DATA, one round trip a message. Otherwise the commands go in lock-step, one reply
each.

STARTTLS follows ``[delivery].starttls``: "required" checks the server's certificate against the
system store or ``ca_file`` and refuses to send without TLS; "opportunistic" uses TLS when offered
(without certificate checks, as opportunistic TLS does); "off" never uses it. A message marked
``require_tls`` (explicit plaintext exceptions) is never sent over a connection without TLS.

Outcomes: 250 after the body is sent; a refusal is permanent for 5xx and temporary otherwise,
its reply kept as "<code> <text>", and RSET follows it (a 421 closes the connection instead).
A reply that cannot be read (no code, over ``smtp_wire.MAX_LINE`` or ``MAX_REPLY``) is
temporary. A connection found lost is opened again once, then the attempt is a temporary
failure.

Timeouts: ``timeout`` (60 s) for the greeting and each command's reply, ``final_timeout``
(10 minutes, RFC 5321 4.5.3.2.6) for the reply to the end of a message's data, which a server
may give only after scanning the message: a client that gives up sooner and sends again makes
duplicates. ``abort`` (an event set by the worker's shutdown) cuts off a send that waits past
the worker's grace, and no connection is opened again once it is set.
"""

from __future__ import annotations

import logging
import smtplib
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

from mailhub.deliver import smtp_wire
from mailhub.deliver.smtp_wire import Reply, ReplyReader
from mailhub.errors import DeliveryError

log = logging.getLogger("mailhub.deliver")

_DATA = b"DATA\r\n"
_ACCEPTED = ((250,), (250, 251), (354,))  # MAIL, RCPT, DATA


@dataclass(frozen=True)
class SendResult:
    ok: bool
    permanent: bool
    reply: str


SENT = SendResult(True, False, "250 accepted")
FINAL_TIMEOUT = 600.0  # seconds for the reply after the data (RFC 5321 4.5.3.2.6)
SHUTTING_DOWN = SendResult(False, False, "not sent: the hub was shutting down (sent again "
                           "after the restart; the next hop may already have it)")


@dataclass(frozen=True)
class Outgoing:
    """One message for one recipient, as ``SmtpConnection.send_many`` takes it."""

    sender: str
    recipient: str
    data: bytes
    require_tls: bool = False
    smtputf8: bool = False
    clean_body: bool = False  # written by the hub's MIME writers (smtp_wire.data_payload)


def client_tls_context(mode: str, ca_file: Path | None) -> ssl.SSLContext:
    if mode == "required":
        ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    else:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def first_refusal(replies: list[Reply]) -> Reply | None:
    """The reply that ends the transaction: the first of MAIL, RCPT, DATA not accepted."""
    for reply, accepted in zip(replies, _ACCEPTED, strict=False):
        if reply.code not in accepted:
            return reply
    return None


def refused(reply: Reply) -> SendResult:
    return SendResult(False, reply.code >= 500, str(reply))


class SmtpConnection:
    """A reusable connection to one next hop; reconnects when the server closed it."""

    def __init__(self, host: str, port: int, *, starttls: str = "opportunistic",
                 ca_file: Path | None = None, helo: str = "mailhub", timeout: float = 60,
                 final_timeout: float = FINAL_TIMEOUT,
                 abort: threading.Event | None = None) -> None:
        self.host, self.port = host, port
        self.starttls = starttls
        self.ca_file = ca_file
        self.helo = helo
        self.timeout = timeout
        self.final_timeout = final_timeout
        self.abort = abort or threading.Event()
        self._smtp: smtplib.SMTP | None = None
        self._sock: socket.socket | None = None
        self._reader: ReplyReader | None = None
        self._tls = False
        self.features: dict[str, str] = {}  # EHLO keywords (lower case) -> parameters

    @property
    def pipelining(self) -> bool:
        return "pipelining" in self.features

    def _connect(self) -> None:
        try:
            smtp = smtplib.SMTP(self.host, self.port, local_hostname=self.helo, timeout=self.timeout)
        except (OSError, smtplib.SMTPException) as exc:
            raise DeliveryError(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        try:
            smtp.ehlo()
            tls = False
            if self.starttls != "off" and smtp.has_extn("starttls"):
                smtp.starttls(context=client_tls_context(self.starttls, self.ca_file))
                smtp.ehlo()
                tls = True
            elif self.starttls == "required":
                raise DeliveryError(f"{self.host}:{self.port} does not offer STARTTLS and "
                                    "[delivery].starttls is \"required\"")
        except (OSError, smtplib.SMTPException, DeliveryError) as exc:
            smtp.close()
            if isinstance(exc, DeliveryError):
                raise
            raise DeliveryError(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        assert smtp.sock is not None
        # every command group and every body goes out in one write, then we wait for a reply:
        # Nagle would hold a write's last partial segment until the peer's delayed ACK (up to
        # 40 ms on Linux), which halved the 200 KiB relay's rate
        smtp.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._smtp, self._sock, self._tls = smtp, smtp.sock, tls
        self._reader = ReplyReader(smtp.sock.recv)
        self.features = dict(smtp.esmtp_features) if smtp.does_esmtp else {}

    def send(self, sender: str, recipient: str, data: bytes, *, require_tls: bool = False,
             smtputf8: bool = False, clean_body: bool = False) -> SendResult:
        """Send one message to one recipient; map every outcome to ok/temporary/permanent."""
        for attempt in (1, 2):
            if self.abort.is_set():  # a send cut off by shutdown is not made again now
                self._drop()
                return SHUTTING_DOWN
            try:
                if self._sock is None:
                    self._connect()
                if require_tls and not self._tls:
                    return SendResult(False, False, f"{self.host}:{self.port} offered no TLS and "
                                      "this message may only travel over TLS")
                return self._transaction(sender, recipient, data, smtputf8, clean_body)
            except (TimeoutError, ConnectionError) as exc:
                self._drop()
                if attempt == 2:
                    return SendResult(False, False, f"connection to {self.host}:{self.port} lost: {exc}")
            except DeliveryError as exc:
                self._drop()
                return SendResult(False, False, str(exc))
            except smtp_wire.ReplyTooLong:
                # the stream is out of step: not reused. No refusal was read, so it is not
                # permanent (a bounce would tell the sender a message failed that may yet go)
                self._drop()
                return SendResult(False, False, f"{self.host}:{self.port} sent a reply too long "
                                  "to read (a line over 8 KiB or a reply over 64 KiB)")
            except OSError as exc:
                self._drop()
                return SendResult(False, False, f"{self.host}:{self.port}: {exc}")
        return SendResult(False, False, "unreachable")

    def send_many(self, items: list[Outgoing]) -> list[SendResult]:
        """Send several messages, each with its own outcome, in order.

        With PIPELINING, one message's body, its terminator and the next message's MAIL, RCPT
        and DATA leave in one write (RFC 2920 allows message content to start a group, and
        DATA to end it): one round trip a message instead of two. Whatever the chain cannot
        settle (no PIPELINING, no TLS where required, an address the server cannot take, a
        connection lost on the way) goes through ``send``, one by one, as before."""
        results: list[SendResult] = []
        while len(results) < len(items):
            rest = items[len(results):]
            chained: list[SendResult] = []
            if len(rest) > 1 and self._sock is not None:  # (send connects, with its care)
                try:
                    self._chain(rest, chained)
                except (OSError, smtp_wire.ReplyTooLong):
                    self._drop()  # what the chain had not settled is sent again below
            results += chained
            if not chained:  # the next one alone, with send's care
                item = items[len(results)]
                results.append(self.send(item.sender, item.recipient, item.data,
                                         require_tls=item.require_tls, smtputf8=item.smtputf8,
                                         clean_body=item.clean_body))
        return results

    def _chain(self, items: list[Outgoing], results: list[SendResult]) -> None:
        """Send the longest run of ``items`` this connection can pipeline, back to back, and
        append each settled outcome to ``results`` as it comes (they stand even when the
        connection then fails: raised, and the rest is left to the caller)."""
        sock, reader = self._sock, self._reader
        if sock is None or reader is None or not self.pipelining or self.abort.is_set():
            return
        heads: list[bytes] = []
        for item in items:
            if item.require_tls and not self._tls:
                break
            head = self._envelope(item.sender, item.recipient, len(item.data), item.smtputf8)
            if head is None:
                break
            heads.append(head[0] + head[1] + _DATA)
        if not heads:
            return
        sock.sendall(heads[0])
        for k, item in enumerate(items[: len(heads)]):
            after = heads[k + 1] if k + 1 < len(heads) else b""
            replies = self._read_pipelined(reader)
            refusal = first_refusal(replies)
            if refusal is None:
                sock.sendall(smtp_wire.data_payload(item.data, clean_body=item.clean_body)
                             + after)
                final = self._final_reply(sock, reader)
                results.append(SENT if final.code == 250 else refused(final))
                if final.code == 421:  # the server is closing: the next MAIL went nowhere
                    self._drop()
                    return
                continue
            results.append(self._end_refused(replies, refusal))
            if self._sock is None:
                return
            if after:
                sock.sendall(after)

    def _transaction(self, sender: str, recipient: str, data: bytes,
                     smtputf8: bool, clean_body: bool = False) -> SendResult:
        sock, reader = self._sock, self._reader
        assert sock is not None and reader is not None
        head = self._envelope(sender, recipient, len(data), smtputf8)
        if head is None:
            return SendResult(False, False, f"{self.host}:{self.port} does not offer SMTPUTF8, "
                              "which this message's addresses need")
        mail, rcpt = head
        if self.pipelining:
            sock.sendall(mail + rcpt + _DATA)
            replies = self._read_pipelined(reader)
        else:
            replies = []
            for command in (mail, rcpt, _DATA):
                sock.sendall(command)
                replies.append(reader.read())
                if first_refusal(replies) is not None:
                    break
        refusal = first_refusal(replies)
        if refusal is None:
            sock.sendall(smtp_wire.data_payload(data, clean_body=clean_body))
            final = self._final_reply(sock, reader)
            if final.code == 250:
                return SENT
            self._after_refusal(final)
            return refused(final)
        return self._end_refused(replies, refusal)

    def _final_reply(self, sock: socket.socket, reader: ReplyReader) -> Reply:
        """The reply to the end of the data, waited for ``final_timeout``: the server may be
        scanning the message, and giving up after the usual timeout would send it twice."""
        sock.settimeout(self.final_timeout)
        try:
            return reader.read()
        finally:
            if self._sock is sock:
                sock.settimeout(self.timeout)

    def cut_off(self) -> None:
        """From another thread, with ``abort`` set: end a send blocked on this connection (its
        reads see the end of the stream; the row is retried, never resent at once)."""
        sock = self._sock
        if sock is not None:
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the TCP stream, not TLS's
            except OSError:
                pass

    def _envelope(self, sender: str, recipient: str, size: int,
                  smtputf8: bool) -> tuple[bytes, bytes] | None:
        """MAIL and RCPT as this server takes them; None when the addresses need SMTPUTF8 and
        the server does not offer it."""
        try:
            return smtp_wire.envelope(sender, recipient,
                                      size=size if "size" in self.features else None,
                                      smtputf8=smtputf8 and "smtputf8" in self.features)
        except UnicodeEncodeError:
            return None

    def _end_refused(self, replies: list[Reply], refusal: Reply) -> SendResult:
        """A transaction refused at MAIL, RCPT or DATA: an empty message ends a DATA taken
        after all, then RSET (or the connection closes on a 421)."""
        if len(replies) == 3 and replies[2].code == 354:
            assert self._sock is not None and self._reader is not None
            self._sock.sendall(b".\r\n")
            self._reader.read()
        self._after_refusal(refusal)
        return refused(refusal)

    def _read_pipelined(self, reader: ReplyReader) -> list[Reply]:
        """The replies to MAIL, RCPT and DATA; after a refusal, a server that hangs up instead
        of answering the rest leaves the refusal as the outcome."""
        replies: list[Reply] = []
        try:
            while len(replies) < 3 and (not replies or replies[-1].code != 421):
                replies.append(reader.read())
        except (TimeoutError, ConnectionError):
            if first_refusal(replies) is None:
                raise
            self._drop()
        return replies

    def _after_refusal(self, reply: Reply) -> None:
        """RSET after a refused transaction; a 421 means the server is closing: close too."""
        if reply.code == 421 or self._sock is None:
            self._drop()
            return
        try:
            self._sock.sendall(b"RSET\r\n")
            assert self._reader is not None
            self._reader.read()
        except (OSError, ValueError):
            self._drop()

    def _drop(self) -> None:
        """Forget the connection without a goodbye (it is broken or being refused)."""
        smtp, self._smtp, self._sock, self._reader = self._smtp, None, None, None
        self.features = {}
        if smtp is not None:
            try:
                smtp.close()
            except OSError:
                pass

    def close(self) -> None:
        """QUIT, then close."""
        if self._sock is not None and self._reader is not None:
            try:
                self._sock.sendall(b"QUIT\r\n")
                self._reader.read()
            except (OSError, ValueError):
                pass
        self._drop()
