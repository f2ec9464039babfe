"""The submission port served by a real spawned child process, as ``mailhub serve`` runs it.

The child answers over STARTTLS+AUTH, spools, and reports every spool id to the parent over its
pipe (in batches); each id reported is the one its 250 reply named.
"""

from __future__ import annotations

import asyncio
import base64
import smtplib
import ssl
from email.message import EmailMessage

from mailhub.app import Hub
from mailhub.config import load_config
from mailhub.ingress.shared_throttle import SharedFailureThrottle
from mailhub.ingress.submission_procs import SubmissionProcesses
from tests.conftest import Instance
from tests.deliver.test_relay_e2e import COORD, PASSWORD, add_user


def send_three(port: int) -> list[str]:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    queued = []
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
        s.starttls(context=ctx)
        s.login(COORD, PASSWORD)
        for n in range(3):
            msg = EmailMessage()
            msg["From"] = COORD
            msg["To"] = "desk@travel.example"
            msg["Subject"] = f"child {n}"
            msg["Message-ID"] = f"<child{n}@medvoyage.example>"
            msg.set_content(".leading dot\nline two\n")
            s.mail(COORD)
            s.rcpt("desk@travel.example")
            code, text = s.data(msg.as_bytes())
            assert code == 250, text
            queued.append(text.decode().rsplit(" ", 1)[-1])
        code, text = s.docmd("DATA")  # out of order after the session's messages: still clear
        assert code == 503 and text.startswith(b"5.5.1")
    return queued


def test_child_spools_and_reports_every_id(instance: Instance) -> None:
    add_user(instance)
    hub = Hub(load_config(instance.config))
    reported: list[tuple[str, str]] = []

    async def main() -> list[str]:
        got_three = asyncio.Event()

        def on_spooled(listener: str, spool_id: str) -> None:
            reported.append((listener, spool_id))
            if len(reported) == 3:
                got_three.set()

        procs = SubmissionProcesses(hub, 1)
        await procs.start(on_spooled)
        try:
            queued = await asyncio.to_thread(send_three, instance.submission_port)
            await asyncio.wait_for(got_three.wait(), 30)
        finally:
            await asyncio.to_thread(procs.stop)
        return queued

    queued = asyncio.run(main())
    assert len(set(queued)) == 3
    assert reported == [("submission", spool_id) for spool_id in queued]


def _wrong_password(port: int) -> int:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
        s.starttls(context=ctx)
        s.ehlo()
        bad = base64.b64encode(f"\0{COORD}\0wrong".encode()).decode()
        return s.docmd("AUTH", f"PLAIN {bad}")[0]


def test_auth_failures_are_counted_once_for_all_children(instance: Instance) -> None:
    """A client's connections land on any of the children: its failures add up in the table
    they share, so three children give a guesser no more tries than one."""
    add_user(instance)
    hub = Hub(load_config(instance.config))

    async def main() -> SubmissionProcesses:
        procs = SubmissionProcesses(hub, 3)
        await procs.start(lambda listener, spool_id: None)
        try:
            for _ in range(3):  # each on a connection of its own
                assert await asyncio.to_thread(_wrong_password, instance.submission_port) == 535
        finally:
            await asyncio.to_thread(procs.stop)
        return procs

    procs = asyncio.run(main())
    seen = SharedFailureThrottle(free_failures=hub.config.submission.auth_failures_before_delay,
                                 table=procs.failures)
    assert seen._get("127.0.0.1") is not None  # noqa: SLF001
    assert seen._get("127.0.0.1")[0] == 3  # noqa: SLF001
