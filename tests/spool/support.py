"""Shared pieces of the spool tests: a sealer with a fresh key, envelopes, segment paths."""

from __future__ import annotations

import secrets
from pathlib import Path

from mailhub.crypto.atrest import AtRest
from mailhub.spool.spool import Envelope, Spool


def sealer(key: bytes | None = None) -> AtRest:
    return AtRest(key or secrets.token_bytes(32))


def envelope(listener: str = "submission", n: int = 0) -> Envelope:
    return Envelope(mail_from="coord@medvoyage.example", rcpt_tos=[f"r{n}@clinic.example"],
                    listener=listener, peer="127.0.0.1:1", auth_user="coord", tls=True)


def body(n: int, size: int = 4096) -> bytes:
    head = f"Subject: pre-op note {n}\r\n\r\n".encode()
    return head + b"fasting from midnight. " * (size // 23)


def segments(spool: Spool, listener: str = "submission") -> list[Path]:
    return sorted((spool.root / listener).glob("*.seg"))


def files(spool: Spool, listener: str = "submission") -> list[str]:
    return sorted(p.name for p in (spool.root / listener).iterdir())
