"""aiosmtpd's SMTP protocol, with enhanced status codes everywhere and slowed AUTH failures.

aiosmtpd answers some errors with bare codes ("500 Line too long"); a mail client's user deserves
an enhanced status code and a sentence that says what to do, so ``push`` rewrites those replies
(``smtp_replies.rewrite_reply``).
AUTH is delayed per client address after repeated failures (``FailureThrottle``). STARTTLS
inside TLS is refused, and a failed TLS handshake is logged in one line (``HubSMTP``).

Receiving is the submission process's hot path, so two aiosmtpd steps are done more cheaply with
the same results: DATA is read in blocks (``read_data``, not one ``readuntil`` a line) and a plain
``<local@domain>`` address skips the RFC 5322 parser (``smtp_addresses.fast_getaddr``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import Callable, Iterator
from typing import Any

from aiosmtpd.smtp import (
    MISSING,
    SMTP,
    AuthResult,
    LoginPassword,
    Session,
    TLSSetupException,
    syntax,
)

from mailhub.ingress.auth import FailureThrottle
from mailhub.ingress.smtp_addresses import fast_getaddr
from mailhub.ingress.smtp_limits import LimitedSMTP
from mailhub.ingress.smtp_replies import rewrite_reply

log = logging.getLogger("mailhub.smtp")

_LINE_DOT = re.compile(rb"\r\n\.")  # a dot that starts a line: the end of DATA, or stuffing
TOO_LONG_REPLY = "500 Line too long (see RFC5321 4.5.3.1.6)"  # aiosmtpd's texts (rewritten)
TOO_MUCH_REPLY = "552 Error: Too much mail data"


class DataBody:
    """A DATA body as it arrives: aiosmtpd's size and line limits, applied block by block.

    As in aiosmtpd, a line is what lies between two CRLFs (a bare LF does not end one), a line
    longer than ``line_limit`` bytes with its CRLF, or more than ``size_limit`` bytes in all (as
    sent, dot-stuffing included), is an error; the first of the two in the stream decides the
    reply. After an error the data is dropped as it arrives, and reading goes on to the end.
    """

    __slots__ = ("size_limit", "max_content", "size", "run", "cr", "parts", "error", "stuffed")

    def __init__(self, size_limit: int | None, line_limit: int) -> None:
        self.size_limit = size_limit or 0
        self.max_content = line_limit - 2  # bytes a line may hold before its CRLF
        self.size = 0
        self.run = 0  # bytes of the current, unfinished line (a trailing CR included)
        self.cr = False
        self.parts: list[bytes] = []
        self.error: str | None = None
        self.stuffed = False  # a line began with a transparency dot (set by read_data)

    def add(self, data: bytes) -> None:
        if self.error is not None or not data:
            return
        start = self.size
        self.size += len(data)
        long_at = self._long_line_at(data, start)
        over = bool(self.size_limit) and self.size > self.size_limit
        if long_at >= 0 and (not over or long_at < self.size_limit):
            self.error = TOO_LONG_REPLY
        elif over:
            self.error = TOO_MUCH_REPLY
        if self.error is None:
            self.parts.append(data)
        else:
            self.parts.clear()  # as aiosmtpd: do not keep what will be refused

    def _long_line_at(self, data: bytes, start: int) -> int:
        """Stream position at which a line is certainly over the limit, or -1.

        Updates ``run`` and ``cr`` (the block ended with a CR, which the next may complete)."""
        if not self.cr and self._all_lines_short(data):
            return -1
        line_start = start - self.run  # where the current, unfinished line began
        split = self.cr and data[:1] == b"\n"  # a CRLF cut between two blocks
        lines = (b"\r" + data if split else data).split(b"\r\n")
        before = self.run - 1 if split else self.run  # the first line's bytes before ``data``
        last = lines[-1]
        self.run = len(last) if len(lines) > 1 else before + len(last)
        self.cr = last[-1:] == b"\r"
        open_over = self.run - self.cr > self.max_content  # a last CR may yet start a CRLF
        if len(lines) == 1:
            return line_start + self.max_content if open_over else -1
        ended = [before + len(lines[0]), *map(len, lines[1:-1])]
        if not open_over and max(ended) <= self.max_content:
            return -1
        for length in ended:  # rare: find the first line over the limit
            if length > self.max_content:
                return line_start + self.max_content
            line_start += length + 2
        return line_start + self.max_content

    def _all_lines_short(self, data: bytes) -> bool:
        """True, with ``run`` and ``cr`` updated, when no line touching ``data`` can be over the
        limit; False (nothing changed) when the exact count below must decide.

        Mail lines are short, and splitting a 200 KB block into its lines cost more than the
        rest of receiving it. Instead: the first and last line are measured, and between them
        each step goes from a line's start to the last CRLF within ``max_content + 2`` bytes.
        A line that fits ends inside that window, and so does every line before the CRLF found;
        no CRLF there means a line too long. A step passes ~12 lines of 76 bytes."""
        first = data.find(b"\r\n")
        if first < 0 or self.run + first > self.max_content:
            return False
        last = data.rfind(b"\r\n")
        run = len(data) - last - 2
        cr = data[-1:] == b"\r"
        if run - cr > self.max_content:
            return False
        window = self.max_content + 2  # a line that fits ends with its CRLF inside this
        rfind = data.rfind
        pos = first + 2
        while pos < last:  # from a line start, hop to the last CRLF within reach
            end = rfind(b"\r\n", pos, pos + window)
            if end < 0:
                return False
            pos = end + 2
        self.run, self.cr = run, cr
        return True

    def content(self) -> bytes:
        """The message: the body without the transparency dots (RFC 5321 4.5.2)."""
        data = self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)
        if not self.stuffed:
            return data
        if data[:1] == b".":
            data = data[1:]
        return data.replace(b"\r\n.", b"\r\n")


READ_SIZE = 1 << 20  # take whatever has arrived, up to this


def _unread(reader: asyncio.StreamReader, data: bytes) -> None:
    """Put back bytes read past the end of DATA (pipelined commands) for the next command.

    StreamReader has no public way; aiosmtpd itself clears ``_buffer`` after STARTTLS."""
    reader._buffer[:0] = data  # type: ignore[attr-defined]


async def read_data(reader: asyncio.StreamReader, body: DataBody) -> None:
    """Read a DATA body up to and including the lone-dot line, and not one byte further.

    One pass over each block as it arrives: the only places that matter are the dots that
    start a line (a CRLF before them; DATA's first line counts as after one). A dot line is
    the end when CRLF follows the dot, a transparency dot otherwise (``body.stuffed``); a dot
    too near the block's end to tell is held back until more comes. Bytes read past the end
    (commands the client pipelined) are put back into ``reader``. Raises IncompleteReadError
    if the client hangs up before the end."""
    before = b"\r\n"  # the last two bytes taken before ``scan``
    held = b""  # from an undecided line-starting dot on
    while True:
        block = await reader.read(READ_SIZE)
        if not block:
            raise asyncio.IncompleteReadError(held, None)
        scan = held + block if held else block
        held = b""
        take = len(scan)  # bytes of ``scan`` that belong to the body
        for dot in _line_dots(before, scan):
            after = scan[dot + 1:dot + 3]
            if after == b"\r\n":  # the end: the CRLF before the dot belongs to the body
                if dot:
                    body.add(scan[:dot])
                if dot + 3 < len(scan):
                    _unread(reader, scan[dot + 3:])
                return
            if len(after) < 2 and b"\r\n".startswith(after):
                take, held = dot, scan[dot:]  # the last dot line in scan: wait for more
                break
            body.stuffed = True
        if take:
            body.add(scan if take == len(scan) else scan[:take])
            before = (before + scan[max(0, take - 2):take])[-2:]


def _line_dots(before: bytes, scan: bytes) -> Iterator[int]:
    """Positions in ``scan`` of dots that start a line, in order (``before``: what precedes)."""
    if scan[:1] == b"." and before == b"\r\n":
        yield 0
    elif scan[:2] == b"\n." and before[-1:] == b"\r":
        yield 1
    for match in _LINE_DOT.finditer(scan):
        yield match.end() - 1


class HubSession(Session):
    """aiosmtpd's Session, quiet when aiosmtpd itself sets the deprecated ``login_data``.

    aiosmtpd 1.4's smtp_AUTH sets ``session.login_data`` on every successful AUTH, and that
    property logs "Session.login_data is deprecated" at WARNING on mail.log: a warning per
    login that no code of ours causes (we read ``auth_data``). Only the setter is quiet here;
    reading ``login_data`` still warns."""

    @Session.login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


class HubSMTP(LimitedSMTP):
    """SMTP with enhanced status codes, an AUTH failure throttle and connection limits."""

    def __init__(self, handler: Any, *, throttle: FailureThrottle | None = None,
                 **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.throttle = throttle

    def _create_session(self) -> Session:
        return HubSession(self.loop)

    async def push(self, status: Any) -> None:  # type: ignore[override]
        if isinstance(status, str):
            status = rewrite_reply(status)
        await super().push(status)

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        """aiosmtpd's STARTTLS, refused once TLS is active (RFC 3207 4.2).

        aiosmtpd would build a second ``SSLProtocol`` over the first one's transport; when that
        handshake fails, Python 3.11's ``_SSLProtocolTransport._force_close`` calls
        ``SSLProtocol._abort(exc)``, which takes no argument since 3.11's sslproto rewrite: a
        TypeError traceback from asyncio on top of aiosmtpd's own."""
        if self._tls_protocol is not None:
            await self.push("503 5.5.1 TLS already active")
            return
        await super().smtp_STARTTLS(arg)

    async def handle_exception(self, error: Exception) -> str:
        """A failed TLS handshake (untrusted certificate, plaintext after 220, a hang-up) is the
        client's doing, not a bug: one line, no traceback. aiosmtpd then closes the connection
        without a reply; anything else goes to aiosmtpd (traceback logged, 500 reply)."""
        if isinstance(error, TLSSetupException):
            log.info("TLS handshake failed listener=%s peer=%s: %s; connection closed",
                     getattr(self.event_handler, "listener", "smtp"),
                     _peer_text(self.session.peer if self.session else None),
                     _tls_failure(error.__cause__))
            return "454 4.7.0 TLS handshake failed"  # not sent: the connection is closed
        return await super().handle_exception(error)

    @syntax("AUTH <mechanism>")  # as aiosmtpd's: HELP reads it from the method
    async def smtp_AUTH(self, arg: str) -> None:
        if self.throttle is not None and self.session is not None:
            client = _client_ip(self.session.peer)
            delay = self.throttle.delay_for(client)
            if delay is None:  # its turn is too far off: other connections are guessing too
                log.info("refusing AUTH from %s: repeated failures, attempts already waiting",
                         client)
                await self.push("454 4.7.0 Too many failed logins from your address; "
                                "try again later")
                return
            if delay:
                log.info("slowing AUTH from %s by %.1fs after repeated failures", client, delay)
                await asyncio.sleep(delay)
        await super().smtp_AUTH(arg)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's address parsing; (None, None), a malformed address, where the email
        package's parser itself fails (``MAIL FROM:<`` raises IndexError in Python 3.11; others
        raise AttributeError or UnboundLocalError), rather than a traceback and a 500 reply."""
        fast = fast_getaddr(arg)
        if fast is None:
            try:
                return super()._getaddr(arg)
            except Exception:  # noqa: BLE001 - any failure of the parser: not an address
                return None, None
        local = fast[0].rpartition("@")[0]
        if self.local_part_limit and len(local) > self.local_part_limit:
            return None, None
        return fast

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's smtp_DATA, reading the body in blocks (``read_data``) instead of lines."""
        if "DATA" not in self._handle_hooks:  # the deprecated process_message API
            await super().smtp_DATA(arg)
            return
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        self.junk = 0  # a client sending a message is not idling
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        body = DataBody(self.data_size_limit, self.line_length_limit)
        try:
            if self.transport is None:
                raise asyncio.IncompleteReadError(b"", None)
            await read_data(self._reader, body)
        except (asyncio.CancelledError, asyncio.IncompleteReadError) as exc:
            # the client hung up before the end: nothing of it is handed on
            log.info("connection lost during DATA")
            self._writer.close()
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise asyncio.CancelledError from exc
        if body.error is not None:
            await self.push(body.error)
            self._set_post_data_state()
            return
        original_content = body.content()
        content: str | bytes = original_content
        if self._decode_data:
            if self.enable_SMTPUTF8:
                content = original_content.decode("utf-8", errors="surrogateescape")
            else:
                try:
                    content = original_content.decode("ascii", errors="strict")
                except UnicodeDecodeError:
                    await self.push("500 Error: strict ASCII mode")
                    return
        self.envelope.content = content
        self.envelope.original_content = original_content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push("250 OK" if status is MISSING else status)


def _tls_failure(cause: BaseException | None) -> str:
    """Why a handshake failed, in words (a hang-up's ConnectionResetError has none)."""
    if cause is None:
        return "unknown reason"
    if isinstance(cause, ConnectionResetError) and not str(cause):
        return "the client closed the connection"
    return " ".join(str(cause).split()) or type(cause).__name__


def _peer_text(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


def _client_ip(peer: Any) -> str:
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer)


def make_authenticator(check: Callable[[str, str], bool],
                       throttle: FailureThrottle) -> Callable[..., AuthResult]:
    """An aiosmtpd authenticator over ``check(login, password)``; failures feed the throttle."""

    def authenticator(server: SMTP, session: Any, envelope: Any, mechanism: str,
                      auth_data: Any) -> AuthResult:
        client = _client_ip(session.peer)
        if not isinstance(auth_data, LoginPassword):
            throttle.failed(client)
            return AuthResult(success=False, handled=False)
        try:
            login = auth_data.login.decode("utf-8")
            password = auth_data.password.decode("utf-8")
        except UnicodeDecodeError:
            throttle.failed(client)
            return AuthResult(success=False, handled=False)
        if check(login, password):
            throttle.succeeded(client)
            return AuthResult(success=True, auth_data=auth_data)
        throttle.failed(client)
        log.warning("AUTH failed for %r from %s", login[:80], client)
        return AuthResult(success=False, handled=False)

    return authenticator


async def start_server(factory: Callable[[], SMTP], host: str, port: int,
                       *, reuse_port: bool = False) -> asyncio.base_events.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(factory, host=host, port=port, reuse_port=reuse_port or None)


def server_tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    return ctx
