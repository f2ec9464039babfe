"""kill -9 under load: nothing acknowledged is lost, and only rows in flight may go out twice.

``mailhub serve`` runs as a real subprocess against a real smarthost (aiosmtpd with STARTTLS, as
plaintext exceptions leave only over TLS). Client threads submit a burst over STARTTLS + AUTH to
a recipient whose OpenPGP key is imported and to one a ``[[plaintext]]`` rule allows; the server
is killed with SIGKILL in the middle of it, three times: while messages are being submitted,
while spooled messages wait to be processed (encrypted), and while deliveries are in flight
(the smarthost answers slowly). After each restart the queue drains, every message that got a
250 reaches the smarthost, and a message reaches it twice only if its queue row was claimed for
sending (``sending_since``) at the moment of the kill: the next hop's 250 and our "sent" commit
cannot be one atomic step, so that is the one duplicate SMTP allows.
"""

from __future__ import annotations

import os
import signal
import smtplib
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from tests.conftest import REPO, Instance, free_port, make_instance

COORD = "coord@medvoyage.example"
PASSWORD = "crash test password"
PGP_RCPT = "records@clinic-crash.example"
PLAIN_RCPT = "desk@travel-crash.example"


@dataclass
class SlowSink:
    """A smarthost that keeps (Message-ID, recipient) of what it accepts; ``delay`` slows DATA."""

    got: list[tuple[str, str]] = field(default_factory=list)
    wire: dict[str, bytes] = field(default_factory=dict)
    kept: dict[tuple[str, str], bytes] = field(default_factory=dict)
    delay: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        import asyncio

        if self.delay:
            await asyncio.sleep(self.delay)
        msg = message_from_bytes(envelope.original_content)
        mid = str(msg.get("Message-ID", "")).strip()
        with self.lock:
            for rcpt in envelope.rcpt_tos:
                self.got.append((mid, rcpt))
                self.wire[rcpt] = envelope.original_content
                self.kept[(mid, rcpt)] = envelope.original_content
        return "250 2.0.0 kept"

    def delivered(self) -> Counter[tuple[str, str]]:
        with self.lock:
            return Counter(self.got)


class Serve:
    """``python -m mailhub --config CFG serve`` in its own process group."""

    def __init__(self, inst: Instance) -> None:
        self.inst = inst
        self.log = inst.root / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mailhub", "--config", str(self.inst.config), "serve"],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        for port in (self.inst.submission_port, self.inst.inbound_port):
            wait_until(lambda p=port: port_open(p) or self.proc.poll() is not None)  # type: ignore[misc, union-attr]
        assert self.proc.poll() is None, self.log.read_text()[-3000:]

    def kill(self) -> None:
        """SIGKILL the server; its submission listener processes and crypto workers notice and
        exit by themselves (the port closes, the process group empties)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        wait_until(lambda: not port_open(self.inst.submission_port))
        wait_until(lambda: not group_alive(self.proc.pid), timeout=60)  # type: ignore[union-attr]
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()
            self.proc = None


def group_alive(pgid: int) -> bool:
    """Whether any process (other than a zombie) is left in the process group."""
    out = subprocess.run(["ps", "-o", "stat=", "-g", str(pgid)], capture_output=True, text=True)
    return any(not st.startswith("Z") for st in out.stdout.split())


def port_open(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def wait_until(pred: Callable[[], bool], timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def sql(inst: Instance, query: str) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(inst.root / "var" / "mailhub.db", timeout=30)
    try:
        return list(con.execute(query))
    finally:
        con.close()


def in_flight(inst: Instance) -> set[tuple[str, str]]:
    """(Message-ID, recipient) of rows claimed for sending and not marked sent."""
    return set(sql(inst, "SELECT message_id, recipient FROM outbound WHERE status = 'queued' "
                         "AND sending_since IS NOT NULL"))


def spooled(inst: Instance) -> int:
    """Submissions spooled and not yet processed, as the server's own spool sees them."""
    from mailhub.crypto.atrest import AtRest
    from mailhub.spool.spool import Spool

    spool = Spool(inst.root / "var" / "spool", AtRest.load(inst.root / "keys" / "atrest.key"))
    try:
        return spool.pending_count("submission")
    finally:
        spool.close()


def recovered_at_last_start(serve: Serve) -> int:
    """Spool files the last start found unprocessed (from its 'mailhub ready' log line)."""
    import re

    lines = [ln for ln in serve.log.read_text(errors="replace").splitlines()
             if "mailhub ready" in ln]
    m = re.search(r"(\d+) spooled recovered", lines[-1])
    assert m, lines[-1]
    return int(m.group(1))


def message(mid: str, rcpt: str, n: int, lines: int = 40) -> bytes:
    return (f"From: Coordinator <{COORD}>\r\nTo: <{rcpt}>\r\nSubject: crash test {n}\r\n"
            f"Message-ID: {mid}\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n"
            + f"Pre-op note {n}: fasting from midnight.\r\n" * lines).encode()


class Burst:
    """Client threads submitting messages; ``acked`` holds the (Message-ID, recipient) pairs
    of every message that got a 250. A thread stops at the first connection error."""

    def __init__(self, inst: Instance, tag: str, count: int, rcpts: list[str],
                 threads: int = 6, lines: int = 40) -> None:
        self.inst = inst
        self.lines = lines
        self.todo = [(f"<{tag}-{i}@crash.medvoyage.example>", rcpts[i % len(rcpts)], i)
                     for i in range(count)]
        self.todo_all = [(mid, rcpt) for mid, rcpt, _ in self.todo]
        self.acked: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(threads)]

    def _next(self) -> tuple[str, str, int] | None:
        with self.lock:
            return self.todo.pop(0) if self.todo else None

    def _client(self) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        try:
            with smtplib.SMTP("127.0.0.1", self.inst.submission_port, timeout=60) as s:
                s.starttls(context=ctx)
                s.login(COORD, PASSWORD)
                while (job := self._next()) is not None:
                    mid, rcpt, n = job
                    s.sendmail(COORD, [rcpt], message(mid, rcpt, n, self.lines))  # raises unless 250
                    with self.lock:
                        self.acked.append((mid, rcpt))
        except (OSError, smtplib.SMTPException):
            return  # the server was killed under us: what was not acknowledged may be lost

    def start(self) -> Burst:
        for t in self.threads:
            t.start()
        return self

    def count(self) -> int:
        with self.lock:
            return len(self.acked)

    def join(self) -> None:
        for t in self.threads:
            t.join(120)


@pytest.fixture
def smarthost(short_tmp: Path) -> Iterator[tuple[SlowSink, int]]:
    from mailhub.crypto.selfsigned import generate_tls_identity

    key, cert = generate_tls_identity(["localhost"])
    (short_tmp / "sink.key").write_bytes(key)
    (short_tmp / "sink.crt").write_bytes(cert)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(short_tmp / "sink.crt", short_tmp / "sink.key")
    handler = SlowSink()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, tls_context=ctx,
                            require_starttls=False)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


def gpg_key(tmp: Path, address: str) -> Path:
    home = tmp / "rcpt-gnupg"
    home.mkdir(mode=0o700)
    base = ["gpg", "--homedir", str(home), "--batch", "--pinentry-mode", "loopback",
            "--passphrase", ""]
    subprocess.run([*base, "--quick-gen-key", f"Clinic <{address}>", "ed25519", "sign", "1y"],
                   check=True, capture_output=True, timeout=60)
    out = subprocess.run([*base, "--with-colons", "--list-keys", address], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    fpr = [ln.split(":")[9] for ln in out.splitlines() if ln.startswith("fpr")][0]
    subprocess.run([*base, "--quick-add-key", fpr, "cv25519", "encr", "1y"], check=True,
                   capture_output=True, timeout=60)
    pub = tmp / "rcpt.asc"
    pub.write_bytes(subprocess.run([*base, "--armor", "--export", address], check=True,
                                   capture_output=True, timeout=60).stdout)
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True)
    return pub


def prepared_instance(root: Path, smarthost_port: int) -> Instance:
    inst = make_instance(root / "hub", smarthost_port)
    (inst.root / "rules" / "crash.toml").write_text(
        f'[[plaintext]]\naddress = "{PLAIN_RCPT}"\nreason = "crash test: travel dates only"\n')
    pw = root / "pw"
    pw.write_text(PASSWORD + "\n")
    for args in (("users", "add", COORD, "--password-file", str(pw)),
                 ("keys", "import", str(gpg_key(root, PGP_RCPT)))):
        code, _, err = inst.run(*args)
        assert code == 0, err
    return inst


def crash_and_recover(inst: Instance, serve: Serve, sink: SlowSink, burst: Burst,
                      ready: Callable[[], bool], allowed: set[tuple[str, str]],
                      before_restart: Callable[[], None] = lambda: None
                      ) -> set[tuple[str, str]]:
    """Kill once ``ready()``, restart, drain; check nothing acknowledged is lost and that
    duplicates are only rows in flight at this kill or an earlier one (``allowed``, updated).
    Returns the rows in flight at this kill."""
    burst.start()
    wait_until(ready)
    serve.kill()
    burst.join()
    flight = in_flight(inst)
    allowed |= flight
    before_restart()
    serve.start()
    acked = set(burst.acked)
    wait_until(lambda: acked <= set(sink.delivered()))
    wait_until(lambda: spooled(inst) == 0 and not sql(
        inst, "SELECT id FROM outbound WHERE status = 'queued'"))
    delivered = sink.delivered()
    lost = acked - set(delivered)
    assert not lost, f"acknowledged but never delivered: {sorted(lost)[:5]}"
    twice = {key for key, n in delivered.items() if n > 1}
    assert twice <= allowed, f"sent twice, not in flight: {sorted(twice - allowed)[:5]}"
    stuck = sql(inst, "SELECT id, status, recipient, kind, reason FROM outbound "
                      "WHERE status IN ('held', 'failed')")
    assert not stuck, f"held or failed after the crash: {stuck[:3]}"
    return flight


def test_kill_9_under_load_loses_nothing_acknowledged(short_tmp: Path,
                                                      smarthost: tuple[SlowSink, int]) -> None:
    sink, port = smarthost
    inst = prepared_instance(short_tmp, port)
    serve = Serve(inst)
    serve.start()
    try:
        # 1. while messages are being submitted (after some acknowledgements)
        burst = Burst(inst, "submitting", 200, [PGP_RCPT, PLAIN_RCPT])
        allowed: set[tuple[str, str]] = set()
        crash_and_recover(inst, serve, sink, burst, lambda: burst.count() >= 40, allowed)
        assert 40 <= len(burst.acked) < 200  # the kill did land mid-burst

        # 2. while acknowledged messages wait in the spool to be encrypted
        burst = Burst(inst, "processing", 200, [PGP_RCPT], threads=8)
        crash_and_recover(inst, serve, sink, burst,
                          lambda: burst.count() >= 20 and spooled(inst) >= 2, allowed)
        assert recovered_at_last_start(serve) >= 1

        # 3. while deliveries are in flight (the smarthost answers slowly)
        sink.delay = 0.2
        burst = Burst(inst, "delivering", 80, [PLAIN_RCPT, PGP_RCPT])

        def slow_off() -> None:
            sink.delay = 0.0

        flight = crash_and_recover(
            inst, serve, sink, burst,
            lambda: len(sql(inst, "SELECT id FROM outbound WHERE status = 'sent' "
                                  "AND message_id LIKE '<delivering-%'")) >= 10
            and bool(in_flight(inst)), allowed, before_restart=slow_off)
        assert flight, "the kill did not catch a delivery in flight"
        log = serve.log.read_text(errors="replace")
        for mid, _ in flight:
            assert f"({mid}) was in flight at a crash" in log
    finally:
        serve.stop()

    # what reached the smarthost for the keyed recipient is ciphertext, for the other the text
    assert b"multipart/encrypted" in sink.wire[PGP_RCPT]
    assert b"fasting from midnight" not in sink.wire[PGP_RCPT]
    assert b"fasting from midnight" in sink.wire[PLAIN_RCPT]


def test_kill_9_with_large_payloads_in_segment_files(short_tmp: Path,
                                                     smarthost: tuple[SlowSink, int]) -> None:
    """Payloads over 32 KiB lie in segment files beside SQLite: killed while many such rows
    wait for a slow smarthost, the restarted hub sends each one, byte for byte."""
    sink, port = smarthost
    inst = prepared_instance(short_tmp, port)
    serve = Serve(inst)
    serve.start()
    sink.delay = 0.3
    try:
        burst = Burst(inst, "large", 60, [PLAIN_RCPT, PGP_RCPT], lines=1200)  # ~47 KB each

        def waiting_in_files() -> bool:
            return len(sql(inst, "SELECT o.id FROM outbound o JOIN payloads p ON "
                                 "p.id = o.payload_id WHERE o.status = 'queued' "
                                 "AND p.segment IS NOT NULL")) >= 10

        def slow_off() -> None:
            sink.delay = 0.0

        crash_and_recover(inst, serve, sink, burst, waiting_in_files, set(),
                          before_restart=slow_off)
    finally:
        serve.stop()
    assert list((inst.root / "var" / "payloads").glob("*.pay"))
    plain = [(mid, n) for n, (mid, rcpt) in enumerate(burst.todo_all) if rcpt == PLAIN_RCPT]
    acked = set(burst.acked)
    checked = 0
    for mid, n in plain:
        if (mid, PLAIN_RCPT) in acked:
            body = sink.kept[(mid, PLAIN_RCPT)].replace(b"\r\n", b"\n")
            assert body.count(f"Pre-op note {n}: fasting from midnight.".encode()) == 1200
            checked += 1
    assert checked >= 5
    pgp = [k for k in acked if k[1] == PGP_RCPT]
    assert pgp and all(b"multipart/encrypted" in sink.kept[k] for k in pgp)
    assert all(b"fasting from midnight" not in sink.kept[k] for k in pgp)
