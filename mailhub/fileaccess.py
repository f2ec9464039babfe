"""Files and folders that users name (arguments, config paths): OS errors become clear messages.

Python reports a missing file, a folder where a file was expected, or a permission problem as
an ``OSError``; left alone it reaches the CLI as "internal error". These helpers turn it into a
``MailhubError`` (or a subclass the caller chooses) that names the path and says what failed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mailhub.errors import FileAccessError, MailhubError

StrPath = str | os.PathLike[str]


def reason(exc: OSError) -> str:
    """The operating system's words for ``exc`` ("No such file or directory"), lower-cased."""
    text = exc.strerror or str(exc)
    return text[:1].lower() + text[1:]


def _hint(exc: OSError) -> str | None:
    """What to do about ``exc``, where the reason alone does not say it."""
    if isinstance(exc, PermissionError):
        return "check the owner and permissions of the file and its folders"
    return None


def read_user_bytes(path: StrPath, what: str = "file",
                    error: type[MailhubError] = FileAccessError) -> bytes:
    """Read a file a user named; anything that stops it is an ``error`` naming the path."""
    p = Path(path)
    if p.is_dir():
        raise error(f"cannot read {what} {p}: it is a folder, not a file")
    try:
        return p.read_bytes()
    except OSError as exc:
        raise error(f"cannot read {what} {p}: {reason(exc)}", hint=_hint(exc)) from exc


def read_user_text(path: StrPath, what: str = "file",
                   error: type[MailhubError] = FileAccessError) -> str:
    """As ``read_user_bytes``, decoded as UTF-8 (other encodings are an ``error`` too)."""
    data = read_user_bytes(path, what, error)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} {path} is not UTF-8 text") from exc


@contextmanager
def user_paths(doing: str, path: StrPath | None = None,
               error: type[MailhubError] = FileAccessError) -> Iterator[None]:
    """Turn an ``OSError`` about a file inside the block into ``error``.

    With ``path`` (the block is about that one path: any OS error, a full disk too) the message
    is "cannot <doing> <path>: <reason>"; without it, "cannot <doing>: <the failing file>:
    <reason>", and OS errors that name no file (sockets, ...) pass through unchanged: they are
    not about a path the user chose.
    """
    try:
        yield
    except OSError as exc:
        if exc.filename is None and path is None:
            raise
        name = exc.filename
        shown = os.fsdecode(name) if isinstance(name, str | bytes | os.PathLike) else str(name)
        where = f" {path}" if path is not None else f": {shown}"
        raise error(f"cannot {doing}{where}: {reason(exc)}", hint=_hint(exc)) from exc
