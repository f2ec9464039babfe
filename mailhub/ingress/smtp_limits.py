"""Limits on what one SMTP client may hold: open connections, and commands sent without mail.

The inbound port faces the internet and runs in the hub's main process, which also holds the
database, the spool and the delivery sockets: without a cap, one host opening thousands of
idle connections uses up the process's file descriptors and stalls all of it. And aiosmtpd's
idle timeout starts again with every command, so a client sending NOOP every few minutes keeps
a connection for ever. Postfix has the same two knobs (``smtpd_client_connection_count_limit``,
``smtpd_junk_command_limit``). Counts are per listening process: the submission port's child
processes each keep their own.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import SMTP

from mailhub.config import ListenerConfig

log = logging.getLogger("mailhub.smtp")

JUNK_LIMIT = 100  # NOOP, RSET, VRFY, HELP, EXPN a connection may send between two messages
TOO_MANY_FROM_CLIENT = b"421 4.7.0 Too many connections from your address; try again later\r\n"
TOO_MANY = b"421 4.3.2 Too many connections; try again later\r\n"


@dataclass
class ConnectionLimits:
    """The open connections of one listener in this process, per client address and in all."""

    per_client: int = 20
    total: int = 500
    _open: Counter[str] = field(default_factory=Counter)

    def admit(self, client: str) -> bytes | None:
        """Count a new connection in; or the reply that refuses it (nothing is counted)."""
        if sum(self._open.values()) >= self.total:
            return TOO_MANY
        if self._open[client] >= self.per_client:
            return TOO_MANY_FROM_CLIENT
        self._open[client] += 1
        return None

    def release(self, client: str) -> None:
        self._open[client] -= 1
        if self._open[client] <= 0:
            del self._open[client]


def listener_limits(cfg: ListenerConfig) -> ConnectionLimits:
    return ConnectionLimits(per_client=cfg.max_connections_per_client,
                            total=cfg.max_connections)


def _counted(method: Callable[[Any, str], Awaitable[None]]) -> Callable[[Any, str], Awaitable[None]]:
    """aiosmtpd's command, counted as junk (its HELP syntax kept by ``wraps``)."""

    @functools.wraps(method)
    async def command(self: LimitedSMTP, arg: str) -> None:
        if await self.over_junk_limit():
            return
        await method(self, arg)

    return command


class LimitedSMTP(SMTP):
    """aiosmtpd's SMTP with ``ConnectionLimits`` and a junk-command limit.

    A refused connection gets its 421 straight on the transport and is closed: no session, no
    greeting, nothing of aiosmtpd's set up for it."""

    def __init__(self, handler: Any, *, limits: ConnectionLimits | None = None,
                 **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.limits = limits
        self.junk = 0  # junk commands since the last DATA
        self._counted_as: str | None = None  # the client address ``limits`` counted
        self._refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.limits is not None and self.transport is None:  # not the STARTTLS re-entry
            peer = transport.get_extra_info("peername")
            client = str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)
            refusal = self.limits.admit(client)
            if refusal is not None:
                self._refused = True
                log.info("refused a connection from %s: %s", client, refusal[4:].decode().strip())
                transport.write(refusal)  # type: ignore[attr-defined]
                transport.close()
                return
            self._counted_as = client
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        if self.limits is not None and self._counted_as is not None:
            self.limits.release(self._counted_as)
            self._counted_as = None
        super().connection_lost(error)

    def data_received(self, data: bytes) -> None:
        if not self._refused:
            super().data_received(data)

    def eof_received(self) -> bool | None:
        return False if self._refused else super().eof_received()

    async def over_junk_limit(self) -> bool:
        """Count a command that moves no mail; past ``JUNK_LIMIT`` since the last DATA, 421 and
        close (an idle client must not keep its connection by sending NOOP now and then)."""
        self.junk += 1
        if self.junk <= JUNK_LIMIT:
            return False
        log.info("closing a connection from %s: %d commands without mail",
                 self._counted_as or "a client", self.junk)
        await self.push("421 4.7.0 Too many commands without mail; closing the connection")
        if self.transport is not None:
            self.transport.close()
        return True

    smtp_NOOP = _counted(SMTP.smtp_NOOP)
    smtp_RSET = _counted(SMTP.smtp_RSET)
    smtp_VRFY = _counted(SMTP.smtp_VRFY)
    smtp_HELP = _counted(SMTP.smtp_HELP)
    smtp_EXPN = _counted(SMTP.smtp_EXPN)
