"""Hostile mail on the MX port: signatures by the wrong key, and OpenPGP compression bombs.

The attacker drives the real gpg CLI and talks SMTP to a serving hub; what reaches the
organisation's relay (a real SMTP server) is what a coordinator would see.
"""

from __future__ import annotations

import base64
from pathlib import Path

from tests.conftest import Instance, RunningHub, SinkHandler
from tests.deliver.test_relay_e2e import gpg, make_recipient
from tests.ingress.test_inbound_e2e import (  # noqa: F401
    CLINIC,
    HUB_ADDR,
    clinic_with_keys,
    inst,
    pgp_mime,
    relay,
    send_raw,
)


def autocrypt_mail(home: Path, addr: str, msgid: str) -> bytes:
    """A plaintext first contact that carries the sender's key in an Autocrypt header."""
    keydata = gpg(home, "--export", "--export-options", "export-minimal", addr).stdout
    b64 = base64.b64encode(keydata).decode()
    folded = "\r\n ".join(b64[i:i + 72] for i in range(0, len(b64), 72))
    return (f"From: {addr}\r\nTo: {HUB_ADDR}\r\nSubject: hi\r\n"
            f"Date: Mon, 23 Nov 2026 09:00:00 +0000\r\nMessage-ID: <{msgid}@example.org>\r\n"
            f"Autocrypt: addr={addr}; keydata=\r\n {folded}\r\n\r\nHello\r\n").encode()


def protection_lines(content: bytes) -> list[bytes]:
    head = content.split(b"\r\n\r\n", 1)[0]
    return [ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"mailhub-protection")]


def test_signature_by_a_key_that_is_not_the_senders_is_not_verified(
        inst: Instance, relay: SinkHandler, short_tmp: Path) -> None:  # noqa: F811
    """Mallory gets her key into the hub's keyring through an Autocrypt header, then signs mail
    "From" the clinic (whose rule is signed-and-encrypted) and "From" a patient whose key was
    imported by hand (after sending a changed Autocrypt key for her, recorded and not used)."""
    clinic_with_keys(inst, short_tmp)
    _, ana_pub = make_recipient(short_tmp, "ana@example.org")
    assert inst.run("keys", "import", str(ana_pub))[0] == 0
    mallory, _ = make_recipient(short_tmp, "mallory@evil.example")
    fake_ana = short_tmp / "fake-ana"
    fake_ana.mkdir(mode=0o700)
    assert gpg(fake_ana, "--quick-gen-key", "Ana <ana@example.org>", "ed25519", "sign,cert",
               "1y").returncode == 0
    fpr = [ln.split(":")[9] for ln in gpg(fake_ana, "--with-colons", "--list-keys")
           .stdout.decode().splitlines() if ln.startswith("fpr")][0]
    assert gpg(fake_ana, "--quick-add-key", fpr, "cv25519", "encr", "1y").returncode == 0
    hub_asc = short_tmp / "hub.asc"
    hub = RunningHub(inst.config).start()
    try:
        for home, addr in ((mallory, "mallory@evil.example"), (fake_ana, "ana@example.org")):
            code, _ = send_raw(inst.inbound_port, addr, HUB_ADDR,
                               autocrypt_mail(home, addr, addr.split("@")[0]))
            assert code == 250
        relay.wait_for(2)
        code, text = send_raw(inst.inbound_port, CLINIC, HUB_ADDR, _signed_as(
            mallory, hub_asc, "mallory@evil.example", CLINIC, "pay to IBAN XX"))
        assert code == 550 and text.startswith(b"5.7.1") and b"does not know" in text, text
        code, _ = send_raw(inst.inbound_port, "ana@example.org", HUB_ADDR, _signed_as(
            fake_ana, hub_asc, "ana@example.org", "ana@example.org", "new bank details"))
        assert code == 250
        code, _ = send_raw(inst.inbound_port, "mallory@evil.example", HUB_ADDR, _signed_as(
            mallory, hub_asc, "mallory@evil.example", "mallory@evil.example", "own mail"))
        assert code == 250
        got = relay.wait_for(4)
    finally:
        hub.stop()
    assert len(got) == 4 and not any(b"pay to IBAN XX" in m.content for m in got)
    ana = next(m.content for m in got if b"new bank details" in m.content)
    assert protection_lines(ana)[0].startswith(
        b"Mailhub-Protection: encryption=openpgp; signature=unknown-key")
    own = next(m.content for m in got if b"own mail" in m.content)  # Autocrypt key, own address
    assert protection_lines(own)[0].startswith(
        b"Mailhub-Protection: encryption=openpgp; signature=verified; signer=")


def _signed_as(home: Path, hub_asc: Path, key_uid: str, sender: str, body: str) -> bytes:
    """PGP/MIME signed with ``key_uid``'s key but "From" ``sender``."""
    raw = pgp_mime(home, hub_asc, key_uid, "Invoice", body)
    return raw.replace(f"From: {key_uid}\r\n".encode(), f"From: {sender}\r\n".encode(), 1)


def test_compression_bomb_is_refused_not_cut_short(
        inst: Instance, relay: SinkHandler, short_tmp: Path) -> None:  # noqa: F811
    """70 MiB of zeros compress to under 100 KiB; the hub refuses it (5.7.5), it does not
    deliver the first 64 MiB (or, as it did, the first 512 MiB) as if that were the message."""
    home, _ = make_recipient(short_tmp, "bomber@elsewhere.example")
    hub_asc = short_tmp / "hub.asc"
    hub_asc.write_text(inst.run("keys", "export-hub")[1])
    assert gpg(home, "--import", str(hub_asc)).returncode == 0
    inner = b"Content-Type: text/plain\r\n\r\n" + bytes(70 * 1024 * 1024)
    enc = gpg(home, "--armor", "--trust-model", "always", "--compress-algo", "zlib", "-z", "9",
              "--encrypt", "--recipient", "hub@medvoyage.example", data=inner)
    assert enc.returncode == 0 and len(enc.stdout) < 1024 * 1024, enc.stderr
    del inner
    msg = (b"From: bomber@elsewhere.example\r\nTo: " + HUB_ADDR.encode()
           + b"\r\nSubject: x\r\nMessage-ID: <bomb@elsewhere.example>\r\n\r\n"
           + enc.stdout.replace(b"\n", b"\r\n"))
    hub = RunningHub(inst.config).start()
    try:
        code, text = send_raw(inst.inbound_port, "bomber@elsewhere.example", HUB_ADDR, msg)
        assert code == 550 and text.startswith(b"5.7.5") and b"MiB" in text, text
        ok = (b"From: bomber@elsewhere.example\r\nTo: " + HUB_ADDR.encode()
              + b"\r\nSubject: y\r\nMessage-ID: <after@elsewhere.example>\r\n\r\nstill here\r\n")
        assert send_raw(inst.inbound_port, "bomber@elsewhere.example", HUB_ADDR, ok)[0] == 250
        got = relay.wait_for(1)
    finally:
        hub.stop()
    assert len(got) == 1 and b"still here" in got[0].content
