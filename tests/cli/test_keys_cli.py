"""`keys import-own`, `keys list` and `export-hub` as an administrator uses them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.conftest import Instance, RunningHub
from tests.deliver.test_relay_e2e import gpg, make_recipient
from tests.ingress.test_inbound_e2e import send_raw


def test_import_own_openpgp_key_rollover(instance: Instance, short_tmp: Path) -> None:
    old_fpr = json.loads(instance.run("keys", "list", "--json")[1])[0]["fingerprint"]
    org_home, _ = make_recipient(short_tmp, "hub@medvoyage.example")
    secret = short_tmp / "org-secret.asc"
    secret.write_bytes(gpg(org_home, "--armor", "--export-secret-keys").stdout)
    code, out, err = instance.run("keys", "import-own", str(secret))
    assert code == 0, err
    rows = json.loads(instance.run("keys", "list", "--json")[1])
    own = {r["fingerprint"] for r in rows if r["own"] and r["kind"] == "openpgp"}
    assert old_fpr in own and len(own) == 2
    exported = short_tmp / "exported.asc"
    exported.write_text(instance.run("keys", "export-hub")[1])
    listing = gpg(org_home, "--with-colons", "--import-options", "show-only", "--import",
                  str(exported)).stdout.decode()
    assert old_fpr not in listing  # the newest own key signs and is the one handed out

    # mail encrypted to the OLD hub key still opens during the rollover
    old_pub = subprocess.run(["gpg", "--homedir", str(instance.root / "keys" / "gnupg"),
                              "--armor", "--export", old_fpr], capture_output=True).stdout
    sender_home = short_tmp / "sender"
    sender_home.mkdir(mode=0o700)
    assert gpg(sender_home, "--import", data=old_pub).returncode == 0
    cipher = gpg(sender_home, "--armor", "--trust-model", "always", "--encrypt", "--recipient",
                 old_fpr, data=b"ROLLOVER-OK").stdout
    hub = RunningHub(instance.config).start()
    try:
        msg = (b"From: pat@example.org\r\nTo: intake@medvoyage.example\r\nSubject: s\r\n"
               b"Message-ID: <roll@example.org>\r\n\r\n" + cipher)
        code, text = send_raw(instance.inbound_port, "pat@example.org",
                              "intake@medvoyage.example", msg)
        assert code == 250, text
    finally:
        hub.stop()


def test_import_own_smime_and_export(instance: Instance, short_tmp: Path) -> None:
    key, crt = short_tmp / "org.key", short_tmp / "org.crt"
    r = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
                        "-keyout", str(key), "-out", str(crt), "-subj",
                        "/CN=Org/emailAddress=hub@medvoyage.example",
                        "-addext", "subjectAltName=email:hub@medvoyage.example"],
                       capture_output=True)
    assert r.returncode == 0, r.stderr
    code, out, err = instance.run("keys", "import-own", str(key), "--cert", str(crt))
    assert code == 0, err
    rows = json.loads(instance.run("keys", "list", "--json")[1])
    smime_own = [r for r in rows if r["own"] and r["kind"] == "smime"]
    assert len(smime_own) == 2
    assert any("expires within 30 days" in r["warning"] for r in smime_own)
    # a certificate without its key is refused clearly
    code, out, err = instance.run("keys", "import-own", str(crt))
    assert code == 1 and "Traceback" not in err


def test_import_own_refuses_a_passphrase_protected_key_and_says_how(instance: Instance,
                                                                    short_tmp: Path) -> None:
    """Imported as it is, a protected key would sign every outbound message and every
    signature would fail (all case mail held): it is refused, and nothing is imported."""
    before = instance.run("keys", "list", "--json")[1]
    org_home = short_tmp / "org"
    org_home.mkdir(mode=0o700)
    base = ["gpg", "--homedir", str(org_home), "--batch", "--pinentry-mode", "loopback",
            "--passphrase", "correct horse"]
    made = subprocess.run([*base, "--quick-gen-key", "Org <hub@medvoyage.example>", "ed25519",
                           "sign", "1y"], capture_output=True)
    assert made.returncode == 0, made.stderr
    fpr = subprocess.run(["gpg", "--homedir", str(org_home), "--with-colons", "--list-keys"],
                         capture_output=True, text=True).stdout
    fpr = next(line.split(":")[9] for line in fpr.splitlines() if line.startswith("fpr"))
    assert subprocess.run([*base, "--quick-add-key", fpr, "cv25519", "encr", "1y"],
                          capture_output=True).returncode == 0
    secret = short_tmp / "protected.asc"
    secret.write_bytes(subprocess.run([*base, "--armor", "--export-secret-keys", fpr],
                                      capture_output=True).stdout)
    assert b"PRIVATE KEY BLOCK" in secret.read_bytes()

    code, out, err = instance.run("keys", "import-own", str(secret))
    assert code != 0 and "Traceback" not in err
    assert f"the secret key {fpr} is protected by a passphrase" in err
    assert f"gpg --passwd {fpr}" in err  # what to do
    assert instance.run("keys", "list", "--json")[1] == before
    hub_keys = subprocess.run(["gpg", "--homedir", str(instance.root / "keys" / "gnupg"),
                               "--with-colons", "--list-secret-keys"], capture_output=True,
                              text=True).stdout
    assert fpr not in hub_keys

    # the same key without its passphrase goes in (the hint's 'gpg --passwd', answered in batch)
    unlocked = subprocess.run(["gpg", "--homedir", str(org_home), "--batch", "--pinentry-mode",
                               "loopback", "--command-fd", "0", "--passwd", fpr],
                              input=b"correct horse\n\n\n", capture_output=True)
    assert unlocked.returncode == 0, unlocked.stderr
    secret.write_bytes(subprocess.run(["gpg", "--homedir", str(org_home), "--batch",
                                       "--pinentry-mode", "loopback", "--passphrase", "",
                                       "--armor", "--export-secret-keys", fpr],
                                      capture_output=True).stdout)
    code, out, err = instance.run("keys", "import-own", str(secret))
    assert code == 0, err
    assert fpr in {r["fingerprint"] for r in json.loads(instance.run("keys", "list", "--json")[1])}


def test_import_with_address_binds_only_that_address(instance: Instance, short_tmp: Path) -> None:
    home, _ = make_recipient(short_tmp, "doc@clinic-a.example")
    fpr = gpg(home, "--with-colons", "--list-keys").stdout.decode().split("fpr:::::::::")[1][:40]
    assert gpg(home, "--quick-add-uid", fpr, "Not Me <anna@medvoyage.example>").returncode == 0
    pub = short_tmp / "two-uids.asc"
    pub.write_bytes(gpg(home, "--armor", "--export", fpr).stdout)
    code, out, err = instance.run("keys", "import", str(pub), "--address",
                                  "Doc@Clinic-A.example", "--json")
    assert code == 0, err
    assert [r["address"] for r in json.loads(out)] == ["doc@clinic-a.example"]
    rows = json.loads(instance.run("keys", "list", "--json")[1])
    assert {r["address"] for r in rows if not r["own"]} == {"doc@clinic-a.example"}


def test_a_revocation_of_a_key_in_use_is_taken_in(instance: Instance, short_tmp: Path) -> None:
    home, pub = make_recipient(short_tmp, "doc@clinic-a.example")
    assert instance.run("keys", "import", str(pub))[0] == 0
    fpr = gpg(home, "--with-colons", "--list-keys").stdout.decode().split("fpr:::::::::")[1][:40]
    rev = (home / "openpgp-revocs.d" / f"{fpr}.rev").read_text().replace("\n:-----", "\n-----")
    assert gpg(home, "--import", data=rev.encode()).returncode == 0
    revoked = short_tmp / "revoked.asc"
    revoked.write_bytes(gpg(home, "--armor", "--export", fpr).stdout)
    code, out, err = instance.run("keys", "import", str(revoked))
    assert code == 0, err
    assert "no new mail is encrypted to it" in out
    [row] = [r for r in json.loads(instance.run("keys", "list", "--json")[1]) if not r["own"]]
    assert (row["fingerprint"], row["warning"]) == (fpr, "revoked")
    # a revoked key the hub never held is still refused
    other, other_pub = make_recipient(short_tmp, "lab@clinic-b.example")
    ofpr = gpg(other, "--with-colons", "--list-keys").stdout.decode().split("fpr:::::::::")[1][:40]
    orev = (other / "openpgp-revocs.d" / f"{ofpr}.rev").read_text().replace("\n:-----", "\n-----")
    assert gpg(other, "--import", data=orev.encode()).returncode == 0
    other_pub.write_bytes(gpg(other, "--armor", "--export", ofpr).stdout)
    code, _, err = instance.run("keys", "import", str(other_pub))
    assert code != 0 and "revoked" in err
