"""Real-world OpenPGP mail (Request Tracker's corpus: mutt, Thunderbird/Enigmail) through unwrap.

The corpus and its keys stay in the shared folder beside the checkout (see its NOTICE): mail to
rt-recipient@example.com, signed by rt-test@example.com (F0CB3B48...), passphrase "rt-test".
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from mailhub.crypto.openpgp import Keyring
from mailhub.crypto.pgp_inbound import unwrap
from mailhub.errors import DecryptionFailed
from tests.crypto.pgp_fixtures import CORPUS_PGP, RT_PASSPHRASE, RT_SIGNER, throwaway_home

EMAILS = CORPUS_PGP / "emails"
KEYS = CORPUS_PGP / "keys"
FAVICON_MD5 = "1e35f1aa90c98ca2bab85c26ae3e1ba7"
ZANZIBAR = b"The magic word is:  zanzibar."
# ID -> (encryption, signature when the signer's public key is known)
EXPECTED = {
    1: ("none", "verified"), 2: ("none", "verified"), 3: ("none", "verified"),
    4: ("none", "verified"), 5: ("none", "verified"), 6: ("none", "verified"),
    7: ("openpgp", "none"), 8: ("openpgp", "none"), 9: ("openpgp", "none"),
    10: ("openpgp", "none"), 11: ("openpgp", "none"), 12: ("openpgp", "none"),
    13: ("openpgp", "verified"), 14: ("openpgp", "verified"), 15: ("openpgp", "verified"),
    16: ("openpgp", "verified"), 17: ("openpgp", "verified"), 18: ("openpgp", "verified"),
    19: ("none", "verified"), 20: ("openpgp", "verified"),
}
FILES = sorted(EMAILS.glob("*.txt"), key=lambda p: int(p.name.split("-")[0]))


def _home(with_signer: bool, *, cache: bool = True) -> Iterator[str]:
    with throwaway_home() as home:
        kr = Keyring(Path(home))
        # Test-only: the agent re-protects the imported key with a cheap S2K count, so the 40
        # decryptions below do not each pay a ~0.4 s key derivation.
        with open(kr.home / "gpg-agent.conf", "a") as conf:
            conf.write("s2k-count 65536\n" + ("" if cache else "default-cache-ttl 0\n"
                                                "max-cache-ttl 0\n"))
        # protected: these tests hand gpg the corpus's passphrase on every use
        kr.import_secret((KEYS / "rt-recipient-at-example.com.secret.key").read_bytes(),
                         unattended=False)
        if with_signer:
            kr.import_public((KEYS / "rt-test-at-example.com.public.key").read_bytes())
        yield home


@pytest.fixture(scope="module")
def home() -> Iterator[str]:
    yield from _home(True)


@pytest.fixture(scope="module")
def home_without_signer() -> Iterator[str]:
    yield from _home(False)


def test_corpus_is_complete() -> None:
    assert [int(p.name.split("-")[0]) for p in FILES] == list(range(1, 21))


def _top_text(msg: EmailMessage) -> str:
    part = next(p for p in msg.walk() if p.get_content_type() == "text/plain")
    return part.get_content()


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name.split("-")[0])
def test_corpus_mail(home: str, path: Path) -> None:
    n = int(path.name.split("-")[0])
    u = unwrap(path.read_bytes(), gnupghome=home, passphrase=RT_PASSPHRASE)
    assert (u.encryption, u.signature) == EXPECTED[n]
    assert u.was_pgp
    assert u.signer == (RT_SIGNER if EXPECTED[n][1] == "verified" else None)
    assert u.message["Subject"] == f"Test Email ID:{n}"
    assert re.search(rf"\bID:{n}\b", _top_text(u.message))
    payloads = [p.get_payload(decode=True) or b"" for p in u.message.walk()
                if not p.is_multipart()]
    assert not any(b"-----BEGIN PGP MESSAGE-----" in p for p in payloads)
    if "attachment" in path.name:
        assert any(ZANZIBAR in p for p in payloads)
    if "binary" in path.name:
        assert FAVICON_MD5 in {hashlib.md5(p).hexdigest() for p in payloads}


@pytest.mark.parametrize("path", [p for p in FILES if "signed" in p.name],
                         ids=lambda p: p.name.split("-")[0])
def test_corpus_signer_unknown(home_without_signer: str, path: Path) -> None:
    u = unwrap(path.read_bytes(), gnupghome=home_without_signer, passphrase=RT_PASSPHRASE)
    n = int(path.name.split("-")[0])
    assert (u.encryption, u.signature, u.signer) == (EXPECTED[n][0], "unknown-key", None)


@pytest.mark.parametrize("name", ["binary-asc-attach-marked-plain-text.txt",
                                  "inline-binary-attachment-with-wrap.txt"])
def test_encrypted_attachment_in_a_plaintext_mail(home: str, name: str) -> None:
    u = unwrap((EMAILS / "special" / name).read_bytes(), gnupghome=home,
               passphrase=RT_PASSPHRASE)
    assert u.was_pgp
    assert (u.encryption, u.signature) == ("none", "none")  # the body itself was plaintext
    png = next(p for p in u.message.walk() if p.get_filename() == "favicon.png")
    assert png.get_content_type() == "image/png"
    assert hashlib.md5(png.get_payload(decode=True)).hexdigest() == FAVICON_MD5


def test_quoted_signature_is_not_a_signature(home: str) -> None:
    u = unwrap((EMAILS / "special" / "quoted_inline_signature.txt").read_bytes(),
               gnupghome=home, passphrase=RT_PASSPHRASE)
    assert (u.encryption, u.signature, u.was_pgp) == ("none", "none", False)


def test_corpus_mail_with_crlf_line_ends(home: str) -> None:
    """As it arrives over SMTP: the detached .sig of ID:5 was made over LF text."""
    for n in (1, 5, 13):
        raw = FILES[n - 1].read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        u = unwrap(raw, gnupghome=home, passphrase=RT_PASSPHRASE)
        assert (u.encryption, u.signature) == EXPECTED[n]


def test_without_the_passphrase_nothing_is_returned() -> None:
    for home in _home(False, cache=False):
        with pytest.raises(DecryptionFailed, match="cannot decrypt"):
            unwrap(FILES[6].read_bytes(), gnupghome=home)
        u = unwrap(FILES[6].read_bytes(), gnupghome=home, passphrase=RT_PASSPHRASE)
        assert u.encryption == "openpgp"
        with pytest.raises(DecryptionFailed):
            unwrap(FILES[6].read_bytes(), gnupghome=home, passphrase="wrong")
