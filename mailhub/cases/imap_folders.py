"""Per-case IMAP folders: the name rule, and creating/filing into them on a live connection.

Coordinators read each case in their own mail client as a folder named
``<case_folder_prefix><server's hierarchy separator><case id> <patient name>``. The name is a
pure function of plain data; ``CaseFolders`` wraps one logged-in ``IMAPClient`` (not thread-safe,
one owner at a time) to create, subscribe and append, and to tell whether a copy is already
filed so that a retried filing never duplicates a message.
"""

from __future__ import annotations

import hashlib
import logging
import re
import unicodedata
from collections.abc import Iterable, Sequence
from datetime import datetime
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Any

from imapclient import IMAPClient, imap_utf7
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError

from mailhub.errors import MailhubError

log = logging.getLogger("mailhub.imap")

MAX_NAME_PART = 120  # characters, and bytes of the name as stored (modified UTF-7, RFC 3501)
# Characters that break IMAP LIST patterns or that servers refuse in a mailbox name
# (Dovecot's maildir refuses "/" whatever the separator).
_ALWAYS_UNSAFE = frozenset("/\\%*")
# Flags the server sets itself; APPEND refuses \Recent, and a filed copy is never \Deleted.
_SERVER_FLAGS = {b"\\recent", b"\\deleted"}


class CaseFolderError(MailhubError):
    """A case folder could not be created or written (the server's reply is in the message)."""


def _clean_part(text: str, separator: str | None, strict: bool = False) -> str:
    """One name component: no separator, no control or IMAP-wildcard characters, tidy spaces.

    ``strict`` keeps only letters, marks, digits, "-" and "_" (for servers whose storage refuses
    more, e.g. Dovecot's maildir refuses "." when the separator is "/").
    """
    unsafe = set(_ALWAYS_UNSAFE)
    if separator:
        unsafe.update(separator)
    out = []
    for ch in unicodedata.normalize("NFC", text):
        cat = unicodedata.category(ch)
        if ch in unsafe or cat in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co"):
            out.append(" ")
        elif strict and cat[0] not in "LMN" and ch not in "-_":
            out.append(" ")
        else:
            out.append(ch)
    cleaned = " ".join("".join(out).split())[:MAX_NAME_PART].rstrip()
    # servers store the encoded name (Dovecot's maildir: one file name of at most 255 bytes),
    # where a Chinese or Arabic letter takes about three bytes: cut by that length too
    while len(imap_utf7.encode(cleaned)) > MAX_NAME_PART:
        cleaned = cleaned[:-1].rstrip()
    return cleaned


def case_folder_name(
    prefix: str, separator: str | None, case_id: str, patient_name: str, *, strict: bool = False
) -> str:
    """``<prefix><separator><case id> <patient name>`` with the case part made safe.

    Separator, control and wildcard characters inside the case id or the patient name become
    spaces (runs of spaces collapse), so "J. Smith" under a "." separator is filed as "J Smith"
    rather than in a sub-folder "Smith". A server without hierarchy (separator None) gets
    ``<prefix> <case id> <patient name>``. The prefix is used as configured (it may itself name
    a nested folder with the server's separator). ``strict`` is the fallback spelling used when
    the server refuses the first one (only letters, digits, "-" and "_" kept in the case part).
    """
    case_part = _clean_part(case_id, separator, strict)
    if not case_part:
        raise CaseFolderError(f"case id {case_id!r} leaves nothing to name a folder with")
    name_part = _clean_part(patient_name or "", separator, strict)
    leaf = f"{case_part} {name_part}" if name_part else case_part
    prefix = prefix.strip()
    if not prefix:
        return leaf
    return f"{prefix}{separator}{leaf}" if separator else f"{prefix} {leaf}"


class _Refused(Exception):
    """The server said NO to CREATE (as opposed to a lost connection)."""

    def __init__(self, error: CaseFolderError) -> None:
        super().__init__(str(error))
        self.error = error


def to_crlf(raw: bytes) -> bytes:
    """Line endings as IMAP stores and returns them (CRLF), so sizes and digests compare."""
    return re.sub(rb"\r?\n", b"\r\n", raw)


def message_id_of(raw: bytes) -> str | None:
    """The Message-ID header as written (angle brackets kept), or None when absent."""
    try:
        headers = BytesHeaderParser(policy=compat32).parsebytes(raw, headersonly=True)
        value = headers.get("Message-ID")
    except Exception:  # malformed headers: treat as no Message-ID, never crash filing
        return None
    if value is None:
        return None
    text = " ".join(str(value).split())
    return text or None


def search_key(message_id: str) -> str:
    """The longest run of the Message-ID that is safe as an unquoted IMAP SEARCH atom.

    HEADER search matches substrings, and the candidates are compared byte for byte anyway,
    so narrowing by a safe part loses nothing and avoids quoting rules imapclient lacks.
    """
    runs = re.findall(r"[A-Za-z0-9.@<>_+=$#!&'~^`|/?:;,-]+", message_id)
    return max(runs, key=len) if runs else ""


def copy_flags(flags: Iterable[bytes | str]) -> tuple[bytes, ...]:
    """The flags worth carrying to a filed copy (server-managed ones dropped)."""
    out = []
    for f in flags:
        b = f.encode() if isinstance(f, str) else bytes(f)
        if b.lower() not in _SERVER_FLAGS:
            out.append(b)
    return tuple(out)


def _reraise_abort(exc: IMAPClientError) -> None:
    """A lost connection is not a refusal: let it reach the reconnect logic unchanged."""
    if isinstance(exc, IMAPClientAbortError):
        raise exc


def _as_str(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


_SIZE_AND_ID = ["RFC822.SIZE", "BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"]


def _size_and_id(fetched: dict[int, dict[bytes, Any]]) -> dict[int, tuple[int, bytes]]:
    """uid -> (size, Message-ID line as stored): equal for two copies of one message."""
    out = {}
    for uid, item in fetched.items():
        head = next((v for k, v in item.items() if k.startswith(b"BODY[HEADER")), b"")
        out[uid] = (int(item.get(b"RFC822.SIZE", -1)), bytes(head or b"").strip())
    return out


def _digests(fetched: dict[int, dict[bytes, Any]]) -> dict[int, bytes]:
    """uid -> sha256 of the message as fetched whole (``BODY[]``), CRLF line endings."""
    return {uid: hashlib.sha256(to_crlf(item[b"BODY[]"])).digest()
            for uid, item in fetched.items() if item.get(b"BODY[]") is not None}


class CaseFolders:
    """Create and fill case folders over one logged-in IMAPClient (used by one thread)."""

    def __init__(self, client: IMAPClient, prefix: str = "Cases") -> None:
        self.client = client
        self.prefix = prefix
        self._separator: str | None = None
        self._ns_prefix: str | None = None
        self._known: set[str] = set()
        self._resolved: dict[str, str] = {}  # preferred name -> name actually in use

    # -- the server's hierarchy ----------------------------------------------------------------
    def _discover(self) -> None:
        sep: str | None = None
        ns_prefix = ""
        if self.client.has_capability("NAMESPACE"):
            personal = self.client.namespace().personal or ()
            if personal:
                ns_prefix = _as_str(personal[0][0]) or ""
                sep = _as_str(personal[0][1])
        if sep is None:
            listed = self.client.list_folders("", "")
            if listed:
                sep = _as_str(listed[0][1])
        self._separator = sep or None
        self._ns_prefix = ns_prefix

    @property
    def separator(self) -> str | None:
        """The hierarchy separator of the personal namespace, as the server reports it."""
        if self._ns_prefix is None:
            self._discover()
        return self._separator

    def folder_for(self, case_id: str, patient_name: str, *, strict: bool = False) -> str:
        """The full folder name, inside the personal namespace (e.g. "INBOX." on Courier)."""
        sep = self.separator
        name = case_folder_name(self.prefix, sep, case_id, patient_name, strict=strict)
        ns = self._ns_prefix or ""
        if ns and not name.startswith(ns) and name.upper() != "INBOX":
            name = ns + name
        return name

    # -- creating ------------------------------------------------------------------------------
    def ensure(self, case_id: str, patient_name: str) -> str:
        """The case's folder name, creating and subscribing it (and its parent) when missing.

        When the server refuses the name (its storage forbids a character), the strict spelling
        is used instead; the choice is deterministic, so a case always lands in one folder.
        """
        folder = self.folder_for(case_id, patient_name)
        if folder in self._resolved:
            return self._resolved[folder]
        sep = self.separator
        try:
            if sep and sep in folder:
                self._create(folder.rsplit(sep, 1)[0])
        except _Refused as exc:
            raise exc.error from None
        try:
            self._create(folder)
            actual = folder
        except _Refused as exc:
            actual = self.folder_for(case_id, patient_name, strict=True)
            if actual == folder:
                raise exc.error from None
            log.info("IMAP server refused folder %r (%s); using %r", folder, exc.error, actual)
            try:
                self._create(actual)
            except _Refused as again:
                raise again.error from None
        self._resolved[folder] = actual
        return actual

    def _create(self, folder: str) -> None:
        if folder in self._known:
            return
        try:
            if not self.client.folder_exists(folder):
                try:
                    self.client.create_folder(folder)
                    log.info("created IMAP folder %r", folder)
                except IMAPClientError as exc:
                    _reraise_abort(exc)
                    # Another instance may have created it meanwhile: only that is fine.
                    if not self.client.folder_exists(folder):
                        raise _Refused(CaseFolderError(
                            f"the IMAP server refused to create folder {folder!r}: {exc}",
                            hint="check the mailbox's quota and permissions, or change "
                            "[imap].case_folder_prefix",
                        )) from exc
            self.client.subscribe_folder(folder)
        except IMAPClientError as exc:
            _reraise_abort(exc)
            raise CaseFolderError(f"cannot prepare IMAP folder {folder!r}: {exc}") from exc
        self._known.add(folder)

    # -- merged cases --------------------------------------------------------------------------
    def listed(self) -> dict[str, list[str]]:
        """Case id -> its folders, for every case folder the server lists under the prefix (the
        id is the leaf's first word, as ``case_folder_name`` writes it). A case has two when
        its patient was renamed: the old name's folder and the new one."""
        sample = self.folder_for("X", "")
        sep = self.separator
        parent, joint = (sample.rsplit(sep, 1)[0], sep) if sep and sep in sample else (
            sample[:-2], " ")
        try:
            found = self.client.list_folders("", f"{parent}{joint}%")
        except IMAPClientError as exc:
            _reraise_abort(exc)
            raise CaseFolderError(f"cannot list IMAP folders under {parent!r}: {exc}") from exc
        out: dict[str, list[str]] = {}
        for _flags, _sep, name in found:
            name = _as_str(name) or ""
            leaf = name[len(parent) + len(joint):]
            if name.startswith(parent + joint) and leaf:
                out.setdefault(leaf.split(" ", 1)[0], []).append(name)
        return {case_id: sorted(names) for case_id, names in out.items()}

    def move_all(self, source: str, target: str) -> int:
        """Move every message of ``source`` into ``target`` (flags and dates kept), then delete
        ``source`` once it is empty; how many moved.

        Without MOVE (RFC 6851): COPY, then delete. A crash between the two leaves the copies in
        ``target`` and the originals in ``source``, so before copying, the messages whose exact
        bytes are already in ``target`` are left out: the next look finishes the move and
        nothing is filed twice."""
        try:
            self.client.select_folder(source)
            uids = self.client.search("ALL")
            if uids and self.client.has_capability("MOVE"):
                self.client.move(uids, target)
            elif uids:
                fresh = self._not_yet_in(target, source, uids)
                if fresh:
                    self.client.copy(fresh, target)
                self.client.delete_messages(uids)
                self.client.expunge()
            self.client.close_folder()  # nothing is left flagged \\Deleted to expunge
            if not self.client.folder_status(source, [b"MESSAGES"]).get(b"MESSAGES"):
                self.client.unsubscribe_folder(source)
                self.client.delete_folder(source)
                self._known.discard(source)
        except IMAPClientError as exc:
            _reraise_abort(exc)
            raise CaseFolderError(f"cannot move {source!r} into {target!r}: {exc}") from exc
        return len(uids)

    def _not_yet_in(self, target: str, source: str, uids: list[int]) -> list[int]:
        """The ``uids`` of ``source`` (selected) whose bytes are not in ``target``; ``source`` is
        selected again on return. Narrowed by size and Message-ID line, then compared by
        digest, so only candidates are fetched whole."""
        mine = _size_and_id(self.client.fetch(uids, _SIZE_AND_ID))
        self.client.select_folder(target, readonly=True)
        theirs = _size_and_id(self.client.fetch(self.client.search("ALL"), _SIZE_AND_ID))
        shared = set(mine.values()) & set(theirs.values())
        present: set[bytes] = set()
        if shared:
            present = set(_digests(self.client.fetch(
                [uid for uid, key in theirs.items() if key in shared], ["BODY.PEEK[]"])).values())
        self.client.select_folder(source)
        if not shared:
            return list(uids)
        already = {uid for uid, digest in _digests(self.client.fetch(
            [uid for uid, key in mine.items() if key in shared], ["BODY.PEEK[]"])).items()
            if digest in present}
        if already:
            log.info("%d message(s) of %r already in %r (an interrupted move): not copied again",
                     len(already), source, target)
        return [uid for uid in uids if uid not in already]

    # -- filing --------------------------------------------------------------------------------
    def append(
        self,
        folder: str,
        raw: bytes,
        flags: Sequence[bytes | str] = (),
        when: datetime | None = None,
    ) -> None:
        """APPEND one message (CRLF line endings) with the given flags and internal date."""
        try:
            self.client.append(folder, to_crlf(raw), flags=copy_flags(flags), msg_time=when)
        except IMAPClientError as exc:
            _reraise_abort(exc)
            raise CaseFolderError(f"the IMAP server refused to file into {folder!r}: {exc}") from exc

    def contains(self, folder: str, raw: bytes) -> bool:
        """Whether exactly these bytes are already filed in ``folder``.

        SEARCH HEADER Message-ID (or, without one, messages lacking the header) narrowed to the
        same size, then the candidates' bodies compared: a different message that reuses the
        Message-ID is still filed, a retried filing of the same one is not.
        """
        data = to_crlf(raw)
        size = len(data)
        mid = message_id_of(raw)
        criteria: list[Any] = []
        if mid is None:
            criteria = ["NOT", "HEADER", "Message-ID", ""]
        elif key := search_key(mid):
            criteria = ["HEADER", "Message-ID", key]
        criteria += ["LARGER", size - 1, "SMALLER", size + 1]
        digest = hashlib.sha256(data).digest()
        try:
            self.client.select_folder(folder, readonly=True)
            uids = self.client.search(criteria)
            if not uids:
                return False
            fetched = self.client.fetch(uids, ["BODY.PEEK[]"])
        except IMAPClientError as exc:
            _reraise_abort(exc)
            raise CaseFolderError(f"cannot search IMAP folder {folder!r}: {exc}") from exc
        return digest in _digests(fetched).values()

    def file(
        self,
        case_id: str,
        patient_name: str,
        raw: bytes,
        flags: Sequence[bytes | str] = (),
        when: datetime | None = None,
    ) -> tuple[str, bool]:
        """Ensure the folder and append unless already there; (folder, appended?)."""
        folder = self.ensure(case_id, patient_name)
        if self.contains(folder, raw):
            log.info("message already filed in %r, not appended again", folder)
            return folder, False
        self.append(folder, raw, flags=flags, when=when)
        return folder, True
