"""Inbound OpenPGP made by the gpg CLI (PGP/MIME and inline), and every way it can be broken."""

from __future__ import annotations

from collections.abc import Iterator
from email import policy
from email.message import EmailMessage

import pytest

from mailhub.crypto.pgp_inbound import PLAIN, Seg, aggregate, split_parts, unwrap
from mailhub.errors import DecryptionFailed
from tests.crypto.pgp_fixtures import (
    Parties,
    cli_make_key,
    gpg_cli,
    parse,
    parties,
    throwaway_home,
)

HEAD = (b"From: Dr Clinic <doc@clinic-a.example>\r\nTo: intake@medvoyage.example\r\n"
        b"Date: Tue, 24 Nov 2026 09:00:00 +0100\r\nMessage-ID: <r1@clinic-a.example>\r\n")
SECRET_SUBJECT = "[MT-2026-0042] MRI results for Jane"


@pytest.fixture(scope="module")
def pp() -> Iterator[Parties]:
    with parties() as p:
        yield p


def inner_mime(text: str = "The MRI shows no complication.\nID:77\n") -> bytes:
    inner = EmailMessage()
    inner["Subject"] = SECRET_SUBJECT
    inner["From"] = "Dr Clinic <doc@clinic-a.example>"
    inner["Mailhub-Protection"] = "encryption=openpgp; signature=verified; signer=" + "F" * 40
    inner.set_content(text)
    inner.set_param("protected-headers", "v1")
    return inner.as_bytes(policy=policy.SMTP)


def pgp_mime(armored: bytes, *, subject: bytes = b"...", parts: str = "both",
             protocol: bytes = b"application/pgp-encrypted") -> bytes:
    """A multipart/encrypted message assembled by hand, as a client would send it."""
    control = b"--XYZ\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n\r\n"
    body = (b"--XYZ\r\nContent-Type: application/octet-stream; name=\"encrypted.asc\"\r\n\r\n"
            + armored + b"\r\n")
    chosen = {"both": control + body, "control": control, "body": body}[parts]
    return (HEAD + b"Subject: " + subject + b"\r\n"
            + b"Mailhub-Protection: encryption=openpgp; signature=verified\r\n"
            + b"MIME-Version: 1.0\r\nContent-Type: multipart/encrypted; protocol=\"" + protocol
            + b"\"; boundary=\"XYZ\"\r\n\r\nThis is an OpenPGP/MIME encrypted message\r\n"
            + chosen + b"--XYZ--\r\n")


def cli_encrypt(pp: Parties, data: bytes, *, sign: bool = True, to: str | None = None) -> bytes:
    args = ["--trust-model", "always", "--armor", "--encrypt", "--recipient",
            to or pp.hub_key.fingerprint]
    return gpg_cli(pp.partner_home, *(["--sign"] if sign else []), *args, data=data).stdout


def text_mail(body: bytes, subject: bytes = b"Re: results") -> bytes:
    return (HEAD + b"Subject: " + subject + b"\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + body)


def test_pgp_mime_from_gpg_is_opened_with_protected_subject(pp: Parties) -> None:
    raw = pgp_mime(cli_encrypt(pp, inner_mime()))
    u = unwrap(raw, gnupghome=pp.hub.gnupghome)
    assert (u.encryption, u.signature, u.signer, u.was_pgp) == (
        "openpgp", "verified", pp.partner_fpr, True)
    m = u.message
    assert m["Subject"] == SECRET_SUBJECT  # the protected header wins over "..."
    assert m["Message-ID"] == "<r1@clinic-a.example>" and m["To"] == "intake@medvoyage.example"
    assert "ID:77" in m.get_content()
    assert m.get_all("Mailhub-Protection") is None  # forged outside AND inside: both gone
    assert b"BEGIN PGP MESSAGE" not in m.as_bytes()


def test_encrypted_without_signature(pp: Parties) -> None:
    u = unwrap(pgp_mime(cli_encrypt(pp, inner_mime(), sign=False)), gnupghome=pp.hub.gnupghome)
    assert (u.encryption, u.signature, u.signer) == ("openpgp", "none", None)


def test_encrypted_multipart_signed_inside(pp: Parties) -> None:
    """RFC 3156 §6.1: sign first (multipart/signed), then encrypt that."""
    content = b"Content-Type: text/plain; charset=us-ascii\r\n\r\nDischarge on Friday.\r\n"
    sig = gpg_cli(pp.partner_home, "--armor", "--detach-sign", data=content).stdout
    signed = (b"Content-Type: multipart/signed; micalg=pgp-sha512;\r\n"
              b" protocol=\"application/pgp-signature\"; boundary=\"S1\"\r\n\r\n"
              b"--S1\r\n" + content + b"\r\n--S1\r\n"
              b"Content-Type: application/pgp-signature\r\n\r\n" + sig + b"\r\n--S1--\r\n")
    u = unwrap(pgp_mime(cli_encrypt(pp, signed, sign=False)), gnupghome=pp.hub.gnupghome)
    assert (u.encryption, u.signature, u.signer) == ("openpgp", "verified", pp.partner_fpr)
    assert "Discharge on Friday." in u.message.get_content()


def test_inline_encrypted_and_signed(pp: Parties) -> None:
    block = cli_encrypt(pp, "Befund: unauffällig. ID:78\n".encode())
    u = unwrap(text_mail(block), gnupghome=pp.hub.gnupghome)
    assert (u.encryption, u.signature, u.signer) == ("openpgp", "verified", pp.partner_fpr)
    assert u.message.get_content().rstrip("\n") == "Befund: unauffällig. ID:78"


def test_inline_clearsigned_and_tampered(pp: Parties) -> None:
    signed = gpg_cli(pp.partner_home, "--clearsign", data=b"Arrive at 07:00. ID:79\n").stdout
    u = unwrap(text_mail(signed), gnupghome=pp.hub.gnupghome)
    assert (u.encryption, u.signature, u.signer) == ("none", "verified", pp.partner_fpr)
    assert u.message.get_content().strip() == "Arrive at 07:00. ID:79"
    bad = unwrap(text_mail(signed.replace(b"07:00", b"05:00")), gnupghome=pp.hub.gnupghome)
    assert bad.signature == "invalid"
    broken = signed.split(b"-----BEGIN PGP SIGNATURE-----")[0] + (
        b"-----BEGIN PGP SIGNATURE-----\n\nAAAA\n-----END PGP SIGNATURE-----\n")
    unreadable = unwrap(text_mail(broken), gnupghome=pp.hub.gnupghome)
    assert (unreadable.encryption, unreadable.signature) == ("none", "invalid")
    assert "Arrive at 07:00. ID:79" in unreadable.message.get_content()


def test_unsigned_text_around_an_inline_block_is_not_protected(pp: Parties) -> None:
    block = cli_encrypt(pp, b"secret part\n")
    u = unwrap(text_mail(b"Please wire the deposit today!\r\n\r\n" + block),
               gnupghome=pp.hub.gnupghome)
    assert (u.encryption, u.signature) == ("none", "none")
    assert "secret part" in u.message.get_content() and u.was_pgp


def test_signature_by_unknown_key() -> None:
    with parties() as pp, throwaway_home() as home:
        cli_make_key(home, "Stranger <who@elsewhere.example>")
        gpg_cli(home, "--import", data=pp.hub.export_public(pp.hub_key.fingerprint).encode())
        ct = gpg_cli(home, "--trust-model", "always", "--armor", "--sign", "--encrypt",
                     "--recipient", pp.hub_key.fingerprint, data=inner_mime()).stdout
        u = unwrap(pgp_mime(ct), gnupghome=pp.hub.gnupghome)
        assert (u.encryption, u.signature, u.signer) == ("openpgp", "unknown-key", None)


@pytest.mark.parametrize("case", ["wrong-recipient", "missing-part", "only-body", "protocol",
                                  "corrupt", "truncated-inline", "empty-body"])
def test_bad_input_raises_decryption_failed(pp: Parties, case: str) -> None:
    good = cli_encrypt(pp, inner_mime())
    if case == "wrong-recipient":
        with throwaway_home() as home:
            fpr, _ = cli_make_key(home, "Other <other@elsewhere.example>", sign_subkey=False)
            gpg_cli(pp.partner_home, "--import",
                    data=gpg_cli(home, "--export", fpr).stdout)
            raw = pgp_mime(cli_encrypt(pp, inner_mime(), to=fpr))
    elif case == "missing-part":
        raw = pgp_mime(good, parts="control")
    elif case == "only-body":
        raw = pgp_mime(good, parts="body")
    elif case == "protocol":
        raw = pgp_mime(good, protocol=b"application/x-unknown")
    elif case == "corrupt":
        lines = good.split(b"\n")
        lines[4] = lines[4][:10] + bytes(reversed(lines[4][10:30])) + lines[4][30:]
        raw = pgp_mime(b"\n".join(lines))
    elif case == "truncated-inline":
        raw = text_mail(good[: len(good) // 2])
    else:
        raw = pgp_mime(b"")
    with pytest.raises(DecryptionFailed) as err:
        unwrap(raw, gnupghome=pp.hub.gnupghome)
    assert str(err.value)


def test_truncations_never_crash_nor_leak_ciphertext(pp: Parties) -> None:
    raw = pgp_mime(cli_encrypt(pp, inner_mime()))
    for cut in range(len(raw) // 3, len(raw), max(1, len(raw) // 9)):
        try:
            u = unwrap(raw[:cut], gnupghome=pp.hub.gnupghome)
        except DecryptionFailed:
            continue
        assert b"BEGIN PGP MESSAGE" not in u.message.as_bytes() or u.encryption == "none"


def test_plain_message_passes_through(pp: Parties) -> None:
    raw = text_mail(b"Just a question about my surgery.\r\n")
    raw = raw.replace(b"MIME-Version", b"MAILHUB-protection: encryption=openpgp; "
                                       b"signature=verified\r\nMIME-Version")
    u = unwrap(raw, gnupghome=pp.hub.gnupghome)
    assert (u.encryption, u.signature, u.signer, u.was_pgp) == ("none", "none", None, False)
    assert u.message.get_content() == "Just a question about my surgery.\r\n"
    assert u.message["Mailhub-Protection"] is None


def test_email_message_input_and_footer_beside_encrypted_part(pp: Parties) -> None:
    encrypted = pgp_mime(cli_encrypt(pp, inner_mime())).split(b"\r\n\r\n", 1)[1]
    ctype = b"Content-Type: multipart/encrypted; protocol=\"application/pgp-encrypted\"; " \
            b"boundary=\"XYZ\"\r\n\r\n"
    raw = (HEAD + b"Subject: list\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/mixed; boundary=\"LIST\"\r\n\r\n--LIST\r\n" + ctype
           + encrypted + b"\r\n--LIST\r\nContent-Type: text/plain\r\n\r\n"
           b"-- \r\nmailing list footer\r\n--LIST--\r\n")
    u = unwrap(parse(raw), gnupghome=pp.hub.gnupghome)
    assert (u.encryption, u.signature) == ("none", "none")  # the footer was not protected
    assert u.was_pgp and b"ID:77" in u.message.as_bytes()


def test_aggregate_fails_closed() -> None:
    good = Seg(True, "verified", "A" * 40)
    assert aggregate([good, good]) == ("openpgp", "verified", "A" * 40)
    assert aggregate([good, PLAIN]) == ("none", "none", None)
    assert aggregate([good, Seg(True, "invalid", "B")]) == ("openpgp", "invalid", "B")
    assert aggregate([good, Seg(True, "unknown-key", None)])[1] == "unknown-key"
    assert aggregate([good, Seg(True, "verified", "C" * 40)])[1] == "none"
    assert aggregate([]) == ("none", "none", None)


def test_split_parts_reads_raw_bytes() -> None:
    raw = (b"Content-Type: multipart/mixed; boundary=b\r\n\r\npreamble\r\n--b\r\n"
           b"\r\none\r\n--b  \r\nX: y\r\n\r\ntwo\r\n--b--\r\nepilogue")
    assert split_parts(raw, "b") == [b"\r\none", b"X: y\r\n\r\ntwo"]
    assert split_parts(b"no body", "b") is None


@pytest.mark.parametrize("raw", [
    b"",
    b"\x00\xff" * 300,
    b"Subject: only headers\r\n",
    b"Content-Type: multipart/mixed\r\n\r\nno boundary at all\r\n",
    b"Content-Type: multipart/signed; protocol=\"application/pgp-signature\"; boundary=b\r\n"
    b"\r\n--b\r\n\r\ntext\r\n--b\r\nContent-Type: application/pgp-signature\r\n\r\n"
    b"garbage\r\n--b--\r\n",
    b"Content-Type: multipart/signed; protocol=\"application/pgp-signature\"; boundary=b\r\n"
    b"\r\n--b\r\n\r\nonly the content\r\n--b--\r\n",
    b"Content-Type: multipart/encrypted; protocol=\"application/pgp-encrypted\"\r\n\r\nx\r\n",
    b"Content-Type: text/plain\r\n\r\n-----BEGIN PGP SIGNED MESSAGE-----\r\nHash: SHA256"
    b"\r\n\r\nhi\r\n-----BEGIN PGP SIGNATURE-----\r\n\r\nAAAA\r\n-----END PGP SIGNATURE-----\r\n",
    b"".join(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i)
             for i in range(40)),
])
def test_malformed_input_is_refused_or_unprotected(pp: Parties, raw: bytes) -> None:
    try:
        u = unwrap(raw, gnupghome=pp.hub.gnupghome)
    except DecryptionFailed as err:
        assert str(err)
        return
    assert u.encryption == "none" and u.signature in ("none", "invalid")
