"""Autocrypt Level 1: header parsing and writing, peer-state updates, recommendations."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

import pytest

from mailhub.crypto.autocrypt import (
    AutocryptError,
    AutocryptHeader,
    PeerState,
    make_header,
    parse_header,
    recommend,
    select_header,
    unfold,
    update_peer,
)
from mailhub.crypto.openpgp import Keyring
from tests.crypto.pgp_fixtures import gpg_cli, throwaway_home

T0 = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)
NOW = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def keys() -> Iterator[tuple[bytes, bytes]]:
    """(binary public key, binary secret key) of a fresh key."""
    with throwaway_home() as home:
        kr = Keyring(Path(home))
        k = kr.generate_key("Patient <Jane@Patient.example>")
        secret = gpg_cli(home, "--export-secret-keys", k.fingerprint).stdout
        yield kr.export_public_binary(k.fingerprint), secret


def test_make_and_parse_round_trip(keys: tuple[bytes, bytes]) -> None:
    public, _ = keys
    value = make_header("hub@medvoyage.example", public, prefer_encrypt=True)
    assert all(len(line) <= 78 - len("Autocrypt: ") for line in value.split("\r\n")[:1])
    assert all(len(line) <= 78 for line in value.split("\r\n"))
    assert all(line.startswith(" ") for line in value.split("\r\n")[1:])
    assert parse_header(value) == AutocryptHeader("hub@medvoyage.example", "mutual", public)
    plain = make_header("hub@medvoyage.example", public, prefer_encrypt=False)
    assert "prefer-encrypt" not in plain
    assert parse_header(plain).prefer_encrypt == "nopreference"  # type: ignore[union-attr]


def test_header_survives_an_email_message(keys: tuple[bytes, bytes]) -> None:
    public, _ = keys
    msg = EmailMessage()
    msg["Autocrypt"] = unfold(make_header("hub@medvoyage.example", public, True))
    msg.set_content("x")
    raw = msg.as_bytes(policy=policy.SMTP)
    assert all(len(line) <= 78 for line in raw.split(b"\r\n"))
    again = BytesParser(policy=policy.default).parsebytes(raw)
    assert parse_header(str(again["Autocrypt"])).keydata == public  # type: ignore[union-attr]


def test_parse_rules(keys: tuple[bytes, bytes]) -> None:
    public, secret = keys
    kd = base64.b64encode(public).decode()
    ok = parse_header(f"addr=Jane@Patient.example; prefer-encrypt=MUTUAL; _extra=1; keydata={kd}")
    assert ok is not None and ok.addr == "jane@patient.example" and ok.prefer_encrypt == "mutual"
    odd = parse_header(f"addr=jane@patient.example; prefer-encrypt=always; keydata={kd}")
    assert odd is not None and odd.prefer_encrypt == "nopreference"
    assert parse_header(f"addr=jane@patient.example; future-critical=1; keydata={kd}") is None
    for bad, why in [
        (f"keydata={kd}", "addr"),
        ("addr=jane@patient.example", "no keydata"),
        ("addr=jane@patient.example; keydata=!!!not base64!!!", "base64"),
        (f"addr=jane@patient.example; keydata={base64.b64encode(secret).decode()}",
         "not an OpenPGP public key"),
        (f"addr=a@b.example; addr=c@d.example; keydata={kd}", "repeats"),
        ("garbage without equals", "without a value"),
    ]:
        with pytest.raises(AutocryptError, match=why):
            parse_header(bad)
    with pytest.raises(AutocryptError):
        make_header("hub@medvoyage.example", secret, True)


def test_select_header_needs_exactly_one_for_the_sender(keys: tuple[bytes, bytes]) -> None:
    public, _ = keys
    jane = make_header("jane@patient.example", public, True)
    other = make_header("other@patient.example", public, True)
    assert select_header([jane], "Jane@Patient.example") is not None
    assert select_header([other], "jane@patient.example") is None
    assert select_header([jane, jane], "jane@patient.example") is None
    assert select_header(["garbage", jane], "jane@patient.example") is not None


def test_peer_state_updates(keys: tuple[bytes, bytes]) -> None:
    public, _ = keys
    header = AutocryptHeader("jane@patient.example", "mutual", public)
    s1 = update_peer(None, header, T0, "Jane@Patient.example", now=NOW)
    assert s1 == PeerState("jane@patient.example", T0, T0, public, "mutual")
    # An older message changes nothing, with or without a header.
    older = AutocryptHeader("jane@patient.example", "nopreference", b"\x99old")
    assert update_peer(s1, older, T0 - timedelta(days=1), "jane@patient.example", now=NOW) == s1
    assert update_peer(s1, None, T0 - timedelta(days=1), "jane@patient.example", now=NOW) == s1
    # A newer message without a header only moves last_seen.
    s2 = update_peer(s1, None, T0 + timedelta(days=3), "jane@patient.example", now=NOW)
    assert s2.last_seen == T0 + timedelta(days=3) and s2.public_key == public
    assert s2.autocrypt_timestamp == T0
    # A header for another address is ignored; a future Date counts as now.
    s3 = update_peer(s2, AutocryptHeader("x@y.example", "mutual", b"\x99x"),
                     NOW + timedelta(days=30), "jane@patient.example", now=NOW)
    assert s3.last_seen == NOW and s3.public_key == public
    s4 = update_peer(None, None, None, "new@patient.example", now=NOW)
    assert s4.public_key is None and s4.last_seen == NOW
    naive = update_peer(None, header, datetime(2026, 11, 2, 9, 0), "jane@patient.example",
                        now=NOW)
    assert naive.autocrypt_timestamp == datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


def test_recommendation(keys: tuple[bytes, bytes]) -> None:
    public, _ = keys
    fresh = PeerState("jane@patient.example", T0, T0, public, "mutual")
    assert recommend(fresh, own_prefer_mutual=True) == "encrypt"
    assert recommend(fresh, own_prefer_mutual=False) == "available"
    stale = PeerState("jane@patient.example", T0 + timedelta(days=40), T0, public, "mutual")
    assert recommend(stale, own_prefer_mutual=True) == "discourage"
    assert recommend(stale, own_prefer_mutual=True, reply_to_encrypted=True) == "encrypt"
    assert recommend(None, own_prefer_mutual=True) == "disable"
    assert recommend(PeerState("a@b.example", T0), own_prefer_mutual=True) == "disable"
