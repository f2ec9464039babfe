"""Concurrent writers keep one unbroken chain: SQLite (file) and a real throwaway PostgreSQL."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlmodel import Session, SQLModel, create_engine

from mailhub.store.audit import AUDIT_TABLES, append, iter_entries, verify

WRITERS = 4
EACH = 15


def _pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    assert found, "PostgreSQL server binaries (initdb) are required for this test"
    return Path(found[-1]).parent


def _as_pg(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as the postgres user when we are root."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture(scope="module")
def pg_engine() -> Iterator[Engine]:
    bin_dir = _pg_bin()
    base = Path(tempfile.mkdtemp(prefix="mhpg", dir="/tmp"))
    if os.geteuid() == 0:
        shutil.chown(base, user="postgres")
    data = base / "data"
    subprocess.run(_as_pg([str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "mailhub",
                           "--no-sync"]), check=True, capture_output=True)
    opts = f"-c listen_addresses='' -k {base} -c fsync=off"
    subprocess.run(_as_pg([str(bin_dir / "pg_ctl"), "-D", str(data), "-o", opts, "-w",
                           "-l", str(base / "log"), "start"]), check=True, capture_output=True)
    engine = create_engine(f"postgresql+psycopg://mailhub@/postgres?host={base}",
                           pool_size=WRITERS + 1)
    try:
        SQLModel.metadata.create_all(engine, tables=list(AUDIT_TABLES))
        yield engine
    finally:
        engine.dispose()
        subprocess.run(_as_pg([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate",
                               "stop"]), capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    engine = create_engine(f"sqlite:///{tmp_path / 'audit.db'}", connect_args={"timeout": 60})
    SQLModel.metadata.create_all(engine, tables=list(AUDIT_TABLES))
    yield engine
    engine.dispose()


def hammer(engine: Engine) -> list[BaseException]:
    """WRITERS threads, started together on an empty log, each appending EACH entries."""
    start = threading.Barrier(WRITERS)
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            start.wait()
            for i in range(EACH):
                with Session(engine) as s:
                    append(s, f"worker-{n}", "sent", message_id=f"<{n}.{i}@x.example>")
                    s.commit()
        except BaseException as exc:  # reported by the test, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(WRITERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def assert_one_chain(engine: Engine) -> None:
    with Session(engine) as s:
        result = verify(s)
        entries = list(iter_entries(s))
    assert result.ok, result.problem
    assert result.entries == WRITERS * EACH
    assert [e.seq for e in entries] == list(range(1, WRITERS * EACH + 1))
    assert len({e.message_id for e in entries}) == WRITERS * EACH


def test_concurrent_writers_sqlite(sqlite_engine: Engine) -> None:
    assert hammer(sqlite_engine) == []
    assert_one_chain(sqlite_engine)


def test_concurrent_writers_postgresql(pg_engine: Engine) -> None:
    assert pg_engine.dialect.name == "postgresql"
    assert hammer(pg_engine) == []
    assert_one_chain(pg_engine)
