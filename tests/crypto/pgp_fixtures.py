"""Helpers for the OpenPGP tests: throwaway GNUPGHOMEs and a plain `gpg` CLI "partner".

The partner side is driven through the gpg command line only, never through mailhub's code, so
interop tests compare the hub against real gpg. Homes live under /tmp with a short prefix so the
agent's socket path stays short.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

from mailhub.crypto.openpgp import KeyInfo, Keyring, kill_agent

CORPUS = Path(__file__).resolve().parents[2] / ".." / "shared" / "conformance" / "rt-crypt"
CORPUS_PGP = CORPUS / "gnupg"
RT_SIGNER = "F0CB3B482CFA485680A4A0BDD328035D84881F1B"  # rt-test@example.com (see NOTICE)
RT_PASSPHRASE = "rt-test"


def new_home() -> str:
    return tempfile.mkdtemp(prefix="mhg", dir="/tmp")


@contextmanager
def throwaway_home() -> Iterator[str]:
    home = new_home()
    try:
        yield home
    finally:
        kill_agent(home)
        shutil.rmtree(home, ignore_errors=True)


def gpg_cli(home: str, *args: str, data: bytes = b"",
            check: bool = True) -> subprocess.CompletedProcess[bytes]:
    """Plain gpg, as a partner clinic would run it."""
    cmd = ["gpg", "--homedir", home, "--batch", "--no-tty", "--pinentry-mode", "loopback",
           "--passphrase", "", "--status-fd", "2", *args]
    proc = subprocess.run(cmd, input=data, capture_output=True, check=False, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"gpg {' '.join(args)} failed: {proc.stderr.decode()[-800:]}")
    return proc


def cli_primary_fpr(home: str, who: str) -> str:
    out = gpg_cli(home, "--with-colons", "--list-keys", who).stdout.decode()
    return re.search(r"^fpr:+([0-9A-F]{40}):", out, re.M).group(1)  # type: ignore[union-attr]


def cli_make_key(home: str, uid: str, *, sign_subkey: bool = True) -> tuple[str, str | None]:
    """A partner key made by the gpg CLI: cert-only primary, signing and encryption subkeys.

    Returns (primary fingerprint, signing subkey fingerprint) so tests can check the hub reports
    the PRIMARY fingerprint although the subkey made the signature.
    """
    usage = "cert" if sign_subkey else "sign,cert"
    gpg_cli(home, "--quick-gen-key", uid, "ed25519", usage, "2y")
    fpr = cli_primary_fpr(home, uid)
    sub = None
    if sign_subkey:
        gpg_cli(home, "--quick-add-key", fpr, "ed25519", "sign", "2y")
    gpg_cli(home, "--quick-add-key", fpr, "cv25519", "encr", "2y")
    if sign_subkey:
        lines = gpg_cli(home, "--with-colons", "--list-keys", fpr).stdout.decode().splitlines()
        for line, nxt in zip(lines, lines[1:], strict=False):
            fields = line.split(":")
            if fields[0] == "sub" and "s" in fields[11]:
                sub = nxt.split(":")[9]
    return fpr, sub


@dataclass
class Parties:
    """A hub keyring and a partner using the gpg CLI, each knowing the other's public key."""

    hub: Keyring
    hub_key: KeyInfo
    partner_home: str
    partner_fpr: str
    partner_sign_subkey: str | None


@contextmanager
def parties() -> Iterator[Parties]:
    with throwaway_home() as hub_home, throwaway_home() as partner_home:
        hub = Keyring(Path(hub_home))
        hub_key = hub.generate_key("Medvoyage Hub <hub@medvoyage.example>")
        fpr, sub = cli_make_key(partner_home, "Dr Clinic <doc@clinic-a.example>")
        hub.import_public(gpg_cli(partner_home, "--armor", "--export", fpr).stdout)
        gpg_cli(partner_home, "--import", data=hub.export_public(hub_key.fingerprint).encode())
        yield Parties(hub, hub_key, partner_home, fpr, sub)


def parse(raw: bytes) -> EmailMessage:
    return BytesParser(policy=policy.default).parsebytes(raw)  # type: ignore[return-value]


def status_lines(proc: subprocess.CompletedProcess[bytes]) -> list[list[str]]:
    return [ln[9:].split(" ") for ln in proc.stderr.decode("utf-8", "replace").splitlines()
            if ln.startswith("[GNUPG:] ")]


def validsig_primary(proc: subprocess.CompletedProcess[bytes]) -> str | None:
    """The primary fingerprint in gpg's VALIDSIG line, if a good signature was seen."""
    for s in status_lines(proc):
        if s[0] == "VALIDSIG":
            return s[10]
    return None


def sample_message(subject: str = "[MT-2026-0042] Hüftprothese: pre-op plan") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "Coordinator <coord@medvoyage.example>"
    msg["To"] = "Dr Clinic <doc@clinic-a.example>"
    msg["Cc"] = "second@clinic-a.example"
    msg["Bcc"] = "hidden-boss@medvoyage.example"
    msg["Subject"] = subject
    msg["Date"] = "Mon, 23 Nov 2026 10:00:00 +0000"
    msg["Message-ID"] = "<case-42.1@medvoyage.example>"
    msg["In-Reply-To"] = "<case-42.0@clinic-a.example>"
    msg["References"] = "<case-42.0@clinic-a.example>"
    msg["User-Agent"] = "Thunderbird 128"
    msg.set_content("Dear doctor,\nFrom the patient: fasting from 22:00 \nGrüße\n")
    msg.add_attachment(b"%PDF-1.4\x00\xff\xfe binary lab results", maintype="application",
                       subtype="pdf", filename="labs.pdf")
    return msg
