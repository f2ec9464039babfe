"""IMAP connections for the hub: settings, a logged-in client, and filing one message.

Kept apart from the watcher because the hub also files the mail it sends or receives by SMTP
(``file_copy``) on short-lived connections of its own; IMAPClient is not thread-safe, so every
user owns its connection.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError

from mailhub.cases.imap_folders import CaseFolders
from mailhub.config import ImapConfig
from mailhub.errors import MailhubError


class ImapConnectError(MailhubError):
    """The IMAP server could not be reached, refused TLS, or refused the login."""


@dataclass(frozen=True)
class ImapSettings:
    """Everything a connection needs; built from ``[imap]`` with ``from_config``."""

    host: str
    port: int
    username: str
    password: str = field(repr=False)
    tls: str = "starttls"  # "starttls" | "ssl" | "off"
    watch: tuple[str, ...] = ("INBOX",)
    case_folder_prefix: str = "Cases"
    poll_interval: float = 30.0
    ca_file: Path | None = None  # None: the system's trust store
    timeout: float = 60.0  # socket timeout for each command
    idle_renew: float = 300.0  # re-issue IDLE this often (servers drop long IDLEs)
    reconnect_initial: float = 1.0
    reconnect_max: float = 60.0
    retry_failed_initial: float = 300.0  # a message whose ingest failed waits this long first
    retry_failed_max: float = 6 * 3600.0

    @classmethod
    def from_config(cls, cfg: ImapConfig, **overrides: Any) -> ImapSettings:
        """Settings from the ``[imap]`` section (reads the password file)."""
        base = cls(
            host=cfg.host, port=cfg.port, username=cfg.username, password=cfg.password(),
            tls=cfg.tls, watch=tuple(cfg.watch), case_folder_prefix=cfg.case_folder_prefix,
            poll_interval=float(cfg.poll_interval),
        )
        return replace(base, **overrides)


class Backoff:
    """Exponential delays: initial, doubling, capped; ``reset`` after a good pass."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial = initial
        self.maximum = maximum
        self._next = initial

    def next(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self.maximum)
        return delay

    def reset(self) -> None:
        self._next = self.initial


def _ssl_context(settings: ImapSettings) -> ssl.SSLContext:
    cafile = str(settings.ca_file) if settings.ca_file else None
    return ssl.create_default_context(cafile=cafile)


def connect(settings: ImapSettings) -> IMAPClient:
    """A logged-in client (TLS as configured); ImapConnectError says what went wrong."""
    try:
        ctx = _ssl_context(settings) if settings.tls != "off" else None
        client = IMAPClient(settings.host, settings.port, ssl=settings.tls == "ssl",
                            ssl_context=ctx, timeout=settings.timeout)
    except (OSError, IMAPClientError) as exc:
        raise ImapConnectError(
            f"cannot connect to IMAP server {settings.host}:{settings.port}: {exc}",
            hint="check [imap].host, port and tls, and that the server is running",
        ) from exc
    where = f"{settings.host}:{settings.port}"
    step = "STARTTLS"
    try:
        if settings.tls == "starttls":
            if not client.has_capability("STARTTLS"):
                raise ImapConnectError(
                    f"IMAP server {where} does not offer STARTTLS",
                    hint='use tls = "ssl" with the server\'s TLS port, or enable STARTTLS there',
                )
            client.starttls(ctx)
        step = "login"
        client.login(settings.username, settings.password)
    except ImapConnectError:
        close_quietly(client)
        raise
    except (OSError, IMAPClientError) as exc:
        close_quietly(client)
        if step == "login":
            raise ImapConnectError(
                f"IMAP login as {settings.username} on {where} failed: {exc}",
                hint="check [imap].username and the password in [imap].password_file",
            ) from exc
        raise ImapConnectError(
            f"STARTTLS with IMAP server {where} failed: {exc}",
            hint="the server's certificate must be valid for [imap].host and trusted here",
        ) from exc
    return client


def close_quietly(client: IMAPClient | None) -> None:
    """Log out if the connection still works, else just drop it."""
    if client is None:
        return
    try:
        client.logout()
    except Exception:
        try:
            client.shutdown()
        except Exception:
            pass


def file_copy(
    settings: ImapSettings,
    case_id: str,
    patient_name: str,
    raw: bytes,
    flags: Sequence[bytes | str] = (),
    when: datetime | None = None,
) -> str:
    """File a message the hub sent or received by SMTP into its case folder; return the folder.

    Uses its own short-lived connection (IMAPClient is not thread-safe); appending the same bytes
    twice files them once, so callers may simply retry after an error.
    """
    client = connect(settings)
    try:
        folder, _ = CaseFolders(client, settings.case_folder_prefix).file(
            case_id, patient_name, raw, flags=flags, when=when)
        return folder
    finally:
        close_quietly(client)
