"""A real, throwaway PostgreSQL server for tests: one per test session, a fresh database per test.

The server is started on first use (``initdb`` + ``pg_ctl`` from the installed PostgreSQL
binaries, trust authentication, fsync off, listening on 127.0.0.1 on a free port and on a Unix
socket in its own directory under /tmp), and stopped when the pytest session ends. PostgreSQL
refuses to run as root, so as root its tools run as the ``postgres`` user.

Use it by importing the fixture into a test module (``pytest_plugins`` is only allowed in the
root conftest)::

    from tests.pgserver import pg_url  # noqa: F401

    def test_something(pg_url: str) -> None:
        engine = make_engine(pg_url)   # an empty database of its own, dropped afterwards

``pg_url`` is a ``postgresql+psycopg://`` URL. ``PgServer.create_database`` gives more
databases on the same server (for tests that want two, or copies of a migrated template
database, which is much faster than migrating each), ``pg_server`` the server itself.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import Engine, Table
from sqlmodel import SQLModel

SUPERUSER = "mailhub"


def pg_bin_dir() -> Path:
    """The newest installed PostgreSQL server binaries (Debian layout)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parts[4]) if Path(p).parts[4].isdigit() else 0)
    assert found, "PostgreSQL server binaries (initdb) are required: apt-get install postgresql"
    return Path(found[-1]).parent


def _as_pg(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as the postgres user when we are root."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    """One private PostgreSQL cluster in a temporary directory."""

    def __init__(self) -> None:
        self.bin = pg_bin_dir()
        self.base = Path(tempfile.mkdtemp(prefix="mhpg", dir="/tmp"))
        self.data = self.base / "data"
        self.port = 0
        self.running = False

    def _run(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(_as_pg([str(self.bin / tool), *args]), capture_output=True,
                              text=True, timeout=120)

    def start(self) -> PgServer:
        if os.geteuid() == 0:
            shutil.chown(self.base, user="postgres")
        done = self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", SUPERUSER,
                         "-E", "UTF8", "--no-sync")
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stderr.strip()}")
        last_error = ""
        for _ in range(5):  # a free port can be taken between probing and binding: retry
            self.port = _free_port()
            opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.base} "
                    "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                    "-c max_connections=200")
            done = self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-w", "-t", "60",
                             "-l", str(self.base / "log"), "start")
            if done.returncode == 0:
                self.running = True
                return self
            last_error = done.stderr.strip() or done.stdout.strip()
        raise RuntimeError(f"PostgreSQL did not start: {last_error}")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=SUPERUSER,
                             dbname="postgres", autocommit=True) as conn:
            conn.execute(sql)  # type: ignore[arg-type]

    def create_database(self, name: str | None = None, template: str | None = None) -> str:
        """A new database (empty, or a copy of ``template``); returns its SQLAlchemy URL.

        A template must have no open connections while it is copied (dispose its engine).
        """
        name = name or f"t_{secrets.token_hex(6)}"
        copy = f' TEMPLATE "{template}" STRATEGY FILE_COPY' if template else ""
        self._admin(f'CREATE DATABASE "{name}"{copy}')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        if self.running:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop")
            self.running = False
        shutil.rmtree(self.base, ignore_errors=True)


_lock = threading.Lock()
_server: PgServer | None = None


def session_server(config: pytest.Config) -> PgServer:
    """The session's server, started on first use and stopped at the end of the session."""
    global _server
    with _lock:
        if _server is None:
            server = PgServer().start()
            _server = server

            def stop() -> None:
                global _server
                server.stop()
                _server = None

            config.add_cleanup(stop)
        return _server


@pytest.fixture
def pg_server(request: pytest.FixtureRequest) -> PgServer:
    """The session-wide PostgreSQL server (started once, shared by every test)."""
    return session_server(request.config)


@pytest.fixture
def pg_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh empty database on the session's PostgreSQL server, dropped after the test."""
    server = session_server(request.config)
    url = server.create_database()
    try:
        yield url
    finally:
        try:
            server.drop_database(url.rsplit("/", 1)[1])
        except Exception:  # a test left connections open that FORCE could not end: harmless
            pass


@contextmanager
def throwaway_engine(kind: str, config: pytest.Config, sqlite_file: Path,
                     make: Callable[[str], Engine], tables: list[Table]) -> Iterator[Engine]:
    """An engine on a new SQLite file (``kind="sqlite"``) or a new database on the session's
    PostgreSQL server (``"postgresql"``, dropped afterwards), with ``tables`` created."""
    server, url = None, f"sqlite:///{sqlite_file}"
    if kind == "postgresql":
        server = session_server(config)
        url = server.create_database()
    engine = make(url)
    SQLModel.metadata.create_all(engine, tables=tables)
    try:
        yield engine
    finally:
        engine.dispose()
        if server is not None:
            try:
                server.drop_database(url.rsplit("/", 1)[1])
            except Exception:  # noqa: BLE001 - a leftover connection: the server goes at the end
                pass
