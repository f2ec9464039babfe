"""Template rendering: autoescape, strict variables, one-line subjects, fallback, RTL, dates."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.utils import formataddr
from pathlib import Path

import pytest
import pytz

from mailhub.errors import TemplateError
from mailhub.outbound.render import (
    TemplateRenderer,
    build_mime,
    format_datetime_local,
    preview,
    sample_context,
)
from mailhub.scheduler.plans import load_care_plans

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "templates"
ISTANBUL = pytz.timezone("Europe/Istanbul")
PROCEDURE_AT = ISTANBUL.localize(datetime(2026, 12, 3, 8, 0))


def make(root: Path, lang: str, name: str, subject: str, text: str, html: str | None = None) -> None:
    folder = root / lang
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.subject.j2").write_text(subject, encoding="utf-8")
    (folder / f"{name}.txt.j2").write_text(text, encoding="utf-8")
    if html is not None:
        (folder / f"{name}.html.j2").write_text(html, encoding="utf-8")


@pytest.fixture()
def tdir(tmp_path: Path) -> Path:
    make(tmp_path, "en", "hello", "Hello {{ patient_name }}\n", "Hi {{ patient_name }}\n",
         "<p>Hi {{ patient_name }}</p>\n")
    make(tmp_path, "es", "hello", "Hola\n", "Hola {{ patient_name }}\n")
    make(tmp_path, "en", "only-en", "Only\n", "English\n")
    return tmp_path


def test_html_is_autoescaped_text_is_not(tdir: Path) -> None:
    r = TemplateRenderer(tdir).render("hello", "en", {"patient_name": "<script>alert(1)</script>"})
    assert r.html is not None
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in r.html
    assert "<script>" not in r.html
    assert r.text == "Hi <script>alert(1)</script>\n"


def test_undefined_variable_is_an_error_naming_the_template(tdir: Path) -> None:
    with pytest.raises(TemplateError) as info:
        TemplateRenderer(tdir).render("hello", "en", {})
    assert "en/hello.subject.j2" in str(info.value)
    assert "patient_name" in str(info.value)


def test_subject_is_one_line(tdir: Path) -> None:
    r = TemplateRenderer(tdir).render("hello", "en", {"patient_name": "Al\r\nBcc: evil@example.net\n"})
    assert "\r" not in r.subject and "\n" not in r.subject
    assert r.subject == "Hello Al Bcc: evil@example.net"


def test_headers_cannot_be_injected(tdir: Path) -> None:
    r = TemplateRenderer(tdir).render("hello", "en", {"patient_name": "x"})
    msg = build_mime(r, "Care <care@medvoyage.example>", "pat@example.org\r\nBcc: evil@example.net",
                     extra_headers={"X-Case": "a\nBcc: evil@example.net"})
    parsed = message_from_bytes(msg.as_bytes(), policy=policy.default)
    assert parsed["Bcc"] is None
    assert "\n" not in str(parsed["X-Case"])


def test_fallback_to_english_is_logged(tdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    renderer = TemplateRenderer(tdir)
    with caplog.at_level(logging.WARNING, logger="mailhub.scheduler"):
        r = renderer.render("only-en", "es", {})
    assert (r.language_used, r.text) == ("en", "English\n")
    assert any("only-en" in rec.getMessage() for rec in caplog.records)
    with caplog.at_level(logging.WARNING, logger="mailhub.scheduler"):
        assert renderer.render("hello", "fr", {"patient_name": "x"}).language_used == "en"
        assert renderer.render("hello", "../../etc", {"patient_name": "x"}).language_used == "en"


def test_regional_language_uses_its_primary_folder(tdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mailhub.scheduler"):
        r = TemplateRenderer(tdir).render("hello", "es_MX", {"patient_name": "Ana"})
    assert (r.language_used, r.subject, r.html) == ("es", "Hola", None)
    assert not caplog.records


def test_missing_template_names_it(tdir: Path) -> None:
    with pytest.raises(TemplateError, match="'nothing'"):
        TemplateRenderer(tdir).render("nothing", "en", {})
    with pytest.raises(TemplateError, match="not a template name"):
        TemplateRenderer(tdir).render("../en/hello", "en", {})


def test_syntax_error_names_the_file(tdir: Path) -> None:
    make(tdir, "en", "broken", "ok\n", "{% if %}\n")
    with pytest.raises(TemplateError, match=r"en/broken\.txt\.j2"):
        TemplateRenderer(tdir).render("broken", "en", {})


def test_version_changes_with_the_source(tdir: Path) -> None:
    renderer = TemplateRenderer(tdir)
    first = renderer.render("only-en", "en", {}).version
    (tdir / "en" / "only-en.txt.j2").write_text("Changed\n")
    second = TemplateRenderer(tdir).render("only-en", "en", {}).version
    assert first != second and len(first) == 12


@pytest.mark.parametrize(
    ("lang", "expected"),
    [
        ("en", "Thursday 3 December 2026, 08:00 (Europe/Istanbul)"),
        ("es", "jueves, 3 de diciembre de 2026, 08:00 (Europe/Istanbul)"),
        ("de", "Donnerstag, 3. Dezember 2026, 08:00 Uhr (Europe/Istanbul)"),
        ("ar", "الخميس 3 ديسمبر 2026، 08:00 (Europe/Istanbul)"),
        ("pt", "Thursday 3 December 2026, 08:00 (Europe/Istanbul)"),
    ],
)
def test_localdatetime_in_each_language(lang: str, expected: str) -> None:
    assert format_datetime_local(PROCEDURE_AT, lang) == expected


def test_date_filters_pick_the_zone(tdir: Path) -> None:
    make(tdir, "en", "when", "x\n",
         "{{ procedure_at|localdatetime }}\n"
         "{{ procedure_at|localdatetime(tz='America/Chicago') }}\n"
         "{{ send_at|localdatetime }}\n"
         "{{ send_at|localdate('de') }}\n"
         "{{ procedure_at|localtime }}\n"
         "{{ discharge_at|localdate }}\n")
    text = TemplateRenderer(tdir).render("when", "en", {
        "procedure_at": PROCEDURE_AT,
        "send_at": datetime(2026, 11, 19, 15, 0, tzinfo=UTC),
        "timezone": "America/Chicago",
        "discharge_at": None,
    }).text
    assert text.splitlines() == [
        "Thursday 3 December 2026, 08:00 (Europe/Istanbul)",   # its own zone
        "Wednesday 2 December 2026, 23:00 (America/Chicago)",  # 05:00Z in CST
        "Thursday 19 November 2026, 09:00 (America/Chicago)",  # UTC value: the context's zone
        "Donnerstag, 19. November 2026",
        "08:00 (Europe/Istanbul)",
        "to be confirmed",
    ]


def test_arabic_is_right_to_left() -> None:
    r = TemplateRenderer(SHIPPED).render("prep-guide", "ar", sample_context())
    assert r.language_used == "ar"
    assert r.html is not None and '<html dir="rtl" lang="ar">' in r.html
    assert "الخميس 3 ديسمبر 2026" in r.subject
    en = TemplateRenderer(SHIPPED).render("wound-care", "ar", sample_context())
    assert en.language_used == "en" and en.html is not None and 'dir="ltr"' in en.html


def test_every_shipped_template_renders() -> None:
    renderer = TemplateRenderer(SHIPPED)
    plans = load_care_plans(REPO / "rules", SHIPPED)
    names = {s.template for p in plans.values() for s in p.steps}
    assert names <= set(renderer.templates())
    ctx = sample_context("Asia/Kolkata") | {"discharge_at": None, "return_home_at": None}
    for name, languages in renderer.templates().items():
        for lang in languages:
            r = renderer.render(name, lang, ctx)
            assert r.language_used == lang
            assert r.subject and "{" not in r.subject
            assert "Alex Example" in r.text and "MT-2026-0042" in r.text
            assert r.html is not None and f'lang="{lang}"' in r.html and "</html>" in r.html


def test_spanish_template_uses_spanish_layout() -> None:
    r = TemplateRenderer(SHIPPED).render("travel-checklist", "es", sample_context())
    assert r.text.startswith("Estimado/a Alex Example:")
    assert "Referencia del caso: MT-2026-0042" in r.text


def test_build_mime_is_multipart_alternative() -> None:
    r = TemplateRenderer(SHIPPED).render("prep-guide", "de", sample_context())
    msg = build_mime(r, "Care <care@medvoyage.example>", ["a@example.org", "b@example.org"],
                     case_id="MT-2026-0042", sent_at=datetime(2026, 11, 19, 15, 0, tzinfo=UTC))
    parsed = message_from_bytes(msg.as_bytes(), policy=policy.default)
    assert parsed.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in parsed.iter_parts()] == ["text/plain", "text/html"]
    assert str(parsed["Subject"]).startswith("[MT-2026-0042] Vorbereitung")
    assert parsed["Message-ID"].endswith("@medvoyage.example>")
    assert parsed["Date"] == "Thu, 19 Nov 2026 15:00:00 +0000"
    assert parsed["Auto-Submitted"] == "auto-generated"
    assert "Donnerstag, 3. Dezember 2026" in parsed.get_body(("plain",)).get_content()


def test_build_mime_text_only_and_existing_case_tag(tdir: Path) -> None:
    r = TemplateRenderer(tdir).render("only-en", "en", {})
    msg = build_mime(r, "care@medvoyage.example", "p@example.org", case_id="MT-1", message_id="<a@b>")
    assert msg.get_content_type() == "text/plain"
    assert msg["Message-ID"] == "<a@b>"
    assert msg["Subject"] == "[MT-1] Only"


def test_preview_shows_both_parts() -> None:
    out = preview(TemplateRenderer(SHIPPED), "fasting-instructions", "en")
    assert "Subject: Tomorrow's procedure" in out
    assert "----- text/plain -----" in out and "----- text/html -----" in out
    assert "Thursday 3 December 2026, 08:00 (Europe/Istanbul)" in out


EVIL_WORD = "=?utf-8?q?Al=0D=0ABcc:_evil@example.net?="


def test_an_encoded_word_in_a_value_cannot_inject_a_header(tdir: Path) -> None:
    # one_line removes CR/LF, but an RFC 2047 word that decodes to CR/LF (a patient name taken
    # from a first contact's double-encoded From) must not become a line break when written
    r = TemplateRenderer(tdir).render("hello", "en", {"patient_name": EVIL_WORD})
    msg = build_mime(r, "Care <care@medvoyage.example>",
                     formataddr((EVIL_WORD, "pat@example.org")), case_id="MT-1")
    raw = msg.as_bytes(policy=policy.SMTP)
    parsed = message_from_bytes(raw, policy=policy.default)
    assert parsed["Bcc"] is None and b"\r\nBcc:" not in raw
    assert str(parsed["Subject"]) == "[MT-1] Hello Al Bcc: evil@example.net"
    assert [a.addr_spec for a in parsed["To"].addresses] == ["pat@example.org"]


def test_non_ascii_names_are_encoded_words(tdir: Path) -> None:
    r = TemplateRenderer(tdir).render("hello", "en", {"patient_name": "Zoë Ünal 李"})
    msg = build_mime(r, formataddr(("Çağla Öz", "care@medvoyage.example")),
                     formataddr(("Zoë Ünal 李", "zoe@example.org")), case_id="MT-1")
    raw = msg.as_bytes(policy=policy.SMTP)
    assert raw.partition(b"\r\n\r\n")[0].isascii()  # the headers: RFC 2047 words
    parsed = message_from_bytes(raw, policy=policy.default)
    assert str(parsed["Subject"]) == "[MT-1] Hello Zoë Ünal 李"
    assert parsed["To"].addresses[0].display_name == "Zoë Ünal 李"
    assert parsed["From"].addresses[0].display_name == "Çağla Öz"
