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
from sqlmodel import Session

from mailhub.app import Hub
from mailhub.config import load_config
from mailhub.crypto.atrest import generate_atrest_key
from mailhub.store.db import make_engine, migrate
from tests.pgserver import PgServer, session_server

REPO = Path(__file__).resolve().parents[2]
HUB_DOMAIN = "medvoyage.example"
PATIENT = "ana.silva@patient.example"
CLINIC = "dr.kaya@clinic-a.example"
COORD = "lena@medvoyage.example"
INTAKE = "intake@medvoyage.example"


def make_instance_dir(root: Path, database_url: str = "") -> Path:
    """A working instance folder; returns its config.toml."""
    root.mkdir(parents=True, exist_ok=True)
    text = (REPO / "config.example.toml").read_text(encoding="utf-8")
    if database_url:
        text = re.sub(r'^database_url = ""', f'database_url = "{database_url}"', text,
                      count=1, flags=re.M)
    cfg = root / "config.toml"
    cfg.write_text(text, encoding="utf-8")
    shutil.copytree(REPO / "rules", root / "rules")
    shutil.copytree(REPO / "templates", root / "templates")
    generate_atrest_key(root / "keys" / "atrest.key")
    return cfg


def make_hub(root: Path, database_url: str = "", *, migrate: bool = True) -> Hub:
    hub = Hub(load_config(make_instance_dir(root, database_url)))
    if migrate:
        hub.migrate()
    return hub


_templates: dict[str, str] = {}
_PG_TEMPLATE = "mh_tpl_cases"


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


def _pg_database(config: pytest.Config) -> tuple[PgServer, str]:
    """A fresh database copied from a migrated template database (made once per session)."""
    server = session_server(config)
    key = f"pg:{server.port}"
    if key not in _templates:
        engine = make_engine(server.create_database(_PG_TEMPLATE))
        migrate(engine)
        engine.dispose()
        _templates[key] = _PG_TEMPLATE
    return server, server.create_database(template=_templates[key])


@pytest.fixture(name="hub", params=["sqlite", "postgresql"])
def hub_fixture(request: pytest.FixtureRequest) -> Iterator[Hub]:
    """A real hub with an empty, migrated database: SQLite in data_dir, or PostgreSQL."""
    root = Path(tempfile.mkdtemp(prefix="mhc", dir="/tmp"))
    server: PgServer | None = None
    url = ""
    if request.param == "postgresql":
        server, url = _pg_database(request.config)
    h = make_hub(root, url, migrate=False)
    if not url:
        h.config.hub.data_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_sqlite_template(request.config), h.config.hub.data_dir / "mailhub.db")
    try:
        yield h
    finally:
        h.engine.dispose()
        if server is not None:
            server.drop_database(url.rsplit("/", 1)[1])
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
