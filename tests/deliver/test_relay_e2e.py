"""End to end: a coordinator submits over STARTTLS+AUTH; only ciphertext reaches the smarthost.

The recipient side is played by the gpg command line (its own GNUPGHOME) and by openssl cms:
what the hub sends, they decrypt to what was sent and find the hub's valid signature.
"""

from __future__ import annotations

import json
import smtplib
import ssl
import subprocess
import time
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.conftest import Instance, RunningHub, SinkHandler, agents_of, set_config

COORD = "coord@medvoyage.example"
PASSWORD = "correct horse battery"


def gpg(home: Path, *args: str, data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["gpg", "--homedir", str(home), "--batch", "--yes",
                           "--pinentry-mode", "loopback", "--passphrase", "", *args],
                          input=data, capture_output=True, timeout=60)


def make_recipient(tmp: Path, address: str) -> tuple[Path, Path]:
    home = tmp / f"gpg-{address.split('@')[0]}"
    home.mkdir(mode=0o700)
    r = gpg(home, "--quick-gen-key", f"Clinic <{address}>", "ed25519", "sign", "1y")
    assert r.returncode == 0, r.stderr
    fpr = gpg(home, "--with-colons", "--list-keys", address).stdout.decode()
    fp = [ln.split(":")[9] for ln in fpr.splitlines() if ln.startswith("fpr")][0]
    r = gpg(home, "--quick-add-key", fp, "cv25519", "encr", "1y")
    assert r.returncode == 0, r.stderr
    pub = tmp / f"{address}.asc"
    pub.write_bytes(gpg(home, "--armor", "--export", address).stdout)
    return home, pub


def add_user(instance: Instance) -> None:
    pw = instance.root / "pw"
    pw.write_text(PASSWORD + "\n")
    code, out, err = instance.run("users", "add", COORD, "--password-file", str(pw))
    assert code == 0, err


def submit(instance: Instance, msg: EmailMessage, rcpts: list[str]) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", instance.submission_port, timeout=30) as s:
        s.starttls(context=ctx)
        s.login(COORD, PASSWORD)
        s.send_message(msg, from_addr=COORD, to_addrs=rcpts)


def case_mail(to: str, subject: str = "Pre-op bloods for Ana", body: str = "Hb 13.2, INR 1.0") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = COORD
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = "<client-given-1@coordinator.pc>"
    msg.set_content(body)
    return msg


def wait_until(pred, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


def test_encrypted_to_keyed_recipient_held_for_keyless(instance: Instance,
                                                       sink: tuple[SinkHandler, int],
                                                       short_tmp: Path) -> None:
    handler, _ = sink
    add_user(instance)
    home, pub = make_recipient(short_tmp, "records@clinic-a.example")
    code, out, err = instance.run("keys", "import", str(pub))
    assert code == 0, err
    hub_pub = short_tmp / "hub.asc"
    code, out, err = instance.run("keys", "export-hub")
    assert code == 0 and "BEGIN PGP PUBLIC KEY BLOCK" in out
    hub_pub.write_text(out)
    assert gpg(home, "--import", str(hub_pub)).returncode == 0

    running = RunningHub(instance.config).start()
    try:
        msg = case_mail("records@clinic-a.example, nokey@elsewhere.example")
        submit(instance, msg, ["records@clinic-a.example", "nokey@elsewhere.example"])
        # the encrypted copy, plus the held notice to the coordinator
        received = handler.wait_for(2)
    finally:
        running.stop()

    to_clinic = [m for m in received if m.rcpt_tos == ["records@clinic-a.example"]]
    assert len(to_clinic) == 1
    wire = to_clinic[0].content
    assert b"multipart/encrypted" in wire
    assert b"Hb 13.2" not in wire and b"Pre-op bloods" not in wire  # body and subject hidden
    assert b"Message-ID: <client-given-1@coordinator.pc>" in wire  # client's id kept
    assert not any(m.rcpt_tos == ["nokey@elsewhere.example"] for m in received)

    armored = wire[wire.index(b"-----BEGIN PGP MESSAGE-----"):]
    armored = armored[: armored.index(b"-----END PGP MESSAGE-----") + 25]
    dec = gpg(home, "--status-fd", "2", "--decrypt", data=armored)
    assert dec.returncode == 0, dec.stderr
    assert b"Hb 13.2, INR 1.0" in dec.stdout
    assert b"Pre-op bloods for Ana" in dec.stdout  # protected header inside
    assert b"[GNUPG:] GOODSIG" in dec.stderr and b"VALIDSIG" in dec.stderr

    notices = [m for m in received if m.rcpt_tos == [COORD]]
    assert len(notices) == 1
    notice = notices[0].content
    assert b"nokey@elsewhere.example" in notice and b"mailhub keys import" in notice
    assert b"Hb 13.2" not in notice and b"Pre-op bloods" not in notice

    code, out, err = instance.run("queue", "list", "--json")
    rows = json.loads(out)
    by_rcpt = {r["recipient"]: r for r in rows}
    assert by_rcpt["records@clinic-a.example"]["status"] == "sent"
    held = by_rcpt["nokey@elsewhere.example"]
    assert held["status"] == "held" and "nokey@elsewhere.example" in held["reason"]
    assert set(rows[0]) >= {"id", "recipient", "status", "reason"}


@pytest.mark.parametrize("rcpt", ["someone@else.example"])
def test_submission_requires_auth(instance: Instance, rcpt: str) -> None:
    running = RunningHub(instance.config).start()
    try:
        with smtplib.SMTP("127.0.0.1", instance.submission_port, timeout=30) as s:
            s.ehlo()
            code, text = s.mail(COORD)
            assert code == 530 and b"5.7.0" in text
            # AUTH before STARTTLS is refused (no password over plaintext)
            code, text = s.docmd("AUTH", "PLAIN AGNvb3JkQG1lZHZveWFnZS5leGFtcGxlAHg=")
            assert code == 538
        with smtplib.SMTP("127.0.0.1", instance.inbound_port, timeout=30) as s:
            s.ehlo()
            assert s.mail("x@attacker.example")[0] == 250
            code, text = s.rcpt(rcpt)
            assert code == 550 and b"5.7.1" in text  # not an open relay
    finally:
        running.stop()


def test_held_message_released_when_key_arrives(instance: Instance,
                                                sink: tuple[SinkHandler, int],
                                                short_tmp: Path) -> None:
    handler, _ = sink
    add_user(instance)
    running = RunningHub(instance.config).start()
    try:
        submit(instance, case_mail("late@clinic-b.example"), ["late@clinic-b.example"])
        handler.wait_for(1)  # the held notice to the coordinator
        rows = json.loads(instance.run("queue", "list", "--json")[1])
        held = [r for r in rows if r["recipient"] == "late@clinic-b.example"]
        assert held and held[0]["status"] == "held"
        held_copy = payload_ids(instance)[held[0]["id"]]
        home, pub = make_recipient(short_tmp, "late@clinic-b.example")
        code, _, err = instance.run("keys", "import", str(pub))
        assert code == 0, err
        wait_until(lambda: any(m.rcpt_tos == ["late@clinic-b.example"] for m in handler.messages))
        notice = handler.messages[0].content  # it told the coordinator what would happen
        assert f"mailhub queue release {held[0]['id']}".encode() in notice
        assert b"by itself" in notice
    finally:
        running.stop()
    assert not agents_of(instance.config.parent / "keys" / "gnupg")  # it went with the hub
    # releasing by hand afterwards, as the notice allows, says it was done already
    code, _, err = instance.run("queue", "release", str(held[0]["id"]))
    assert code == 1 and "already released" in err and "Traceback" not in err
    # the released row carries its ciphertext; the held original is deleted, not orphaned
    released = payload_ids(instance)[held[0]["id"]]
    assert released is not None and released != held_copy
    assert held_copy not in set(payload_ids(instance, table="payloads").values())
    wire = [m for m in handler.messages if m.rcpt_tos == ["late@clinic-b.example"]][0].content
    armored = wire[wire.index(b"-----BEGIN PGP MESSAGE-----"):]
    assert b"Hb 13.2" in gpg(home, "--decrypt", data=armored).stdout


def test_sent_payloads_are_swept_and_held_ones_kept(instance: Instance,
                                                   sink: tuple[SinkHandler, int],
                                                   short_tmp: Path) -> None:
    handler, _ = sink
    add_user(instance)
    set_config(instance.config, **{"delivery.keep_sent_payloads": "0"})
    _, pub = make_recipient(short_tmp, "records@clinic-a.example")
    assert instance.run("keys", "import", str(pub))[0] == 0
    running = RunningHub(instance.config).start()
    try:
        submit(instance, case_mail("records@clinic-a.example, nokey@elsewhere.example"),
               ["records@clinic-a.example", "nokey@elsewhere.example"])
        handler.wait_for(2)  # the ciphertext and the held notice
    finally:
        running.stop()
    rows = {r["recipient"]: r for r in json.loads(instance.run("queue", "list", "--json")[1])}
    sent = rows["records@clinic-a.example"]
    held = rows["nokey@elsewhere.example"]
    assert (sent["status"], held["status"]) == ("sent", "held")
    running = RunningHub(instance.config).start()  # swept at start (and every minute)
    try:
        wait_until(lambda: payload_ids(instance)[sent["id"]] is None)
    finally:
        running.stop()
    ids = payload_ids(instance)
    assert ids[held["id"]] is not None  # a held message keeps its original for release
    assert set(payload_ids(instance, table="payloads")) == {ids[held["id"]]}
    rows = {r["recipient"]: r for r in json.loads(instance.run("queue", "list", "--json")[1])}
    assert rows["records@clinic-a.example"]["status"] == "sent"  # the row stays listed


def payload_ids(instance: Instance, table: str = "outbound") -> dict[int, int | None]:
    """Row id -> payload id (``outbound``), or payload id -> itself (``payloads``)."""
    from sqlalchemy import text

    from mailhub.app import Hub
    from mailhub.config import load_config

    engine = Hub(load_config(instance.config)).engine
    column = "payload_id" if table == "outbound" else "id"
    try:
        with engine.connect() as conn:
            return dict(conn.execute(text(f"SELECT id, {column} FROM {table}")).all())  # type: ignore[arg-type]
    finally:
        engine.dispose()


def test_key_import_refusals_are_clear(instance: Instance, short_tmp: Path) -> None:
    home, _ = make_recipient(short_tmp, "x@clinic-c.example")
    secret = short_tmp / "secret.asc"
    secret.write_bytes(gpg(home, "--armor", "--export-secret-keys", "x@clinic-c.example").stdout)
    code, out, err = instance.run("keys", "import", str(secret))
    assert code == 1 and "secret" in err.lower() and "Traceback" not in err
    garbage = short_tmp / "garbage.asc"
    garbage.write_text("-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nnot really\n")
    code, out, err = instance.run("keys", "import", str(garbage))
    assert code == 1 and err.startswith("mailhub: error:") and "Traceback" not in err
    code, out, err = instance.run("queue", "release", "999")
    assert code == 1 and "no queue entry 999" in err


def test_refused_copy_comes_back_as_a_dsn_without_content(instance: Instance,
                                                          sink: tuple[SinkHandler, int],
                                                          short_tmp: Path) -> None:
    # the smarthost refuses the encrypted copy for good: the row fails and, in that same
    # commit, a DSN to the coordinator is queued; it names the recipient and the reply only
    handler, _ = sink
    add_user(instance)
    _, pub = make_recipient(short_tmp, "gone@clinic-a.example")
    code, _, err = instance.run("keys", "import", str(pub))
    assert code == 0, err
    handler.refuse["gone@clinic-a.example"] = "550 5.1.1 no such mailbox here"
    running = RunningHub(instance.config).start()
    try:
        submit(instance, case_mail("gone@clinic-a.example"), ["gone@clinic-a.example"])
        received = handler.wait_for(1)
    finally:
        running.stop()
    assert [m.rcpt_tos for m in received] == [[COORD]]
    dsn = received[0].content
    assert b"multipart/report" in dsn and b"message/delivery-status" in dsn
    assert b"gone@clinic-a.example" in dsn and b"5.1.1" in dsn
    assert b"Hb 13.2" not in dsn and b"Pre-op bloods" not in dsn
    code, out, _ = instance.run("queue", "list", "--json")
    rows = {r["recipient"]: r for r in json.loads(out)}
    assert rows["gone@clinic-a.example"]["status"] == "failed"
    assert rows[COORD]["status"] == "sent"
