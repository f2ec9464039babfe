"""ImapWatcher.run_once against a real Dovecot: filing, failures, unfiled mail, crash recovery."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailhub.cases.imap_folders import to_crlf
from mailhub.config import ImapConfig
from mailhub.ingress.imap_watcher import (
    UNFILED_KEYWORD,
    Backoff,
    ImapConnectError,
    ImapSettings,
    ImapWatcher,
    RetryMemo,
    file_copy,
)
from tests.ingress.dovecot import Dovecot
from tests.ingress.imap_support import (
    PROTECTION,
    MemoryHub,
    client_for,
    drop,
    folder_bodies,
    make_message,
    settings_for,
)


def test_backoff_doubles_to_the_cap_and_resets() -> None:
    b = Backoff(1, 60)
    assert [b.next() for _ in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    b.reset()
    assert b.next() == 1


def test_retry_memo_waits_longer_each_failure_and_forgets_old_uidvalidity() -> None:
    now = [100.0]
    memo = RetryMemo(10, 25, lambda: now[0])
    key = ("INBOX", 7, 42)
    assert memo.ready(key)
    assert memo.failed(key) == 10 and not memo.ready(key)
    now[0] += 10
    assert memo.ready(key)
    assert memo.failed(key) == 20 and memo.failed(key) == 25
    memo.prune("INBOX", 7)
    assert len(memo) == 1
    memo.prune("INBOX", 8)  # the folder was recreated: old UIDs mean nothing
    assert len(memo) == 0


def test_messages_are_ingested_once_filed_into_case_folders_and_removed(
        dovecot: Dovecot, memory_hub: MemoryHub) -> None:
    a = make_message("MT-2026-0042", "Jan Novak", "a")
    b = make_message("MT-2026-0042", "Jan Novak", "b")
    c = make_message("MT-2026-0043", "Ayşe Yılmaz", "c")
    drop(dovecot, a, c)
    drop(dovecot, b, flags=(b"\\Seen", b"\\Flagged"))
    watcher = ImapWatcher(settings_for(dovecot), memory_hub.ingest)

    stats = watcher.run_once()

    assert (stats.ingested, stats.filed, stats.failed) == (3, 3, 0)
    assert len(memory_hub.origins) == 3 and len(memory_hub.store) == 3
    assert all(o.startswith(f"imap://intake%40medvoyage.example@127.0.0.1:{dovecot.port}/INBOX;")
               for o in memory_hub.origins)
    sep = dovecot.separator
    novak = folder_bodies(dovecot, f"Cases{sep}MT-2026-0042 Jan Novak")
    assert sorted(novak) == sorted([PROTECTION + a, PROTECTION + b])  # the hub's filed copy
    assert folder_bodies(dovecot, f"Cases{sep}MT-2026-0043 Ayşe Yılmaz") == [PROTECTION + c]
    assert folder_bodies(dovecot, "INBOX") == []
    # Flags travel with the message.
    cl = client_for(dovecot)
    cl.select_folder(f"Cases{sep}MT-2026-0042 Jan Novak", readonly=True)
    flags = {v[b"BODY[]"]: set(v[b"FLAGS"]) for v in
             cl.fetch(cl.search("ALL"), ["FLAGS", "BODY.PEEK[]"]).values()}
    cl.logout()
    assert {b"\\Seen", b"\\Flagged"} <= flags[PROTECTION + b]
    assert b"\\Seen" not in flags[PROTECTION + a]

    again = watcher.run_once()
    assert again.ingested == 0 and len(memory_hub.origins) == 3


def test_non_ascii_patient_names_on_a_slash_server(
        dovecot_slash: Dovecot, memory_hub: MemoryHub) -> None:
    names = {"MT-2026-0101": "Ørsted Ünal", "MT-2026-0102": "Αλέξανδρος Παππάς",
             "MT-2026-0103": "王小明"}
    messages = {cid: make_message(cid, name, cid) for cid, name in names.items()}
    drop(dovecot_slash, *messages.values())

    ImapWatcher(settings_for(dovecot_slash), memory_hub.ingest).run_once()

    for cid, name in names.items():
        assert folder_bodies(dovecot_slash, f"Cases/{cid} {name}") == [PROTECTION + messages[cid]]
    assert folder_bodies(dovecot_slash, "INBOX") == []


def test_a_failing_message_stays_in_place_others_proceed_and_it_is_retried_later(
        dovecot: Dovecot, memory_hub: MemoryHub) -> None:
    good = make_message("MT-2026-0042", "Jan Novak", "good")
    bad = make_message("MT-2026-0042", "Jan Novak", "POISON")
    later = make_message("MT-2026-0042", "Jan Novak", "later")
    drop(dovecot, good, bad, later)
    memory_hub.failing.add("POISON")
    now = [1000.0]
    watcher = ImapWatcher(settings_for(dovecot, retry_failed_initial=60.0),
                          memory_hub.ingest, clock=lambda: now[0])

    stats = watcher.run_once()
    assert (stats.filed, stats.failed) == (2, 1)
    assert folder_bodies(dovecot, "INBOX") == [bad]
    folder = f"Cases{dovecot.separator}MT-2026-0042 Jan Novak"
    assert sorted(folder_bodies(dovecot, folder)) == sorted([PROTECTION + good, PROTECTION + later])

    # Not retried hot: the next passes before the retry time leave it alone.
    calls = len(memory_hub.origins)
    assert watcher.run_once().deferred == 1
    assert len(memory_hub.origins) == calls

    # Once the cause is fixed and the retry time has come, it goes through.
    memory_hub.failing.clear()
    now[0] += 61
    assert watcher.run_once().filed == 1
    assert folder_bodies(dovecot, "INBOX") == []
    assert len(folder_bodies(dovecot, folder)) == 3


def test_mail_without_a_case_stays_marked_and_is_not_taken_again(
        dovecot: Dovecot, memory_hub: MemoryHub) -> None:
    stray = make_message(None, "Nobody", "newsletter")
    drop(dovecot, stray)
    watcher = ImapWatcher(settings_for(dovecot), memory_hub.ingest)
    assert watcher.run_once().unfiled == 1
    assert watcher.run_once().ingested == 0
    assert len(memory_hub.origins) == 1
    c = client_for(dovecot)
    c.select_folder("INBOX", readonly=True)
    uids = c.search("ALL")
    flags = c.get_flags(uids)
    c.logout()
    assert len(uids) == 1 and UNFILED_KEYWORD.encode() in flags[uids[0]]


def test_a_crash_between_append_and_delete_does_not_file_twice(
        dovecot: Dovecot, memory_hub: MemoryHub) -> None:
    raw = make_message("MT-2026-0042", "Jan Novak", "crash")
    drop(dovecot, raw)
    settings = settings_for(dovecot)
    # State left by a run that died after APPEND: ingested and filed, still in INBOX.
    result = memory_hub.ingest(raw, "previous run")
    assert result is not None and result.filed_bytes is not None
    folder = file_copy(settings, result.case_id, result.patient_name, result.filed_bytes)

    stats = ImapWatcher(settings, memory_hub.ingest).run_once()

    assert (stats.ingested, stats.filed, stats.already_filed) == (1, 0, 1)
    assert folder_bodies(dovecot, folder) == [PROTECTION + raw]
    assert folder_bodies(dovecot, "INBOX") == []
    assert len(memory_hub.store) == 1  # the store deduplicated the second ingest


def test_a_crash_between_store_deleted_and_expunge_is_finished(
        dovecot: Dovecot, memory_hub: MemoryHub) -> None:
    raw = make_message("MT-2026-0042", "Jan Novak", "half-deleted")
    drop(dovecot, raw, flags=(b"\\Deleted",))
    ImapWatcher(settings_for(dovecot), memory_hub.ingest).run_once()
    assert folder_bodies(dovecot, "INBOX") == []
    assert folder_bodies(dovecot, f"Cases{dovecot.separator}MT-2026-0042 Jan Novak") == [
        PROTECTION + raw]


def test_file_copy_files_smtp_mail_once_and_keeps_lf_messages_intact(dovecot: Dovecot) -> None:
    raw = make_message("MT-2026-0050", "Lena Roth", "sent").replace(b"\r\n", b"\n")
    settings = settings_for(dovecot)
    first = file_copy(settings, "MT-2026-0050", "Lena Roth", raw, flags=[b"\\Seen"])
    second = file_copy(settings, "MT-2026-0050", "Lena Roth", raw)
    assert first == second == f"Cases{dovecot.separator}MT-2026-0050 Lena Roth"
    assert folder_bodies(dovecot, first) == [to_crlf(raw)]


def test_several_watched_folders(dovecot: Dovecot, memory_hub: MemoryHub) -> None:
    c = client_for(dovecot)
    c.create_folder("Clinics")
    c.logout()
    drop(dovecot, make_message("MT-2026-0042", "Jan Novak", "inbox"))
    drop(dovecot, make_message("MT-2026-0042", "Jan Novak", "clinics"), folder="Clinics")
    # A watched folder that does not exist is reported and skipped; the others still work.
    stats = ImapWatcher(settings_for(dovecot, watch=("Missing", "INBOX", "Clinics")),
                        memory_hub.ingest).run_once()
    assert stats.filed == 2
    assert folder_bodies(dovecot, "Clinics") == []
    assert any("/Clinics;UIDVALIDITY=" in o for o in memory_hub.origins)


def test_connection_errors_say_what_to_check(dovecot: Dovecot) -> None:
    with pytest.raises(ImapConnectError, match="password_file"):
        file_copy(settings_for(dovecot, password="wrong"), "MT-1", "X", b"Subject: x\r\n\r\n")
    with pytest.raises(ImapConnectError, match="STARTTLS"):
        file_copy(settings_for(dovecot, tls="starttls"), "MT-1", "X", b"Subject: x\r\n\r\n")
    port = dovecot.port
    dovecot.stop(graceful=False)
    with pytest.raises(ImapConnectError, match=f"127.0.0.1:{port}"):
        file_copy(settings_for(dovecot), "MT-1", "X", b"Subject: x\r\n\r\n")


def test_settings_from_the_imap_config_section(tmp_path: Path, dovecot: Dovecot) -> None:
    pw = tmp_path / "imap.password"
    pw.write_text(dovecot.password + "\n")
    cfg = ImapConfig(host=dovecot.host, port=dovecot.port, tls="off",
                     username=dovecot.username, password_file=pw, watch=("INBOX",),
                     case_folder_prefix="Akten", poll_interval=45)
    settings = ImapSettings.from_config(cfg, timeout=5.0)
    assert (settings.password, settings.poll_interval, settings.timeout) == (
        dovecot.password, 45.0, 5.0)
    assert dovecot.password not in repr(settings)
    folder = file_copy(settings, "MT-2026-0042", "Jan Novak", b"Subject: x\r\n\r\nhi\r\n")
    assert folder == f"Akten{dovecot.separator}MT-2026-0042 Jan Novak"


def test_each_user_has_a_mailbox_of_its_own(dovecot: Dovecot, memory_hub: MemoryHub) -> None:
    other = dovecot.users[1]
    raw = make_message("MT-2026-0042", "Jan Novak", "to the coordinator")
    drop(dovecot, raw)
    coordinator = settings_for(dovecot, username=other.username, password=other.password)
    assert ImapWatcher(coordinator, memory_hub.ingest).run_once().ingested == 0
    assert folder_bodies(dovecot, "INBOX") == [raw]  # the intake mailbox is untouched
