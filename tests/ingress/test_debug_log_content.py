"""--debug (or level DEBUG) shows mailhub's own debug lines, never case mail or secrets.

Some libraries dump what passes through them at DEBUG: imapclient (through imaplib) every line
the IMAP server sends, so every fetched message; SQLAlchemy, if its loggers were let down to
DEBUG, every row it reads (password hashes). The serving
process is driven here in a subprocess with ``configure("DEBUG", debug=True)`` against a real
Dovecot and a real database, and its whole log is searched."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.ingress.dovecot import Dovecot
from tests.ingress.imap_support import drop

SECRET = "hiv-viral-load-41000"
PASSWORD = "coordinator pass 7"

SCRIPT = """
import json, sys
from mailhub.logging_setup import configure
configure("DEBUG", debug=True)
from sqlmodel import Session, select
from mailhub.ingress.auth import hash_password, verify_password
from mailhub.ingress.imap_session import ImapSettings, connect
from mailhub.store.db import make_engine, migrate
from mailhub.store.models import User

args = json.loads(sys.argv[1])
client = connect(ImapSettings(host=args["host"], port=args["port"], username=args["user"],
                              password=args["password"], tls="off", timeout=10))
client.select_folder("INBOX")
for data in client.fetch(client.search("ALL"), ["BODY.PEEK[]"]).values():
    client.append("INBOX", data[b"BODY[]"])  # as filing into a case folder does
client.logout()

engine = make_engine("sqlite:///" + args["db"])
migrate(engine)
with Session(engine) as session:
    session.add(User(email="coord@medvoyage.example", password_hash=hash_password(args["pw"])))
    session.commit()
with Session(engine) as session:
    user = session.exec(select(User)).one()
    assert verify_password(args["pw"], user.password_hash)
    print(user.password_hash)
"""


def test_debug_log_carries_no_mail_content_nor_password_hashes(dovecot: Dovecot,
                                                               tmp_path) -> None:  # type: ignore[no-untyped-def]
    drop(dovecot, (f"From: patient@home.example\r\nTo: intake@medvoyage.example\r\n"
                   f"Subject: results {SECRET}\r\n\r\nViral load: {SECRET}\r\n").encode())
    args = {"host": dovecot.host, "port": dovecot.port, "user": dovecot.username,
            "password": dovecot.password, "db": str(tmp_path / "hub.db"), "pw": PASSWORD}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(args)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stored_hash = proc.stdout.strip().splitlines()[-1]
    log = proc.stderr
    assert " DEBUG " in log  # debugging is on: the lines exist, only content is kept out
    assert SECRET not in log
    assert stored_hash not in log and stored_hash.split("$")[-1] not in log
    assert PASSWORD not in log and dovecot.password not in log
