"""The database: one engine per process, SQLite (WAL, synchronous=FULL) or PostgreSQL.

The schema is owned by alembic migrations (``mailhub/store/migrations``): ``migrate`` upgrades
an existing database in place; nothing is ever dropped and re-created.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import Session, create_engine

from mailhub.errors import ConfigError, StoreError

log = logging.getLogger("mailhub.store")

MIGRATIONS = Path(__file__).with_name("migrations")


WAL_SIZE_LIMIT = 64 << 20  # bytes of SQLite write-ahead log kept after a checkpoint
PAGE_SIZE = 16384  # bytes of an SQLite page in a database this hub creates


def _private_file(path: Path) -> None:
    """Create the SQLite file 0600 before SQLite does (it would use 0644, and its -wal and -shm
    files copy the database's mode): it holds patients' names and addresses and the password
    hashes in the clear, and ``data_dir`` may be an existing, world-readable folder."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        if path.stat().st_mode & 0o077:
            log.warning("database %s is readable by others (mode %o); chmod 600 it and its "
                        "-wal and -shm files", path, path.stat().st_mode & 0o777)


def masked_url(url: str) -> str:
    """A database URL fit for terminals and logs: its password, if any, shown as ``***``."""
    head, at, rest = url.rpartition("@")
    if not at:
        return url
    scheme, slashes, userinfo = head.rpartition("://")
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}{slashes}{user}{':***' if colon else ''}@{rest}"


def check_database_url(url: str) -> str:
    """``url`` when SQLAlchemy can use it; the error names it without its password."""
    if not url:
        return url
    hint = 'leave it empty for SQLite, or use "postgresql+psycopg://user:password@host/db"'
    if not re.match(r"^(sqlite|postgresql)(\+\w+)?://", url):
        raise ConfigError(f"[hub].database_url = {masked_url(url)!r} is not supported", hint=hint)
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        make_url(url).port  # noqa: B018 - a port that is not a number fails only here
    except (ArgumentError, ValueError):
        raise ConfigError(f"[hub].database_url = {masked_url(url)!r} is not a database URL",
                          hint=hint) from None
    return url


def make_engine(url: str, *, pool_size: int = 8) -> Engine:
    """Create the engine; SQLite gets WAL, full fsync on commit and a generous busy timeout."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            _private_file(Path(path))
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            # 16 KiB pages (SQLite's default is 4 KiB): a 270 KB queue payload is 17 pages
            # instead of 68, written to the WAL and copied by the checkpoint with a quarter of
            # the per-page work (0.3-0.5 ms less of the main process's CPU for a 200 KiB
            # OpenPGP message; a 4 KiB message's commits cost the same). Only a new, empty
            # database takes it; an existing one keeps the page size it was created with.
            cur.execute(f"PRAGMA page_size={PAGE_SIZE}")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            # the queue reads back each payload it wrote moments ago (200 KB are 50 pages): a
            # page cache that holds a batch of them saves a pread per page (default: 2 MiB)
            cur.execute("PRAGMA cache_size=-32768")
            # a freed page is not zeroed when that would cost a write of its own: the payload
            # sweep frees about 70 pages a 200 KiB message, and zeroing them wrote as much to
            # the WAL (and again at the checkpoint) as the messages had. What is stored is
            # sealed with the at-rest key anyway (Debian's SQLite defaults to ON).
            cur.execute("PRAGMA secure_delete=FAST")
            # a burst of 200 KiB messages grows the WAL to hundreds of MB; without a limit the
            # file keeps that size for ever (it is reused, never shrunk). Once a checkpoint has
            # emptied it, it is cut back to this size when writing starts over.
            cur.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            cur.close()

        return engine
    return create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)


def _alembic_config(engine: Engine):  # type: ignore[no-untyped-def]
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def migrate(engine: Engine) -> None:
    """Bring the schema up to date (creates it on an empty database)."""
    from alembic import command

    try:
        command.upgrade(_alembic_config(engine), "head")
    except Exception as exc:  # alembic raises many types; the CLI needs one
        raise StoreError(f"database migration failed: {driver_words(exc, engine)}",
                         hint="check [hub].database_url and that the database is reachable") from exc


def driver_words(exc: BaseException, engine: Engine) -> str:
    """A database error on one line, in the driver's words (the error line is one line, not
    SQLAlchemy's statement dump and "Background on this error" link), never with a password."""
    text = " ".join(str(getattr(exc, "orig", None) or exc).split())
    password = engine.url.password
    return text.replace(str(password), "***") if password else text


def schema_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except Exception:
            session.rollback()
            raise
