"""IMAP ingest: watch mailboxes, hand each new message to the hub, file it into its case folder.

Order per message, so that nothing is lost and nothing is filed twice: FETCH (BODY.PEEK[]) →
``ingest`` (the hub's inbound path; idempotent, its store dedupes by digest) → APPEND to the case
folder unless that exact copy is already there → STORE \\Deleted + UID EXPUNGE in the watched
folder. A crash anywhere in between only repeats idempotent steps on the next pass.

The watcher runs in its own thread (imapclient blocks), waits with IDLE when the server offers it
and polls otherwise, and reconnects with exponential backoff after any connection loss. A message
whose ingest fails stays where it is and is retried later with its own backoff; a message the hub
accepts but does not file (``ingest`` returns None) stays too, marked with a keyword so it is not
taken again.
"""

from __future__ import annotations

import logging
import select
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any
from urllib.parse import quote

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError

from mailhub.cases.folder_merge import MergeFollower
from mailhub.cases.imap_folders import CaseFolders, copy_flags
from mailhub.errors import MailhubError
from mailhub.ingress.imap_session import (
    Backoff,
    ImapConnectError,
    ImapSettings,
    close_quietly,
    connect,
    file_copy,
)

__all__ = [
    "Backoff", "ConnectionLost", "FiledResult", "ImapConnectError", "ImapSettings",
    "ImapWatcher", "IngestFn", "RetryMemo", "UNFILED_KEYWORD", "WatchStats", "connect",
    "file_copy",
]

log = logging.getLogger("mailhub.imap")

UNFILED_KEYWORD = "$MailhubUnfiled"
FIRST_IDLE_ROUND = 1.0  # seconds; see ImapWatcher._wait


class ConnectionLost(MailhubError):
    """The server closed the connection (restart, idle timeout, network cut)."""


@dataclass(frozen=True)
class FiledResult:
    """What the hub's inbound path says about one message: its case, and the copy to file."""

    case_id: str
    patient_name: str
    filed_bytes: bytes | None = None  # e.g. decrypted, with Mailhub-Protection; None: the original


# ingest(raw, origin): origin names the message as an RFC 5092 IMAP URL,
# "imap://intake%40medvoyage.example@host:143/INBOX;UIDVALIDITY=7/;UID=42" (for the audit log).
# It may raise (the message stays, retried later) and must be idempotent.
IngestFn = Callable[[bytes, str], FiledResult | None]


@dataclass
class WatchStats:
    """Counters since start (for logs, tests and a status command)."""

    ingested: int = 0
    filed: int = 0
    already_filed: int = 0
    unfiled: int = 0
    failed: int = 0
    deferred: int = 0
    reconnects: int = 0
    passes: int = 0  # completed passes over all watched folders


class RetryMemo:
    """Messages whose ingest failed, keyed (folder, UIDVALIDITY, UID), each with its own backoff.

    Keeps a failing message from being retried on every IDLE wake-up while still retrying it.
    """

    def __init__(self, initial: float, maximum: float, clock: Callable[[], float]) -> None:
        self.initial = initial
        self.maximum = maximum
        self.clock = clock
        self._due: dict[tuple[str, int, int], tuple[float, float]] = {}

    def ready(self, key: tuple[str, int, int]) -> bool:
        entry = self._due.get(key)
        return entry is None or self.clock() >= entry[0]

    def failed(self, key: tuple[str, int, int]) -> float:
        """Record a failure; return the delay before the next attempt."""
        prev = self._due.get(key)
        delay = self.initial if prev is None else min(prev[1] * 2, self.maximum)
        self._due[key] = (self.clock() + delay, delay)
        return delay

    def forget(self, key: tuple[str, int, int]) -> None:
        self._due.pop(key, None)

    def prune(self, folder: str, uidvalidity: int) -> None:
        """Drop entries of ``folder`` from an older UIDVALIDITY (those UIDs mean nothing now)."""
        for key in [k for k in self._due if k[0] == folder and k[1] != uidvalidity]:
            del self._due[key]

    def __len__(self) -> int:
        return len(self._due)


class ImapWatcher:
    """Watches ``settings.watch`` and files each message via ``ingest``; see the module doc."""

    def __init__(
        self,
        settings: ImapSettings,
        ingest: IngestFn,
        *,
        clock: Callable[[], float] = time.monotonic,
        follow_merges: MergeFollower | None = None,
    ) -> None:
        self.settings = settings
        self._ingest = ingest
        self.follow_merges = follow_merges  # merged cases' folders move after them
        self._memo = RetryMemo(settings.retry_failed_initial, settings.retry_failed_max, clock)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._unexpunged: dict[tuple[str, int], set[int]] = {}
        self._uidnext: dict[str, int | None] = {}  # per watched folder, as of its last pass
        self.stats = WatchStats()
        self.idling = threading.Event()  # set while waiting in IDLE (status, tests)

    # -- public life cycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Run in a daemon thread until ``stop()``."""
        if self._thread and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="mailhub-imap", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the message in hand, leave IDLE, log out; wait for the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def run_once(self) -> WatchStats:
        """One pass over every watched folder on a fresh connection (tests, cron-style use)."""
        with self._lock:
            before = replace(self.stats)
            client = connect(self.settings)
            try:
                self._pass(client, CaseFolders(client, self.settings.case_folder_prefix))
            finally:
                close_quietly(client)
            return WatchStats(**{k: getattr(self.stats, k) - getattr(before, k)
                                 for k in vars(before)})

    def file_copy(self, case_id: str, patient_name: str, raw: bytes,
                  flags: Sequence[bytes | str] = (), when: datetime | None = None) -> str:
        """``file_copy`` with this watcher's settings (a connection of its own)."""
        return file_copy(self.settings, case_id, patient_name, raw, flags, when)

    # -- the thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        s = self.settings
        backoff = Backoff(s.reconnect_initial, s.reconnect_max)
        while not self._stop.is_set():
            client: IMAPClient | None = None
            try:
                client = connect(s)
                folders = CaseFolders(client, s.case_folder_prefix)
                while not self._stop.is_set():
                    with self._lock:
                        self._pass(client, folders)
                    backoff.reset()  # only after a whole pass: a poison pass still backs off
                    self._wait(client)
            except Exception as exc:  # the thread must survive anything and retry
                if self._stop.is_set():
                    break
                delay = backoff.next()
                self.stats.reconnects += 1
                expected = isinstance(exc, OSError | EOFError | IMAPClientError | MailhubError)
                log.warning("IMAP %s:%d: %s; reconnecting in %.1f s",
                            s.host, s.port, exc, delay, exc_info=not expected)
                self._stop.wait(delay)
            finally:
                self.idling.clear()
                close_quietly(client)

    def _wait(self, client: IMAPClient) -> None:
        """Until something may have arrived: IDLE on the first watched folder, else sleep."""
        s = self.settings
        opened = [f for f in s.watch if f in self._uidnext]  # those the last pass could open
        if not opened or not client.has_capability("IDLE"):
            self._stop.wait(s.poll_interval)
            return
        limit = s.idle_renew if len(s.watch) == 1 else min(s.idle_renew, s.poll_interval)
        # Mail that arrived during the pass would never be announced by IDLE: UIDNEXT tells.
        info = client.select_folder(opened[0], readonly=True)
        if info.get(b"UIDNEXT") != self._uidnext.get(opened[0]):
            return
        for other in opened[1:]:
            status = client.folder_status(other, [b"UIDNEXT"])
            if status.get(b"UIDNEXT") != self._uidnext.get(other):
                return
        deadline = time.monotonic() + limit
        # A short first round: an EXISTS sent together with IDLE's "+" may sit unread in
        # imaplib's buffer (select() cannot see it); DONE reads it.
        round_length = FIRST_IDLE_ROUND
        while not self._stop.is_set() and time.monotonic() < deadline:
            if self._idle_round(client, min(deadline, time.monotonic() + round_length)):
                return
            round_length = limit

    def _idle_round(self, client: IMAPClient, until: float) -> bool:
        """One IDLE ... DONE; True when the server announced new mail."""
        client.idle()
        self.idling.set()
        woke = False
        while not woke and not self._stop.is_set() and time.monotonic() < until:
            if _buffered(client):
                break  # already received with an earlier line: DONE below reads it
            if not _readable(client, 0.5):
                continue
            responses = client.idle_check(timeout=0)
            if not responses or any(r and r[0] == b"BYE" for r in responses):
                raise ConnectionLost("the IMAP server closed the connection during IDLE")
            woke = _announces_mail(responses)
        self.idling.clear()
        _text, responses = client.idle_done()
        return woke or _announces_mail(responses)

    # -- one pass ------------------------------------------------------------------------------
    def _pass(self, client: IMAPClient, folders: CaseFolders) -> None:
        for folder in self.settings.watch:
            if self._stop.is_set():
                return
            self._pass_folder(client, folders, folder)
        if self.follow_merges is not None:
            self.follow_merges.maybe_run(folders)
        self.stats.passes += 1

    def _pass_folder(self, client: IMAPClient, folders: CaseFolders, folder: str) -> None:
        try:
            info = client.select_folder(folder)
        except IMAPClientError as exc:
            if isinstance(exc, IMAPClientAbortError):
                raise
            log.warning("cannot open watched folder %r: %s (check [imap].watch)", folder, exc)
            self._uidnext.pop(folder, None)
            return
        uidvalidity = _uidvalidity(info)
        self._uidnext[folder] = info.get(b"UIDNEXT")
        self._memo.prune(folder, uidvalidity)
        # Filed but not yet expunged (no UIDPLUS): skipped until a plain EXPUNGE is safe.
        waiting = self._unexpunged.setdefault((folder, uidvalidity), set())
        # \Deleted ones included: a crash between STORE and EXPUNGE must still finish them.
        uids = sorted(client.search(["UNKEYWORD", UNFILED_KEYWORD]))
        waiting.intersection_update(uids)
        for uid in uids:
            if self._stop.is_set():
                return
            key = (folder, uidvalidity, uid)
            if uid in waiting:
                continue
            if not self._memo.ready(key):
                self.stats.deferred += 1
                continue
            if self._one(client, folders, folder, uidvalidity, uid):
                client.add_flags([uid], [rb"\Deleted"], silent=True)
                if client.has_capability("UIDPLUS"):
                    client.uid_expunge([uid])
                else:
                    waiting.add(uid)
        if waiting:
            self._expunge_if_safe(client, folder, waiting)

    def _expunge_if_safe(self, client: IMAPClient, folder: str, waiting: set[int]) -> None:
        r"""Without UIDPLUS, EXPUNGE removes every \Deleted message: only run it when all of
        them are filed (or marked unfiled), so a deleted-but-unfiled message is never lost."""
        pending = set(client.search(["DELETED", "UNKEYWORD", UNFILED_KEYWORD]))
        if pending <= waiting:
            client.expunge()
            waiting.clear()
        else:
            log.info("%s: not expunging yet, %d deleted message(s) not filed", folder,
                     len(pending - waiting))

    def _one(self, client: IMAPClient, folders: CaseFolders, folder: str,
             uidvalidity: int, uid: int) -> bool:
        """Ingest and file one message; True when it is filed and may leave the folder."""
        key = (folder, uidvalidity, uid)
        if _uidvalidity(client.select_folder(folder)) != uidvalidity:
            raise ConnectionLost(f"UIDVALIDITY of {folder!r} changed during the pass")
        item = client.fetch([uid], ["BODY.PEEK[]", "FLAGS", "INTERNALDATE"]).get(uid)
        if not item or b"BODY[]" not in item:
            return False  # expunged by someone else meanwhile
        raw = bytes(item[b"BODY[]"])
        s = self.settings
        origin = (f"imap://{quote(s.username, safe='')}@{s.host}:{s.port}/"
                  f"{quote(folder)};UIDVALIDITY={uidvalidity}/;UID={uid}")
        try:
            result = self._ingest(raw, origin)
        except Exception as exc:  # one bad message must not stop the others
            delay = self._memo.failed(key)
            self.stats.failed += 1
            log.warning("ingest of %s UID %d (UIDVALIDITY %d) failed: %s: %s; left in place, "
                        "retry in %.0f s", folder, uid, uidvalidity, type(exc).__name__, exc, delay)
            return False
        self.stats.ingested += 1
        if result is None:
            client.add_flags([uid], [UNFILED_KEYWORD], silent=True)
            self.stats.unfiled += 1
            self._memo.forget(key)
            log.info("%s UID %d accepted without a case: left in place, marked %s",
                     folder, uid, UNFILED_KEYWORD)
            return False
        copy = result.filed_bytes if result.filed_bytes is not None else raw
        try:
            target, appended = folders.file(
                result.case_id, result.patient_name, copy,
                flags=copy_flags(item.get(b"FLAGS", ())), when=item.get(b"INTERNALDATE"))
        except MailhubError as exc:  # the server refused the folder or the APPEND
            delay = self._memo.failed(key)
            self.stats.failed += 1
            log.warning("filing %s UID %d failed: %s; left in place, retry in %.0f s",
                        folder, uid, exc, delay)
            return False
        if appended:
            self.stats.filed += 1
        else:
            self.stats.already_filed += 1
        if _uidvalidity(client.select_folder(folder)) != uidvalidity:
            raise ConnectionLost(f"UIDVALIDITY of {folder!r} changed during the pass")
        self._memo.forget(key)
        log.info("%s UID %d filed into %r for case %s", folder, uid, target, result.case_id)
        return True


def _announces_mail(responses: list[Any]) -> bool:
    return any(isinstance(r, tuple) and len(r) > 1 and r[1] in (b"EXISTS", b"RECENT")
               for r in responses)


def _uidvalidity(select_response: dict[bytes, Any]) -> int:
    return int(select_response.get(b"UIDVALIDITY", 0))


def _readable(client: IMAPClient, timeout: float) -> bool:
    """Whether the server has sent something (TLS may hold decrypted bytes already)."""
    sock = client.socket()
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    ready, _, _ = select.select([sock], [], [], timeout)
    return bool(ready)


def _buffered(client: IMAPClient) -> bool:
    """Whether imaplib's reader already holds unread server bytes (select() cannot see them).

    Reads imaplib's buffered file (not a public API: without it, the short first IDLE round
    still bounds the delay).
    """
    reader = getattr(getattr(client, "_imap", None), "file", None)
    peek = getattr(reader, "peek", None)
    if peek is None:
        return False
    sock = client.socket()
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        return bool(peek(1))
    except (BlockingIOError, ssl.SSLWantReadError, InterruptedError):
        return False
    finally:
        sock.settimeout(timeout)
