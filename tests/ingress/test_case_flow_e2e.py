"""A case's whole conversation, as a coordinator lives it, against a real Dovecot.

A case opened from the command line collects: the patient's first message (SMTP inbound), the
coordinator's encrypted reply (submission), the clinic's encrypted answer to that reply (SMTP
inbound), and a message dropped into the watched IMAP inbox. All four show in `cases show` and in
the case's IMAP folder; no file of the hub holds a body in the clear.
"""

from __future__ import annotations

import json
import subprocess
from email.message import EmailMessage
from pathlib import Path

from imapclient import IMAPClient

from tests.conftest import Instance, RunningHub, SinkHandler, make_instance
from tests.deliver.test_relay_e2e import add_user, gpg, make_recipient, submit, wait_until
from tests.ingress.dovecot import Dovecot
from tests.ingress.test_inbound_e2e import send_raw

PATIENT = "ana.souza@example.org"
CLINIC = "records@clinic-a.example"
HUB = "intake@medvoyage.example"


def test_case_collects_the_whole_conversation(short_tmp: Path, sink: tuple[SinkHandler, int],
                                              dovecot: Dovecot) -> None:
    pw = short_tmp / "imap.pw"
    pw.write_text(dovecot.password + "\n")
    inst: Instance = make_instance(short_tmp / "hub", sink[1], **{
        "imap.host": '"127.0.0.1"', "imap.port": str(dovecot.port), "imap.tls": '"off"',
        "imap.username": f'"{dovecot.username}"', "imap.password_file": f'"{pw}"',
        "imap.poll_interval": "1"})
    add_user(inst)
    home, pub = make_recipient(short_tmp, CLINIC)
    assert inst.run("keys", "import", str(pub))[0] == 0
    hub_asc = short_tmp / "hub.asc"
    hub_asc.write_text(inst.run("keys", "export-hub")[1])
    assert gpg(home, "--import", str(hub_asc)).returncode == 0

    code, out, err = inst.run("cases", "open", "--patient-name", "Ana Souza", "--patient-email",
                              PATIENT, "--timezone", "America/Chicago", "--language", "en",
                              "--procedure", "hip-replacement", "--clinic", "Clinic A")
    assert code == 0, err
    case_id = out.strip()
    assert case_id.startswith("MT-")

    hub = RunningHub(inst.config).start()
    try:
        first = (f"From: Ana Souza <{PATIENT}>\r\nTo: {HUB}\r\nSubject: My hip surgery\r\n"
                 "Message-ID: <first@example.org>\r\n\r\nMARKER-FIRST when do I fly?\r\n").encode()
        assert send_raw(inst.inbound_port, PATIENT, HUB, first)[0] == 250

        reply = EmailMessage()
        reply["From"] = "coord@medvoyage.example"
        reply["To"] = CLINIC
        reply["Subject"] = f"[{case_id}] Travel dates for Ana"
        reply["Message-ID"] = "<coord-reply@medvoyage.example>"
        reply.set_content("MARKER-REPLY please confirm the 3rd")
        submit(inst, reply, [CLINIC])
        wait_until(lambda: any(m.rcpt_tos == [CLINIC] for m in sink[0].messages))

        inner = (b"Content-Type: text/plain\r\n\r\nMARKER-ANSWER confirmed for the 3rd\r\n")
        enc = gpg(home, "--armor", "--trust-model", "always", "--sign", "--encrypt",
                  "--local-user", CLINIC, "--recipient", "hub@medvoyage.example", data=inner)
        assert enc.returncode == 0, enc.stderr
        answer = (f"From: {CLINIC}\r\nTo: {HUB}\r\nSubject: Re: ...\r\n"
                  "Message-ID: <answer@clinic-a.example>\r\n"
                  "In-Reply-To: <coord-reply@medvoyage.example>\r\n"
                  "References: <coord-reply@medvoyage.example>\r\nMIME-Version: 1.0\r\n"
                  'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"; '
                  'boundary="B"\r\n\r\n--B\r\nContent-Type: application/pgp-encrypted\r\n\r\n'
                  "Version: 1\r\n\r\n--B\r\nContent-Type: application/octet-stream\r\n\r\n"
                  ).encode() + enc.stdout + b"\r\n--B--\r\n"
        assert send_raw(inst.inbound_port, CLINIC, HUB, answer)[0] == 250

        dropped = (f"From: {PATIENT}\r\nTo: {HUB}\r\nSubject: [{case_id}] one more thing\r\n"
                   "Message-ID: <dropped@example.org>\r\n\r\nMARKER-IMAP my passport\r\n").encode()
        with IMAPClient("127.0.0.1", dovecot.port, ssl=False) as c:
            c.login(dovecot.username, dovecot.password)
            c.append("INBOX", dropped)

        def shown() -> list[dict]:  # type: ignore[type-arg]
            code, out, _ = inst.run("cases", "show", case_id, "--json")
            return json.loads(out)["messages"] if code == 0 else []

        wait_until(lambda: len(shown()) >= 4, timeout=90)
        messages = shown()

        def folder_count() -> int:
            with IMAPClient("127.0.0.1", dovecot.port, ssl=False) as c:
                c.login(dovecot.username, dovecot.password)
                folders = [f[2] for f in c.list_folders() if case_id in f[2]]
                if not folders:
                    return 0
                c.select_folder(folders[0], readonly=True)
                return len(c.search("ALL"))

        def inbox_empty() -> bool:
            with IMAPClient("127.0.0.1", dovecot.port, ssl=False) as c:
                c.login(dovecot.username, dovecot.password)
                c.select_folder("INBOX", readonly=True)
                return c.search("ALL") == []

        # appended to the case folder first, removed from INBOX after: wait for both
        wait_until(lambda: folder_count() >= 4 and inbox_empty(), timeout=90)
    finally:
        hub.stop()

    ids = {m["message_id"] for m in messages}
    assert {"<first@example.org>", "<coord-reply@medvoyage.example>",
            "<answer@clinic-a.example>", "<dropped@example.org>"} <= ids
    by_id = {m["message_id"]: m for m in messages}
    assert by_id["<coord-reply@medvoyage.example>"]["direction"] == "out"
    assert by_id["<coord-reply@medvoyage.example>"]["encryption"] == "openpgp"
    assert by_id["<answer@clinic-a.example>"]["encryption"] == "openpgp"
    assert by_id["<answer@clinic-a.example>"]["signature"] == "verified"
    with IMAPClient("127.0.0.1", dovecot.port, ssl=False) as c:
        c.login(dovecot.username, dovecot.password)
        folder = [f for f in c.list_folders() if case_id in f[2]][0]
        assert folder[2].endswith(f"{case_id} Ana Souza")

    found = subprocess.run(["grep", "-rl", "MARKER-", str(inst.root)], capture_output=True,
                           text=True).stdout.split()
    assert found == [], f"plaintext bodies on disk: {found}"
