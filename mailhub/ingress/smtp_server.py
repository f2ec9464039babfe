"""aiosmtpd's SMTP protocol, with enhanced status codes everywhere and slowed AUTH failures.

aiosmtpd answers some errors with bare codes ("500 Line too long"); a mail client's user deserves
an enhanced status code and a sentence that says what to do, so ``push`` rewrites those replies.
AUTH is delayed per client address after repeated failures (``FailureThrottle``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import Callable
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from mailhub.ingress.auth import FailureThrottle

log = logging.getLogger("mailhub.smtp")

# aiosmtpd's own reply texts -> replies with enhanced status codes and advice.
_REWRITES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^500 Line too long"),
     "500 5.5.2 Line too long: RFC 5321 allows at most 1000 characters per line; "
     "fold long header lines or use a transfer encoding"),
    (re.compile(r"^500 Command line too long"), "500 5.5.2 Command line too long"),
    (re.compile(r"^552 Error: Too much mail data"),
     "552 5.3.4 Message too big for this server: send a smaller message or share the "
     "file another way"),
    (re.compile(r"^530 5\.7\.0 Authentication required"),
     "530 5.7.0 Authentication required: log in with your coordinator account"),
    (re.compile(r"^530 Must issue a STARTTLS command first"),
     "530 5.7.0 Must issue a STARTTLS command first"),
    (re.compile(r"^500 Error: command \"(.*)\" not recognized"),
     r"500 5.5.1 Command \1 not recognized"),
    (re.compile(r"^503 Error: need MAIL command"), "503 5.5.1 Send MAIL FROM first"),
    (re.compile(r"^503 Error: need RCPT command"), "503 5.5.1 Send RCPT TO first"),
    (re.compile(r"^503 Error: nested MAIL command"), "503 5.5.1 Nested MAIL command"),
    (re.compile(r"^503 Error: send HELO first"), "503 5.5.1 Send EHLO first"),
    (re.compile(r"^501 Syntax: (.*)"), r"501 5.5.4 Syntax: \1"),
    (re.compile(r"^501 Not enough value"), "501 5.5.4 AUTH needs a mechanism"),
    (re.compile(r"^501 Too many values"), "501 5.5.4 Too many AUTH arguments"),
    (re.compile(r"^503 Already authenticated"), "503 5.5.1 Already authenticated"),
    (re.compile(r"^500 Error: strict ASCII mode"),
     "500 5.6.7 Non-ASCII data without SMTPUTF8/8BITMIME"),
    (re.compile(r"^554 Command refused"), "554 5.7.0 Command refused"),
]


def rewrite_reply(status: str) -> str:
    for pattern, replacement in _REWRITES:
        if pattern.search(status):
            return pattern.sub(replacement, status, count=1)
    return status


class HubSMTP(SMTP):
    """SMTP with enhanced status codes and an AUTH failure throttle."""

    def __init__(self, handler: Any, *, throttle: FailureThrottle | None = None,
                 **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.throttle = throttle

    async def push(self, status: Any) -> None:  # type: ignore[override]
        if isinstance(status, str):
            status = rewrite_reply(status)
        await super().push(status)

    async def smtp_AUTH(self, arg: str) -> None:
        if self.throttle is not None and self.session is not None:
            delay = self.throttle.delay_for(_client_ip(self.session.peer))
            if delay:
                log.info("slowing AUTH from %s by %.1fs after repeated failures",
                         _client_ip(self.session.peer), delay)
                await asyncio.sleep(delay)
        await super().smtp_AUTH(arg)


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
