"""Helpers for the case-store tests: a real hub instance on SQLite or a real PostgreSQL.

``make_instance_dir`` writes what ``mailhub init`` writes minus the slow key generation that
these tests do not need: config.toml (from config.example.toml), the default rules/ and
templates/, and a fresh at-rest key. ``Hub`` over it is the real one.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlmodel import Session

from mailhub.app import Hub
from mailhub.config import load_config
from mailhub.crypto.atrest import generate_atrest_key
from mailhub.store.db import make_engine, migrate
from tests.pgserver import session_server

REPO = Path(__file__).resolve().parents[2]
HUB_DOMAIN = "medvoyage.example"
PATIENT = "ana.silva@patient.example"
CLINIC = "dr.kaya@clinic-a.example"
COORD = "lena@medvoyage.example"
INTAKE = "intake@medvoyage.example"

_templates: dict[str, str] = {}  # session-wide parts made once: template db, shared folder
_PG_DATABASE = "mh_cases"


def make_instance_dir(root: Path, database_url: str = "", *, shared: Path | None = None) -> Path:
    """A working instance folder; returns its config.toml.

    With ``shared`` (a folder from ``shared_parts``) the rules, templates and at-rest key are
    used from there instead of being copied and generated for this instance.
    """
    root.mkdir(parents=True, exist_ok=True)
    text = (REPO / "config.example.toml").read_text(encoding="utf-8")
    if database_url:
        text = re.sub(r'^database_url = ""', f'database_url = "{database_url}"', text,
                      count=1, flags=re.M)
    if shared is not None:
        for key in ("keys_dir", "rules_dir", "templates_dir"):
            folder = shared / key.removesuffix("_dir")
            text = re.sub(rf'^{key} = ".*"', f'{key} = "{folder}"', text, count=1, flags=re.M)
    cfg = root / "config.toml"
    cfg.write_text(text, encoding="utf-8")
    if shared is None:
        shutil.copytree(REPO / "rules", root / "rules")
        shutil.copytree(REPO / "templates", root / "templates")
        generate_atrest_key(root / "keys" / "atrest.key")
    return cfg


def shared_parts(config: pytest.Config) -> Path:
    """Rules, templates and an at-rest key made once per session (read-only for tests)."""
    if "shared" not in _templates:
        folder = Path(tempfile.mkdtemp(prefix="mhsh", dir="/tmp"))
        shutil.copytree(REPO / "rules", folder / "rules")
        shutil.copytree(REPO / "templates", folder / "templates")
        generate_atrest_key(folder / "keys" / "atrest.key")
        config.add_cleanup(lambda: shutil.rmtree(folder, ignore_errors=True))
        _templates["shared"] = str(folder)
    return Path(_templates["shared"])


def make_hub(root: Path, database_url: str = "", *, migrate: bool = True,
             shared: Path | None = None) -> Hub:
    hub = Hub(load_config(make_instance_dir(root, database_url, shared=shared)))
    if migrate:
        hub.migrate()
    return hub




def _sqlite_template(config: pytest.Config) -> Path:
    """A migrated SQLite database made once per session; tests start from a copy."""
    if "sqlite" not in _templates:
        folder = Path(tempfile.mkdtemp(prefix="mhtpl", dir="/tmp"))
        engine = make_engine(f"sqlite:///{folder / 'mailhub.db'}")
        migrate(engine)
        engine.dispose()  # the last connection checkpoints the WAL into the file
        config.add_cleanup(lambda: shutil.rmtree(folder, ignore_errors=True))
        _templates["sqlite"] = str(folder / "mailhub.db")
    return Path(_templates["sqlite"])


def _pg_database(config: pytest.Config) -> str:
    """The session's migrated case-store database, emptied (TRUNCATE is far cheaper than
    creating a database per test)."""
    server = session_server(config)
    key = f"pg:{server.port}"
    if key not in _templates:
        engine = make_engine(server.create_database(_PG_DATABASE))
        migrate(engine)
        engine.dispose()
        _templates[key] = server.url(_PG_DATABASE)
    url = _templates[key]
    engine = make_engine(url)
    with engine.begin() as conn:
        tables = conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                                   "AND tablename <> 'alembic_version'")).scalars().all()
        if tables:
            names = ", ".join(f'"{t}"' for t in tables)
            conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    engine.dispose()
    return url


@pytest.fixture(name="hub", params=["sqlite", "postgresql"])
def hub_fixture(request: pytest.FixtureRequest) -> Iterator[Hub]:
    """A real hub with an empty, migrated database: SQLite in data_dir, or PostgreSQL."""
    root = Path(tempfile.mkdtemp(prefix="mhc", dir="/tmp"))
    url = _pg_database(request.config) if request.param == "postgresql" else ""
    h = make_hub(root, url, migrate=False, shared=shared_parts(request.config))
    if not url:
        h.config.hub.data_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_sqlite_template(request.config), h.config.hub.data_dir / "mailhub.db")
    try:
        yield h
    finally:
        h.engine.dispose()
        shutil.rmtree(root, ignore_errors=True)


def session(hub: Hub) -> Session:
    return Session(hub.engine, expire_on_commit=False)


def mail(*, msgid: str | None = "<m1@patient.example>", frm: str = PATIENT,
         to: Sequence[str] = (INTAKE,), subject: str = "Hello", body: str = "Hi there.",
         refs: Sequence[str] = (), irt: Sequence[str] = (), extra: Sequence[str] = (),
         name: str = "Ana Silva") -> bytes:
    """A plain RFC 5322 message with CRLF line ends."""
    lines = [*extra, f"From: {name} <{frm}>" if name else f"From: {frm}",
             f"To: {', '.join(to)}", f"Subject: {subject}",
             "Date: Mon, 02 Nov 2026 10:00:00 +0000"]
    if msgid is not None:
        lines.append(f"Message-ID: {msgid}")
    if irt:
        lines.append(f"In-Reply-To: {' '.join(irt)}")
    if refs:
        lines.append(f"References: {' '.join(refs)}")
    lines += ["MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8", "", body, ""]
    return "\r\n".join(lines).encode("utf-8")


def with_attachment(raw_headers: str, text: str, filename: str, data: bytes) -> bytes:
    """A multipart/mixed message with one text part and one attachment."""
    import base64

    b64 = base64.encodebytes(data).decode().replace("\n", "\r\n")
    return (f"{raw_headers}\r\nMIME-Version: 1.0\r\n"
            'Content-Type: multipart/mixed; boundary="BOUND"\r\n\r\n'
            f"--BOUND\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{text}\r\n"
            f"--BOUND\r\nContent-Type: application/pdf\r\n"
            f'Content-Disposition: attachment; filename="{filename}"\r\n'
            f"Content-Transfer-Encoding: base64\r\n\r\n{b64}--BOUND--\r\n").encode()
