"""Keyring: offline configuration, key generation, the import rules, listing and deletion."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mailhub.crypto.openpgp import KeyNotFound, Keyring, parse_key_listing
from mailhub.errors import CryptoError, KeyImportError
from tests.crypto.pgp_fixtures import (
    Parties,
    cli_make_key,
    cli_primary_fpr,
    gpg_cli,
    parties,
    throwaway_home,
)


@pytest.fixture(scope="module")
def pp() -> Iterator[Parties]:
    with parties() as p:
        yield p


@pytest.fixture
def home() -> Iterator[str]:
    with throwaway_home() as h:
        yield h


@pytest.fixture(scope="module")
def other() -> Iterator[str]:
    """A gpg CLI home holding assorted keys to import: good, expired, revoked, sign-only."""
    with throwaway_home() as h:
        cli_make_key(h, "Good Partner <good@partner.example>", sign_subkey=False)
        gpg_cli(h, "--faked-system-time", "20200101T000000", "--quick-gen-key",
                "Old Partner <old@partner.example>", "ed25519", "default", "1d")
        gpg_cli(h, "--quick-gen-key", "Revoked Partner <rev@partner.example>", "ed25519",
                "default", "2y")
        rev = cli_primary_fpr(h, "rev@partner.example")
        cert = (Path(h) / "openpgp-revocs.d" / f"{rev}.rev").read_text()
        gpg_cli(h, "--import", data=re.sub(r"(?m)^:", "", cert).encode())
        gpg_cli(h, "--quick-gen-key", "Signer Only <signonly@partner.example>", "ed25519",
                "sign,cert", "2y")
        gpg_cli(h, "--quick-gen-key", "No Address Partner", "future-default", "default", "2y")
        gpg_cli(h, "--quick-gen-key", "Weak Partner <weak@partner.example>", "rsa1024",
                "sign,cert", "2y")
        gpg_cli(h, "--quick-add-key", cli_primary_fpr(h, "weak@partner.example"), "rsa1024",
                "encr", "2y")
        # a primary that never expires, with an encryption subkey made 10 days ago for 12
        past = (datetime.now(UTC) - timedelta(days=10)).strftime("%Y%m%dT%H%M%S")
        gpg_cli(h, "--faked-system-time", past, "--quick-gen-key",
                "Short Sub <shortsub@partner.example>", "ed25519", "sign,cert", "never")
        gpg_cli(h, "--faked-system-time", past, "--quick-add-key",
                cli_primary_fpr(h, "shortsub@partner.example"), "cv25519", "encr", "12d")
        yield h


def export(h: str, who: str, *, secret: bool = False, armor: bool = True) -> bytes:
    args = ["--export-secret-keys" if secret else "--export", who]
    return gpg_cli(h, *(["--armor"] if armor else []), *args).stdout


def test_home_is_private_and_gpg_stays_offline(home: str) -> None:
    kr = Keyring(Path(home) / "gnupg")
    assert stat.S_IMODE(os.stat(kr.home).st_mode) == 0o700
    conf = (kr.home / "gpg.conf").read_text()
    assert re.search(r"(?m)^no-auto-key-retrieve$", conf)
    assert re.search(r"(?m)^auto-key-locate local$", conf)
    assert not re.search(r"(?m)^\s*keyserver\s", conf)
    assert "disable-http" in (kr.home / "dirmngr.conf").read_text()
    for component in ("gpg", "gpg-agent", "dirmngr"):  # every option is understood
        check = subprocess.run(["gpgconf", "--homedir", kr.gnupghome, "--check-options",
                                component], capture_output=True, text=True, check=False)
        assert check.returncode == 0 and check.stdout.split(":")[4].strip() == "1", check
    # gpg 2.2 would ask WKD for an unknown address by default; ours must not even try.
    proc = gpg_cli(kr.gnupghome, "--encrypt", "--recipient", "nobody@unknown-domain.example",
                   data=b"x", check=False)
    assert proc.returncode != 0
    assert b"WKD" not in proc.stderr and b"No public key" in proc.stderr


def test_keyserver_only_when_allowed(home: str) -> None:
    kr = Keyring(Path(home), allow_keyserver=True, keyserver="hkps://keys.example.org")
    assert "keyserver hkps://keys.example.org" in (kr.home / "dirmngr.conf").read_text()
    assert "disable-http" not in (kr.home / "dirmngr.conf").read_text()
    assert "no-auto-key-retrieve" in (kr.home / "gpg.conf").read_text()


def test_generated_key_is_ed25519_with_encryption_subkey(pp: Parties) -> None:
    k = pp.hub_key
    assert re.fullmatch(r"[0-9A-F]{40}", k.fingerprint)
    assert k.algo == "ed25519" and k.secret and k.can_sign and k.can_encrypt
    assert k.usable_for_encryption and not k.revoked and not k.expired
    assert k.addresses == ("hub@medvoyage.example",)
    assert k.expires is not None
    assert timedelta(days=3 * 365 - 2) < k.expires - k.created < timedelta(days=3 * 366 + 2)
    assert [x.fingerprint for x in pp.hub.list_keys(secret=True)] == [k.fingerprint]


def test_listing_and_lookup(pp: Parties) -> None:
    fprs = {k.fingerprint: k for k in pp.hub.list_keys()}
    assert set(fprs) == {pp.hub_key.fingerprint, pp.partner_fpr}
    assert fprs[pp.hub_key.fingerprint].secret and not fprs[pp.partner_fpr].secret
    found = pp.hub.find_for_address("DOC@Clinic-A.example")
    assert [k.fingerprint for k in found] == [pp.partner_fpr]
    assert pp.hub.find_for_address("doc@clinic-b.example") == []
    assert pp.hub.find_for_address("not an address") == []
    got = pp.hub.get(pp.partner_fpr.lower())
    assert got is not None and got.uids == ("Dr Clinic <doc@clinic-a.example>",)
    assert pp.hub.get("0" * 40) is None
    armored = pp.hub.export_public(pp.partner_fpr)
    assert armored.startswith("-----BEGIN PGP PUBLIC KEY BLOCK-----")


def test_import_public_refuses_secret_material(home: str, other: str) -> None:
    kr = Keyring(Path(home))
    for data in (export(other, "good@partner.example", secret=True),
                 export(other, "good@partner.example", secret=True, armor=False)):
        with pytest.raises(KeyImportError, match="never import a partner's secret key"):
            kr.import_public(data)
    assert kr.list_keys() == [] and kr.list_keys(secret=True) == []


@pytest.mark.parametrize("who, reason", [
    ("old@partner.example", "expired"),
    ("rev@partner.example", "revoked"),
    ("signonly@partner.example", "no valid encryption subkey"),
    ("No Address Partner", "names no email address"),
    ("weak@partner.example", r"encryption key is too short \(rsa1024"),
])
def test_import_public_refuses_unusable_keys(home: str, other: str, who: str,
                                             reason: str) -> None:
    kr = Keyring(Path(home))
    with pytest.raises(KeyImportError, match=reason):
        kr.import_public(export(other, who))
    assert kr.list_keys() == []


def test_a_key_is_usable_only_until_its_encryption_subkey_expires(home: str, other: str) -> None:
    from mailhub.crypto.keystore import _openpgp_record
    from mailhub.crypto.registry import candidate_from_record

    [info] = Keyring(Path(home)).import_public(export(other, "shortsub@partner.example"))
    assert info.expires is None and info.encrypt_expires is not None  # the primary never expires
    assert timedelta(days=1) < info.encrypt_expires - datetime.now(UTC) < timedelta(days=3)
    rec = _openpgp_record(info, "shortsub@partner.example", own=False, source="imported")
    assert rec.expires == info.encrypt_expires  # what 'keys list' shows and the policy reads
    assert candidate_from_record(rec, datetime.now(UTC)).usable
    later = candidate_from_record(rec, datetime.now(UTC) + timedelta(days=3))
    assert not later.usable and later.reason.startswith("expired on ")


def test_import_public_refuses_garbage_and_truncated_armor(home: str, other: str) -> None:
    kr = Keyring(Path(home))
    good = export(other, "good@partner.example")
    with pytest.raises(KeyImportError, match="truncated"):
        kr.import_public(good[: len(good) // 2])
    with pytest.raises(KeyImportError, match="no OpenPGP key"):
        kr.import_public(b"this is not a key at all\n")
    with pytest.raises(KeyImportError, match="empty"):
        kr.import_public(b"")
    broken = good.replace(b"-----END PGP PUBLIC KEY BLOCK-----", b"").rstrip()
    with pytest.raises(KeyImportError):
        kr.import_public(broken)
    assert kr.list_keys() == []


def test_import_public_checks_expected_address(home: str, other: str) -> None:
    kr = Keyring(Path(home))
    good = export(other, "good@partner.example")
    with pytest.raises(KeyImportError, match="no user ID for doc@clinic-a.example"):
        kr.import_public(good, expected_address="doc@clinic-a.example")
    [info] = kr.import_public(good, expected_address="GOOD@partner.example")
    assert info.addresses == ("good@partner.example",) and info.usable_for_encryption
    assert not info.secret


def test_import_secret_is_for_own_keys(home: str, other: str) -> None:
    kr = Keyring(Path(home))
    with pytest.raises(KeyImportError, match="no secret key"):
        kr.import_secret(export(other, "good@partner.example"))
    [own] = kr.import_secret(export(other, "good@partner.example", secret=True))
    assert own.secret and own.addresses == ("good@partner.example",)
    assert [k.fingerprint for k in kr.list_keys(secret=True)] == [own.fingerprint]


def test_a_key_that_needs_a_passphrase_is_refused_as_an_own_key(home: str) -> None:
    """The hub signs unattended: a protected own key would fail every signature."""
    from tests.crypto.pgp_fixtures import CORPUS_PGP

    protected = (CORPUS_PGP / "keys" / "rt-recipient-at-example.com.secret.key").read_bytes()
    kr = Keyring(Path(home))
    with pytest.raises(KeyImportError, match="is protected by a passphrase") as refused:
        kr.import_secret(protected)
    assert "gpg --passwd" in (refused.value.hint or "")
    assert kr.list_keys(secret=True) == []
    # a caller that gives gpg the passphrase on every use may still import it
    assert [k.secret for k in kr.import_secret(protected, unattended=False)] == [True]


def test_delete_and_failures_raise(home: str, other: str) -> None:
    kr = Keyring(Path(home))
    [pub] = kr.import_public(export(other, "good@partner.example"))
    own = kr.generate_key("Hub <hub@x.example>", expire="1y")
    kr.delete(pub.fingerprint)
    kr.delete(own.fingerprint)
    assert kr.list_keys() == [] and kr.list_keys(secret=True) == []
    with pytest.raises(KeyNotFound):
        kr.delete(pub.fingerprint)
    with pytest.raises(KeyNotFound):
        kr.export_public(pub.fingerprint)
    with pytest.raises(CryptoError, match="fingerprint"):
        kr.get("doc@clinic-a.example")
    with pytest.raises(CryptoError, match="could not generate"):
        kr.generate_key("Hub <hub@x.example>", expire="not-a-duration")


def test_parse_key_listing_reads_colon_output() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    text = "\n".join([
        "pub:e:255:22:0E0004949583C22B:1577836800:1577923200::u:::sc:::+::ed25519:::0:",
        "fpr:::::::::9222A6EE63FFF8402D37647F0E0004949583C22B:",
        r"uid:e::::1577836800::BB8B::Old \x3a Partner <Old@Partner.example>::::::::::0:",
        "pub:u:2048:1:AAAA:1700000000:::u:::scESC::::::::0:",
        "fpr:::::::::1111111111111111111111111111111111111111:",
        "uid:r::::1700000000::CC::Gone <gone@x.example>::::::::::0:",
        r"uid:u::::1700000000::DD::Dr \x3a X <X@Clinic.example>::::::::::0:",
        "sub:u:2048:1:BBBB:1700000000::::::e::::::::",
        "fpr:::::::::2222222222222222222222222222222222222222:",
    ])
    old, rsa = parse_key_listing(text, now=now)
    assert old.expired and not old.can_encrypt and old.secret and old.algo == "ed25519"
    assert old.uids == ()  # an expired user ID names nobody
    assert rsa.fingerprint == "1" * 40 and rsa.algo == "rsa2048" and rsa.expires is None
    assert rsa.uids == ("Dr : X <X@Clinic.example>",) and rsa.addresses == ("x@clinic.example",)
    assert rsa.usable_for_encryption and not rsa.secret
