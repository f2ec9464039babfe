"""Helpers for the IMAP tests: settings, an outside client, messages, a tiny inbound path."""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Callable
from email.header import decode_header, make_header
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.policy import SMTP
from email.utils import make_msgid

from imapclient import IMAPClient

from mailhub.cases.imap_folders import to_crlf
from mailhub.ingress.imap_watcher import FiledResult, ImapSettings
from tests.ingress.dovecot import Dovecot

PROTECTION = b"Mailhub-Protection: encryption=none; signature=none\r\n"


def settings_for(server: Dovecot, **overrides: object) -> ImapSettings:
    """Watcher settings for a test server (plain IMAP on loopback, fast reconnects)."""
    base: dict[str, object] = dict(
        host=server.host, port=server.port, username=server.username,
        password=server.password, tls="off", watch=("INBOX",), case_folder_prefix="Cases",
        poll_interval=3600.0, timeout=10.0, reconnect_initial=0.05, reconnect_max=0.5,
    )
    base.update(overrides)
    return ImapSettings(**base)  # type: ignore[arg-type]


def client_for(server: Dovecot) -> IMAPClient:
    """A logged-in client acting as 'the outside world' (drops mail, inspects folders)."""
    c = IMAPClient(server.host, server.port, ssl=False, timeout=10)
    c.login(server.username, server.password)
    return c


def make_message(case_id: str | None, patient: str, note: str = "", body_size: int = 0) -> bytes:
    """A case message as a clinic would send it (CRLF, RFC 2047 for non-ASCII headers)."""
    msg = EmailMessage(policy=SMTP)
    msg["From"] = "records@clinic-a.example"
    msg["To"] = "intake@medvoyage.example"
    msg["Subject"] = (f"[{case_id}] " if case_id else "") + f"Records {note}".strip()
    msg["Message-ID"] = make_msgid(domain="clinic-a.example")
    msg["X-Patient"] = patient
    msg.set_content(f"Case notes {note}\n" + ("x" * 75 + "\n") * (body_size // 76))
    return msg.as_bytes()


def header(raw: bytes, name: str) -> str:
    value = BytesHeaderParser().parsebytes(raw).get(name, "")
    return str(make_header(decode_header(value)))


class MemoryHub:
    """A small real inbound path: a dict keyed by digest, threading by "[ID]" in the Subject.

    Idempotent like the hub's store: the same bytes ingested twice are stored once. Messages
    whose Subject contains a word in ``failing`` raise (as a decryption failure would); messages
    without a case id return None (accepted, not case mail).
    """

    def __init__(self) -> None:
        self.store: dict[str, bytes] = {}
        self.origins: list[str] = []
        self.ingested: list[bytes] = []  # every call, duplicates included
        self.failing: set[str] = set()
        self._lock = threading.Lock()

    def ingest(self, raw: bytes, origin: str) -> FiledResult | None:
        subject = header(raw, "Subject")
        with self._lock:
            self.origins.append(origin)
            self.ingested.append(raw)
            if any(word in subject for word in self.failing):
                raise RuntimeError("cannot decrypt this message")
            self.store.setdefault(hashlib.sha256(to_crlf(raw)).hexdigest(), raw)
        m = re.search(r"\[([A-Z]{2}-\d{4}-\d{4})\]", subject)
        if not m:
            return None
        return FiledResult(m.group(1), header(raw, "X-Patient"), PROTECTION + to_crlf(raw))

    def stored(self, subject_word: str) -> int:
        """How many stored messages have this word in their Subject."""
        with self._lock:
            return sum(1 for raw in self.store.values() if subject_word in header(raw, "Subject"))


class GatedHub(MemoryHub):
    """A MemoryHub that, the first time it ingests a message whose Subject has ``gate``, stops
    inside ingest until the test says so: the test can then cut the server at that exact point
    (after ingest, before the APPEND)."""

    def __init__(self, gate: str) -> None:
        super().__init__()
        self.gate = gate
        self.reached = threading.Event()
        self.proceed = threading.Event()

    def ingest(self, raw: bytes, origin: str) -> FiledResult | None:
        result = super().ingest(raw, origin)
        if self.gate in header(raw, "Subject") and not self.reached.is_set():
            self.reached.set()
            self.proceed.wait(30)
        return result


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    """Poll ``predicate`` until true; fail the test (with ``what``) after a generous timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or predicate}")


def folder_bodies(server: Dovecot, folder: str) -> list[bytes]:
    """Every message in ``folder`` as the server returns it (empty when the folder is missing)."""
    c = client_for(server)
    try:
        if not c.folder_exists(folder):
            return []
        c.select_folder(folder, readonly=True)
        uids = c.search("ALL")
        return [v[b"BODY[]"] for v in c.fetch(uids, ["BODY.PEEK[]"]).values()] if uids else []
    finally:
        c.logout()


def drop(server: Dovecot, *messages: bytes, folder: str = "INBOX",
         flags: tuple[bytes, ...] = ()) -> None:
    """Deliver messages into a folder as the outside world would (APPEND)."""
    c = client_for(server)
    try:
        for raw in messages:
            c.append(folder, raw, flags=flags)
    finally:
        c.logout()
