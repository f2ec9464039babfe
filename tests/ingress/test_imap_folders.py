"""Case folder names (pure) and CaseFolders against a real Dovecot."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from imapclient import imap_utf7

from mailhub.cases.imap_folders import (
    CaseFolderError,
    CaseFolders,
    case_folder_name,
    message_id_of,
    search_key,
    to_crlf,
)
from tests.ingress.dovecot import Dovecot
from tests.ingress.imap_support import client_for, make_message


def test_name_is_prefix_separator_case_id_and_patient() -> None:
    assert case_folder_name("Cases", "/", "MT-2026-0042", "Ayşe Yılmaz") == (
        "Cases/MT-2026-0042 Ayşe Yılmaz")
    assert case_folder_name("Cases", ".", "MT-2026-0042", "Jan Novak") == (
        "Cases.MT-2026-0042 Jan Novak")


@pytest.mark.parametrize(("separator", "patient", "expected"), [
    (".", "Dr. J. Smith", "Cases.MT-1 Dr J Smith"),
    ("/", "Anne/Marie Curie", "Cases/MT-1 Anne Marie Curie"),
    (".", "Anne/Marie", "Cases.MT-1 Anne Marie"),  # "/" is refused by maildir anyway
    ("/", "Evil\r\nX-Header: 1\x00\ttab", "Cases/MT-1 Evil X-Header: 1 tab"),
    ("/", "50% *star*", "Cases/MT-1 50 star"),
    ("/", "  lots   of   space ", "Cases/MT-1 lots of space"),
    ("/", "", "Cases/MT-1"),
])
def test_separator_and_control_characters_in_the_name_are_neutralised(
        separator: str, patient: str, expected: str) -> None:
    assert case_folder_name("Cases", separator, "MT-1", patient) == expected


def test_no_hierarchy_and_nested_prefix() -> None:
    assert case_folder_name("Cases", None, "MT-1", "A. B") == "Cases MT-1 A. B"
    assert case_folder_name("Shared/Cases", "/", "MT-1", "A/B") == "Shared/Cases/MT-1 A B"


def test_strict_spelling_keeps_letters_digits_dash_underscore() -> None:
    assert case_folder_name("Cases", "/", "MT-2026_1", "Dr. Zoë O'Brien-Ünal (ret.)",
                            strict=True) == "Cases/MT-2026_1 Dr Zoë O Brien-Ünal ret"
    assert case_folder_name("Cases", "/", "MT-1", "Zoë O'Brien") == "Cases/MT-1 Zoë O'Brien"


def test_a_case_id_that_cleans_to_nothing_is_refused() -> None:
    with pytest.raises(CaseFolderError):
        case_folder_name("Cases", "/", "//", "Name")


def test_header_helpers() -> None:
    raw = b"Subject: x\nMessage-ID:  <a(b)c@d.example>\n\nbody\n"
    assert to_crlf(raw) == b"Subject: x\r\nMessage-ID:  <a(b)c@d.example>\r\n\r\nbody\r\n"
    assert to_crlf(to_crlf(raw)) == to_crlf(raw)
    assert message_id_of(raw) == "<a(b)c@d.example>"
    assert message_id_of(b"Subject: none\n\nx") is None
    assert search_key("<a(b)c@d.example>") == "c@d.example>"


def _listed(server: Dovecot) -> dict[str, tuple[bytes, ...]]:
    c = client_for(server)
    try:
        return {name: flags for flags, _sep, name in c.list_folders()}
    finally:
        c.logout()


def test_ensure_creates_subscribes_and_is_idempotent_with_the_servers_separator(
        dovecot: Dovecot, dovecot_slash: Dovecot) -> None:
    for server, sep in ((dovecot, "."), (dovecot_slash, "/")):
        assert server.separator == sep  # what the server reports, not what we assumed
        client = client_for(server)
        folders = CaseFolders(client, "Cases")
        assert folders.separator == sep
        name = folders.ensure("MT-2026-0042", "J. Smith")
        assert folders.ensure("MT-2026-0042", "J. Smith") == name
        assert CaseFolders(client, "Cases").ensure("MT-2026-0042", "J. Smith") == name
        # Dovecot's maildir refuses "." inside a name when "/" separates: the strict spelling.
        expected = case_folder_name("Cases", sep, "MT-2026-0042", "J. Smith", strict=sep == "/")
        assert name == expected == f"Cases{sep}MT-2026-0042 J Smith"
        subscribed = {n for _f, _s, n in client.list_sub_folders()}
        assert {expected, "Cases"} <= subscribed
        client.logout()
        listed = _listed(server)
        assert expected in listed and "Cases" in listed
        assert [n for n in listed if "MT-2026-0042" in n] == [expected]


def test_non_ascii_patient_names_round_trip_as_modified_utf7(dovecot: Dovecot) -> None:
    client = client_for(dovecot)
    folders = CaseFolders(client, "Cases")
    names = {"MT-2026-0001": "Ørsted Ünal", "MT-2026-0002": "Αλέξανδρος Παππάς",
             "MT-2026-0003": "王小明", "MT-2026-0004": "Zoë & Chloé"}
    created = {folders.ensure(cid, patient) for cid, patient in names.items()}
    client.folder_encode = False
    raw_names = {n for _f, _s, n in client.list_folders("Cases.", "*")}
    client.logout()
    assert b"Cases.MT-2026-0001 &ANg-rsted &ANw-nal" in raw_names  # the wire form
    assert b"Cases.MT-2026-0004 Zo&AOs- &- Chlo&AOk-" in raw_names
    listed = set(_listed(dovecot))
    assert created <= listed
    assert "Cases.MT-2026-0003 王小明" in listed


def test_append_keeps_flags_and_date_and_contains_tells_copies_apart(dovecot: Dovecot) -> None:
    client = client_for(dovecot)
    folders = CaseFolders(client, "Cases")
    folder = folders.ensure("MT-2026-0042", "Jan Novak")
    first = make_message("MT-2026-0042", "Jan Novak", "first")
    when = datetime(2026, 3, 1, 9, 30, tzinfo=timezone(timedelta(hours=3)))
    assert not folders.contains(folder, first)
    folders.append(folder, first.replace(b"\r\n", b"\n"), flags=[b"\\Seen", b"\\Recent"], when=when)
    assert folders.contains(folder, first)  # line endings do not matter
    # The same Message-ID reused by a different message is not "already filed".
    reused = first.replace(b"Case notes first", b"Case notes other")
    assert not folders.contains(folder, reused)
    # Without a Message-ID, the bytes decide.
    bare = b"Subject: no id\r\n\r\nhello\r\n"
    assert not folders.contains(folder, bare)
    assert folders.file("MT-2026-0042", "Jan Novak", bare) == (folder, True)
    assert folders.file("MT-2026-0042", "Jan Novak", bare) == (folder, False)
    assert folders.contains(folder, bare)

    client.select_folder(folder, readonly=True)
    got = client.fetch(client.search("ALL"), ["FLAGS", "INTERNALDATE", "BODY.PEEK[]"])
    client.logout()
    bodies = [v[b"BODY[]"] for v in got.values()]
    assert bodies.count(first) == 1 and bodies.count(bare) == 1 and len(bodies) == 2
    item = next(v for v in got.values() if v[b"BODY[]"] == first)
    assert b"\\Seen" in item[b"FLAGS"]
    stored = item[b"INTERNALDATE"]
    assert stored.replace(tzinfo=stored.tzinfo or datetime.now().astimezone().tzinfo) == when


LONG_NAMES = {"MT-2026-0001": "王小明" * 40,  # 120 characters, over 300 bytes on the wire
              "MT-2026-0002": " ".join(["عبد الرحمن بن محمد"] * 7),
              "MT-2026-0003": "a" * 300}


@pytest.mark.parametrize("server", ["dovecot", "dovecot_slash"])
def test_long_non_ascii_names_are_cut_to_what_the_server_stores(
        server: str, request: pytest.FixtureRequest) -> None:
    # the limit is on the name as stored (modified UTF-7): a long Arabic or Chinese name made
    # CREATE fail, so none of the case's mail reached a folder
    dovecot: Dovecot = request.getfixturevalue(server)
    client = client_for(dovecot)
    try:
        folders = CaseFolders(client, "Cases")
        for cid, patient in LONG_NAMES.items():
            folder, appended = folders.file(cid, patient, make_message(cid, patient, "a"))
            assert appended
            leaf = folder.split(dovecot.separator, 1)[1]
            assert leaf.startswith(f"{cid} {patient[:20]}")
            assert len(imap_utf7.encode(leaf.split(" ", 1)[1])) <= 120
        assert case_folder_name("Cases", "/", "MT-1", "a" * 300) == "Cases/MT-1 " + "a" * 120
    finally:
        client.logout()
