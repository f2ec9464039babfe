"""The watcher thread against a real Dovecot: IDLE, polling, restarts, cut connections, stop.

Waits use generous timeouts on observable outcomes (messages filed, INBOX empty), never
assertions on elapsed time.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mailhub.ingress.imap_watcher import ImapConnectError, ImapWatcher, file_copy
from tests.ingress.dovecot import Dovecot
from tests.ingress.imap_support import (
    PROTECTION,
    GatedHub,
    MemoryHub,
    client_for,
    drop,
    folder_bodies,
    header,
    make_message,
    settings_for,
    wait_until,
)
from tests.ingress.tcp_proxy import CuttingProxy

CASE = "MT-2026-0042"
PATIENT = "Jan Novak"


@pytest.fixture
def watchers() -> Iterator[list[ImapWatcher]]:
    """Watchers started by a test, always stopped at its end."""
    started: list[ImapWatcher] = []
    yield started
    for w in started:
        w.stop(timeout=10)


def case_folder(server: Dovecot) -> str:
    return f"Cases{server.separator}{CASE} {PATIENT}"


def filed_exactly_once(server: Dovecot, *messages: bytes) -> bool:
    bodies = folder_bodies(server, case_folder(server))
    return len(bodies) == len(messages) and all(
        bodies.count(PROTECTION + m) == 1 for m in messages)


def test_idle_wakes_the_watcher_without_waiting_for_the_poll(
        dovecot: Dovecot, memory_hub: MemoryHub, watchers: list[ImapWatcher]) -> None:
    c = client_for(dovecot)
    assert c.has_capability("IDLE")
    c.logout()
    watcher = ImapWatcher(settings_for(dovecot, poll_interval=3600.0), memory_hub.ingest)
    watchers.append(watcher)
    watcher.start()
    wait_until(watcher.idling.is_set, what="the watcher to enter IDLE")
    passes = watcher.stats.passes
    msg = make_message(CASE, PATIENT, "idle")
    drop(dovecot, msg)  # only IDLE can bring this in: the next poll is an hour away
    # filed, then removed from INBOX, then the pass ends: wait for all three (no race)
    wait_until(lambda: filed_exactly_once(dovecot, msg) and folder_bodies(dovecot, "INBOX") == []
               and watcher.stats.passes > passes, what="IDLE to deliver the message")
    assert watcher.stats.reconnects == 0 and watcher.stats.passes == passes + 1


def test_polls_when_the_server_has_neither_idle_nor_uidplus(
        memory_hub: MemoryHub, watchers: list[ImapWatcher]) -> None:
    with Dovecot(capability="IMAP4rev1 LITERAL+ NAMESPACE") as server:
        c = client_for(server)
        caps = set(c.capabilities())
        c.logout()
        assert b"IDLE" not in caps and b"UIDPLUS" not in caps
        # A message a user marked \Deleted whose ingest fails must survive other expunges.
        memory_hub.failing.add("POISON")
        bad = make_message(CASE, PATIENT, "POISON")
        drop(server, bad, flags=(b"\\Deleted",))
        watcher = ImapWatcher(settings_for(server, poll_interval=0.1), memory_hub.ingest)
        watchers.append(watcher)
        watcher.start()
        wait_until(lambda: watcher.stats.failed >= 1, what="the failing message")
        good = make_message(CASE, PATIENT, "polled")
        drop(server, good)
        wait_until(lambda: filed_exactly_once(server, good), what="polling to file the message")
        passes = watcher.stats.passes
        wait_until(lambda: watcher.stats.passes >= passes + 3, what="more polls")
        watcher.stop()
        assert bad in folder_bodies(server, "INBOX")  # not expunged along with the filed one
        assert sum("POISON" not in o for o in _subjects(memory_hub)) == 1  # good: once only

        # Once the bad one can be ingested, both leave the INBOX and each is filed once.
        memory_hub.failing.clear()
        stats = ImapWatcher(settings_for(server), memory_hub.ingest).run_once()
        assert (stats.filed, stats.already_filed) == (1, 1)
        assert filed_exactly_once(server, good, bad)
        assert folder_bodies(server, "INBOX") == []


def _subjects(hub: MemoryHub) -> list[str]:
    return [header(raw, "Subject") for raw in hub.ingested]


def test_dovecot_restart_while_idle(
        dovecot: Dovecot, memory_hub: MemoryHub, watchers: list[ImapWatcher]) -> None:
    first = make_message(CASE, PATIENT, "before restart")
    drop(dovecot, first)
    watcher = ImapWatcher(settings_for(dovecot), memory_hub.ingest)
    watchers.append(watcher)
    watcher.start()
    wait_until(lambda: filed_exactly_once(dovecot, first), what="the first message")

    dovecot.restart()
    later = [make_message(CASE, PATIENT, f"after restart {i}") for i in range(3)]
    drop(dovecot, *later)

    wait_until(lambda: filed_exactly_once(dovecot, first, *later)
               and folder_bodies(dovecot, "INBOX") == [], what="messages after restart")
    assert watcher.stats.reconnects >= 1
    assert len(memory_hub.origins) == 4 and len(memory_hub.store) == 4  # each ingested once


def test_dovecot_restart_between_ingest_and_append(
        dovecot: Dovecot, watchers: list[ImapWatcher]) -> None:
    hub = GatedHub(gate="GATE")
    messages = [make_message(CASE, PATIENT, f"m{i}") for i in range(3)]
    gated = make_message(CASE, PATIENT, "GATE")
    drop(dovecot, messages[0], gated, *messages[1:])
    watcher = ImapWatcher(settings_for(dovecot), hub.ingest)
    watchers.append(watcher)
    watcher.start()
    assert hub.reached.wait(30), "the watcher never reached the gated message"
    dovecot.restart(graceful=False)  # the server dies while the hub holds the message
    hub.proceed.set()

    wait_until(lambda: filed_exactly_once(dovecot, gated, *messages)
               and folder_bodies(dovecot, "INBOX") == [], what="all messages")
    assert watcher.stats.reconnects >= 1
    assert len(hub.store) == 4  # the re-ingest of the gated message was deduplicated


def test_connection_cut_mid_fetch_loses_and_doubles_nothing(
        dovecot: Dovecot, memory_hub: MemoryHub, watchers: list[ImapWatcher]) -> None:
    big = make_message(CASE, PATIENT, "scan", body_size=300_000)
    small = make_message(CASE, PATIENT, "note")
    drop(dovecot, big, small)
    proxy = CuttingProxy(dovecot.host, dovecot.port, trigger=b"FETCH", cut_after=4000)
    try:
        watcher = ImapWatcher(settings_for(dovecot, port=proxy.port), memory_hub.ingest)
        watchers.append(watcher)
        watcher.start()
        wait_until(lambda: filed_exactly_once(dovecot, big, small), what="both messages")
        assert proxy.cuts_done == 1 and proxy.connections >= 2
        assert watcher.stats.reconnects >= 1
        assert folder_bodies(dovecot, "INBOX") == []
        assert len(memory_hub.origins) == 2  # the cut FETCH never reached ingest
    finally:
        watcher.stop()
        proxy.close()


def test_stop_ends_the_thread_and_logs_out(
        dovecot: Dovecot, memory_hub: MemoryHub) -> None:
    watcher = ImapWatcher(settings_for(dovecot), memory_hub.ingest)
    watcher.start()
    wait_until(lambda: watcher.stats.passes >= 1, what="the first pass")
    watcher.stop(timeout=10)
    assert not watcher.running
    wait_until(lambda: "Logged out" in dovecot.log_text, what="a clean IMAP logout")


def test_starttls_watcher_files_a_copy_and_wakes_from_idle(
        memory_hub: MemoryHub, watchers: list[ImapWatcher]) -> None:
    with Dovecot(tls=True) as server:
        settings = settings_for(server, tls="starttls", ca_file=server.ca_file)
        sent = make_message(CASE, PATIENT, "sent over smtp")
        file_copy(settings, CASE, PATIENT, sent)
        # Without the certificate in the trust store the connection is refused, not downgraded.
        with pytest.raises(ImapConnectError, match="STARTTLS with IMAP server .*certificate"):
            file_copy(settings_for(server, tls="starttls"), CASE, PATIENT, sent)

        watcher = ImapWatcher(settings, memory_hub.ingest)
        watchers.append(watcher)
        watcher.start()
        wait_until(watcher.idling.is_set, what="the watcher to enter IDLE over TLS")
        received = make_message(CASE, PATIENT, "received")
        drop(server, received)
        folder = f"Cases{server.separator}{CASE} {PATIENT}"
        wait_until(lambda: len(folder_bodies(server, folder)) == 2, what="the IDLE delivery")
        assert sorted(folder_bodies(server, folder)) == sorted([sent, PROTECTION + received])
        assert watcher.stats.reconnects == 0
