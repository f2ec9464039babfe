"""Inbound end to end: clinics (gpg and openssl on the command line) send to the hub's MX port.

The organisation's own mail server is a second real SMTP server; it must receive the decrypted
message with the hub's Mailhub-Protection header, and nothing of a refused message.
"""

from __future__ import annotations

import logging
import smtplib
import subprocess
from collections.abc import Iterator
from email.utils import make_msgid
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from tests.conftest import Instance, RunningHub, SinkHandler, free_port, make_instance
from tests.deliver.test_relay_e2e import gpg, make_recipient, wait_until

HUB_ADDR = "intake@medvoyage.example"
CLINIC = "records@clinic-a.example"


@pytest.fixture
def relay() -> Iterator[SinkHandler]:
    handler = SinkHandler()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    handler.port = port  # type: ignore[attr-defined]
    try:
        yield handler
    finally:
        controller.stop()


@pytest.fixture
def inst(short_tmp: Path, sink: tuple[SinkHandler, int], relay: SinkHandler) -> Instance:
    inst = make_instance(short_tmp / "hub", sink[1],
                         **{"delivery.internal_relay": f'"127.0.0.1:{relay.port}"'})  # type: ignore[attr-defined]
    (inst.root / "rules" / "policy.toml").write_text(
        '[[partner]]\ndomain = "clinic-a.example"\nrequire = "signed-and-encrypted"\n'
        'method = "openpgp"\n')
    return inst


def send_raw(port: int, sender: str, rcpt: str, data: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
        s.ehlo()
        s.mail(sender)
        code, _ = s.rcpt(rcpt)
        assert code == 250
        code, text = s.data(data)
        return code, text


def pgp_mime(home: Path, hub_asc: Path, sender: str, subject: str, body: str,
             extra_headers: str = "") -> bytes:
    assert gpg(home, "--import", str(hub_asc)).returncode == 0
    inner = (f"Content-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n").encode()
    hub_fpr = [ln.split(":")[9] for ln in gpg(home, "--with-colons", "--list-keys", "hub@medvoyage.example")
               .stdout.decode().splitlines() if ln.startswith("fpr")][0]
    enc = gpg(home, "--armor", "--trust-model", "always", "--sign", "--encrypt",
              "--local-user", sender, "--recipient", hub_fpr, data=inner)
    assert enc.returncode == 0, enc.stderr
    return (f"From: {sender}\r\nTo: {HUB_ADDR}\r\nSubject: {subject}\r\n"
            f"Message-ID: {make_msgid(domain='clinic-a.example')}\r\n{extra_headers}"
            "MIME-Version: 1.0\r\n"
            'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"; '
            'boundary="BOUND"\r\n\r\n--BOUND\r\nContent-Type: application/pgp-encrypted\r\n\r\n'
            "Version: 1\r\n\r\n--BOUND\r\nContent-Type: application/octet-stream\r\n\r\n"
            ).encode() + enc.stdout + b"\r\n--BOUND--\r\n"


def clinic_with_keys(inst: Instance, tmp: Path) -> tuple[Path, str]:
    home, pub = make_recipient(tmp, CLINIC)
    code, out, err = inst.run("keys", "import", str(pub))
    assert code == 0, err
    hub_asc = tmp / "hub.asc"
    hub_asc.write_text(inst.run("keys", "export-hub")[1])
    fpr = [ln.split(":")[9] for ln in gpg(home, "--with-colons", "--list-keys", CLINIC)
           .stdout.decode().splitlines() if ln.startswith("fpr")][0]
    return home, fpr


def test_clinic_pgp_decrypted_verified_and_relayed(inst: Instance, relay: SinkHandler,
                                                   short_tmp: Path) -> None:
    home, clinic_fpr = clinic_with_keys(inst, short_tmp)
    data = pgp_mime(home, short_tmp / "hub.asc", CLINIC, "Discharge summary", "ID:42 wound ok",
                    extra_headers="Mailhub-Protection: encryption=openpgp; signature=verified; "
                                  "signer=FORGED\r\n")
    hub = RunningHub(inst.config).start()
    try:
        code, _ = send_raw(inst.inbound_port, CLINIC, HUB_ADDR, data)
        assert code == 250
        got = relay.wait_for(1)
    finally:
        hub.stop()
    assert len(got) == 1 and got[0].rcpt_tos == [HUB_ADDR]
    delivered = got[0].content
    assert b"ID:42 wound ok" in delivered
    headers = [ln for ln in delivered.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
               if ln.lower().startswith(b"mailhub-protection")]
    assert headers == [f"Mailhub-Protection: encryption=openpgp; signature=verified; "
                       f"signer={clinic_fpr}".encode()]


def test_partner_plaintext_refused_patient_plaintext_accepted(inst: Instance, relay: SinkHandler,
                                                              short_tmp: Path) -> None:
    clinic_with_keys(inst, short_tmp)
    hub = RunningHub(inst.config).start()
    try:
        plain = (f"From: {CLINIC}\r\nTo: {HUB_ADDR}\r\nSubject: results\r\n"
                 "Message-ID: <p1@clinic-a.example>\r\n\r\nHb 9.1\r\n").encode()
        code, text = send_raw(inst.inbound_port, CLINIC, HUB_ADDR, plain)
        assert code == 550 and text.startswith(b"5.7.")
        assert b"encrypt" in text.lower() and b"export-hub" in text
        patient = (b"From: ana@example.org\r\nTo: intake@medvoyage.example\r\nSubject: hello\r\n"
                   b"Mailhub-Protection: encryption=openpgp; signature=verified; signer=X\r\n"
                   b"Message-ID: <pat1@example.org>\r\n\r\nWhen is my surgery?\r\n")
        code, _ = send_raw(inst.inbound_port, "ana@example.org", HUB_ADDR, patient)
        assert code == 250
        got = relay.wait_for(1)
    finally:
        hub.stop()
    assert len(got) == 1
    assert b"Hb 9.1" not in got[0].content
    assert b"Mailhub-Protection: encryption=none; signature=none\r\n" in got[0].content
    assert got[0].content.count(b"Mailhub-Protection") == 1  # the forged one is gone


def test_smime_from_openssl_and_undecryptable(inst: Instance, relay: SinkHandler,
                                              short_tmp: Path) -> None:
    hub_cert = short_tmp / "hub.crt"
    hub_cert.write_text(inst.run("keys", "export-hub", "--smime")[1])
    content = short_tmp / "content.txt"
    content.write_bytes(b"Content-Type: text/plain\r\n\r\nID:7 x-ray attached\r\n")
    enc = subprocess.run(["openssl", "cms", "-encrypt", "-aes256", "-in", str(content),
                          "-from", "lab@other.example", "-to", HUB_ADDR,
                          "-subject", "x-ray", str(hub_cert)], capture_output=True)
    assert enc.returncode == 0, enc.stderr
    hub = RunningHub(inst.config).start()
    try:
        code, _ = send_raw(inst.inbound_port, "lab@other.example", HUB_ADDR, enc.stdout)
        assert code == 250
        got = relay.wait_for(1)
        assert b"ID:7 x-ray attached" in got[0].content
        assert b"Mailhub-Protection: encryption=smime; signature=none" in got[0].content
        # encrypted to someone else: refused with its own reason, nothing kept
        other_home = short_tmp / "other"
        other_home.mkdir(mode=0o700)
        assert gpg(other_home, "--quick-gen-key", "x <x@y.example>", "ed25519", "sign").returncode == 0
        fpr = [ln.split(":")[9] for ln in gpg(other_home, "--with-colons", "--list-keys")
               .stdout.decode().splitlines() if ln.startswith("fpr")][0]
        assert gpg(other_home, "--quick-add-key", fpr, "cv25519", "encr").returncode == 0
        cipher = gpg(other_home, "--armor", "--trust-model", "always", "--encrypt",
                     "--recipient", fpr, data=b"secret").stdout
        msg = (b"From: z@y.example\r\nTo: intake@medvoyage.example\r\nSubject: s\r\n\r\n" + cipher)
        code, text = send_raw(inst.inbound_port, "z@y.example", HUB_ADDR, msg)
        assert code == 550 and text.startswith(b"5.7.5"), text
    finally:
        hub.stop()
    assert len(relay.messages) == 1


def test_autocrypt_key_learnt_and_used(inst: Instance, sink: tuple[SinkHandler, int],
                                       relay: SinkHandler, short_tmp: Path) -> None:
    import base64

    home, _ = make_recipient(short_tmp, "ana@example.org")
    keydata = gpg(home, "--export", "--export-options", "export-minimal", "ana@example.org").stdout
    b64 = base64.b64encode(keydata).decode()
    folded = "\r\n ".join(b64[i:i + 72] for i in range(0, len(b64), 72))
    msg = (f"From: ana@example.org\r\nTo: {HUB_ADDR}\r\nSubject: hi\r\n"
           "Date: Mon, 23 Nov 2026 09:00:00 +0000\r\nMessage-ID: <ac1@example.org>\r\n"
           f"Autocrypt: addr=ana@example.org; prefer-encrypt=mutual; keydata=\r\n {folded}\r\n"
           "\r\nHello\r\n").encode()
    pw = inst.root / "pw"
    pw.write_text("correct horse battery\n")
    assert inst.run("users", "add", "coord@medvoyage.example", "--password-file", str(pw))[0] == 0
    hub = RunningHub(inst.config).start()
    try:
        assert send_raw(inst.inbound_port, "ana@example.org", HUB_ADDR, msg)[0] == 250
        relay.wait_for(1)
        code, out, _ = inst.run("keys", "list", "--json")
        assert '"source": "autocrypt"' in out and "ana@example.org" in out
        from tests.deliver.test_relay_e2e import case_mail, submit

        reply = case_mail("ana@example.org", subject="Re: hi", body="See you on the 3rd")
        submit(inst, reply, ["ana@example.org"])
        wait_until(lambda: any(m.rcpt_tos == ["ana@example.org"] for m in sink[0].messages))
    finally:
        hub.stop()
    wire = [m for m in sink[0].messages if m.rcpt_tos == ["ana@example.org"]][0].content
    assert b"multipart/encrypted" in wire and b"See you on the 3rd" not in wire
    assert b"Autocrypt: addr=coord@medvoyage.example" in wire
    armored = wire[wire.index(b"-----BEGIN PGP MESSAGE-----"):]
    assert b"See you on the 3rd" in gpg(home, "--decrypt", data=armored).stdout


def test_a_message_without_message_id_is_logged_under_the_id_the_hub_gives_it(
        inst: Instance, relay: SinkHandler, caplog: pytest.LogCaptureFixture) -> None:
    """Decision lines carry the Message-ID; when the sender gave none, the lines name the one
    the case store assigned (and say at acceptance that one will be assigned), not an empty id."""
    caplog.set_level(logging.INFO, logger="mailhub")
    hub = RunningHub(inst.config).start()
    try:
        patient = (b"From: ana@example.org\r\nTo: intake@medvoyage.example\r\n"
                   b"Subject: hello\r\n\r\nWhen is my surgery?\r\n")
        code, _ = send_raw(inst.inbound_port, "ana@example.org", HUB_ADDR, patient)
        assert code == 250
        relay.wait_for(1)
    finally:
        hub.stop()
    lines = [r.getMessage() for r in caplog.records]
    accepted = [x for x in lines if x.startswith("accepted listener=inbound")]
    filed = [x for x in lines if x.startswith("filed message_id=")]
    assert accepted and "message_id=(none: the hub assigns one)" in accepted[0]
    assert filed and filed[0].startswith("filed message_id=<assigned.")
