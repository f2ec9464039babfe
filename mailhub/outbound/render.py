"""Render care-plan templates into a subject, a text part and an HTML part, then into MIME.

Layout: ``templates/<language>/<template>.subject.j2``, ``.txt.j2`` and optionally ``.html.j2``,
each free to ``{% extends "_layout.txt.j2" %}`` / ``"_layout.html.j2" %}`` (names without a
folder resolve in the template's own language folder). Undefined variables are errors, HTML is
autoescaped, the subject is one line (no header injection), and a language or template that is
missing falls back to English with a log line, so a patient never gets nothing.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from email.message import EmailMessage
from email.policy import default as _DEFAULT_POLICY
from email.utils import format_datetime, formataddr, make_msgid, parseaddr
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import pass_context
from jinja2.runtime import Context

from mailhub.errors import TemplateError
from mailhub.scheduler.timecalc import UnknownTimeZone, get_zone

log = logging.getLogger("mailhub.scheduler")

FALLBACK_LANGUAGE = "en"
RTL_LANGUAGES = frozenset({"ar", "he", "fa", "ur"})
_LANG = re.compile(r"[a-z]{2,3}(?:-[a-z0-9]{1,8})*")
_TEMPLATE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_CRLF = re.compile(r"[\r\n\x00]+")

# Weekday names Monday..Sunday and month names January..December, per language.
_NAMES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "en": (("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
           ("January", "February", "March", "April", "May", "June", "July", "August",
            "September", "October", "November", "December")),
    "es": (("lunes", "martes", "miércoles", "jueves", "viernes", "sábado", "domingo"),
           ("enero", "febrero", "marzo", "abril", "mayo", "junio", "julio", "agosto",
            "septiembre", "octubre", "noviembre", "diciembre")),
    "de": (("Montag", "Dienstag", "Mittwoch", "Donnerstag", "Freitag", "Samstag", "Sonntag"),
           ("Januar", "Februar", "März", "April", "Mai", "Juni", "Juli", "August",
            "September", "Oktober", "November", "Dezember")),
    "ar": (("الاثنين", "الثلاثاء", "الأربعاء", "الخميس", "الجمعة", "السبت", "الأحد"),
           ("يناير", "فبراير", "مارس", "أبريل", "مايو", "يونيو", "يوليو", "أغسطس",
            "سبتمبر", "أكتوبر", "نوفمبر", "ديسمبر")),
}
# (date pattern, date-and-time pattern, text for an event not set yet)
_FORMATS: dict[str, tuple[str, str, str]] = {
    "en": ("{wd} {d} {mon} {y}", "{date}, {hm} ({tz})", "to be confirmed"),
    "es": ("{wd}, {d} de {mon} de {y}", "{date}, {hm} ({tz})", "por confirmar"),
    "de": ("{wd}, {d}. {mon} {y}", "{date}, {hm} Uhr ({tz})", "noch offen"),
    "ar": ("{wd} {d} {mon} {y}", "{date}، {hm} ({tz})", "سيتم تأكيده لاحقًا"),
}


@dataclass(frozen=True)
class Rendered:
    """A rendered message; ``version`` is a short hash of the template sources used."""

    subject: str
    text: str
    html: str | None
    language_used: str
    version: str
    template: str = ""


def _primary(language: str | None) -> str:
    lang = (language or FALLBACK_LANGUAGE).strip().lower().replace("_", "-")
    return lang if _LANG.fullmatch(lang) else FALLBACK_LANGUAGE


def _names_for(language: str | None) -> str:
    """The name table to use: the language's primary subtag when known, else English."""
    primary = _primary(language).split("-")[0]
    return primary if primary in _FORMATS else FALLBACK_LANGUAGE


def _zone_name(value: datetime, tz: str | None, ctx: Mapping[str, Any] | None) -> str:
    """Explicit zone, else the value's own named zone (not UTC), else the context's timezone."""
    if tz:
        return tz
    own = getattr(value.tzinfo, "zone", None) or getattr(value.tzinfo, "key", None)
    if own and own not in ("UTC", "Etc/UTC"):
        return str(own)
    if ctx is not None and isinstance(ctx.get("timezone"), str) and ctx.get("timezone"):
        return str(ctx.get("timezone"))
    return "UTC"


def _in_zone(value: datetime, zone: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("a naive datetime reached a template; pass aware datetimes")
    return value.astimezone(UTC).astimezone(get_zone(zone))


def format_date(value: date | datetime | None, language: str | None = None, tz: str | None = None,
                ctx: Mapping[str, Any] | None = None) -> str:
    """"Thursday 3 December 2026" in the language's words, the date taken in the zone."""
    lang = _names_for(language)
    if value is None:
        return _FORMATS[lang][2]
    if isinstance(value, datetime):
        value = _in_zone(value, _zone_name(value, tz, ctx)).date()
    weekdays, months = _NAMES[lang]
    return _FORMATS[lang][0].format(wd=weekdays[value.weekday()], d=value.day,
                                    mon=months[value.month - 1], y=value.year)


def format_datetime_local(value: datetime | None, language: str | None = None,
                          tz: str | None = None, ctx: Mapping[str, Any] | None = None) -> str:
    """"Thursday 3 December 2026, 08:00 (Europe/Istanbul)": the zone is always named."""
    lang = _names_for(language)
    if value is None:
        return _FORMATS[lang][2]
    zone = _zone_name(value, tz, ctx)
    local = _in_zone(value, zone)
    return _FORMATS[lang][1].format(date=format_date(local.date(), lang), hm=local.strftime("%H:%M"),
                                    tz=zone)


def format_time_local(value: datetime | None, language: str | None = None, tz: str | None = None,
                      ctx: Mapping[str, Any] | None = None) -> str:
    """"08:00 (Europe/Istanbul)"."""
    if value is None:
        return _FORMATS[_names_for(language)][2]
    zone = _zone_name(value, tz, ctx)
    return f"{_in_zone(value, zone).strftime('%H:%M')} ({zone})"


@pass_context
def _f_localdate(ctx: Context, value: Any, lang: str | None = None, tz: str | None = None) -> str:
    return format_date(value, lang or ctx.get("language"), tz, ctx)


@pass_context
def _f_localdatetime(ctx: Context, value: Any, lang: str | None = None, tz: str | None = None) -> str:
    return format_datetime_local(value, lang or ctx.get("language"), tz, ctx)


@pass_context
def _f_localtime(ctx: Context, value: Any, lang: str | None = None, tz: str | None = None) -> str:
    return format_time_local(value, lang or ctx.get("language"), tz, ctx)


class _Environment(jinja2.Environment):
    """Resolves a folder-less name ("_layout.html.j2") in the including template's folder."""

    def join_path(self, template: str, parent: str) -> str:
        if "/" in template or "/" not in parent:
            return template
        return f"{parent.rsplit('/', 1)[0]}/{template}"


def one_line(value: str) -> str:
    """A header value with CR, LF and NUL replaced (header injection) and ends trimmed."""
    return _CRLF.sub(" ", value).strip()


def header_text(value: str) -> str:
    """``one_line``, with RFC 2047 words decoded first (until none is left).

    The email package decodes an encoded word in a value it is given, so a patient name such
    as ``=?utf-8?q?Al=0D=0ABcc:...?=`` would become a line break when the message is written
    (Python before 3.11.10 folds it as is). Decoded here, CR/LF are removed like any other.
    """
    text = one_line(value)
    for _ in range(8):
        decoded = one_line(str(_DEFAULT_POLICY.header_factory("subject", text)))
        if decoded == text:
            return text
        text = decoded
    return text.replace("=?", "= ?")


def header_address(value: str) -> str:
    """One address for From/To with its display name made safe by ``header_text``."""
    name, addr = parseaddr(one_line(value))
    if not addr:
        return one_line(value)
    return formataddr((header_text(name), addr)) if name else addr


class TemplateRenderer:
    """Renders ``templates_dir/<language>/<template>.*.j2``; safe to share between threads."""

    def __init__(self, templates_dir: Path | str) -> None:
        self.templates_dir = Path(templates_dir)
        self.env = _Environment(
            loader=jinja2.FileSystemLoader(str(self.templates_dir)),
            undefined=jinja2.StrictUndefined,
            autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2", "html"),
                                                default_for_string=False, default=False),
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
        )
        self.env.filters.update(localdate=_f_localdate, localdatetime=_f_localdatetime,
                                localtime=_f_localtime)

    def _has(self, language: str, template: str) -> bool:
        base = self.templates_dir / language
        return all((base / f"{template}{s}").is_file() for s in (".subject.j2", ".txt.j2"))

    def resolve_language(self, template: str, language: str | None) -> str:
        """The language folder that will be used: the exact tag, its primary subtag, then en."""
        if not _TEMPLATE.fullmatch(template or ""):
            raise TemplateError(f"{template!r} is not a template name",
                                hint="letters, digits, '_' and '-' only, e.g. \"prep-guide\"")
        wanted = _primary(language)
        for lang in dict.fromkeys((wanted, wanted.split("-")[0], FALLBACK_LANGUAGE)):
            if self._has(lang, template):
                if lang == FALLBACK_LANGUAGE and wanted.split("-")[0] != FALLBACK_LANGUAGE:
                    log.warning("template %s has no %r version; using %r", template,
                                language, FALLBACK_LANGUAGE)
                return lang
        raise TemplateError(
            f"template {template!r} is missing: no {FALLBACK_LANGUAGE}/{template}.subject.j2 "
            f"and {FALLBACK_LANGUAGE}/{template}.txt.j2 in {self.templates_dir}",
            hint="add the English version at least",
        )

    def _render_one(self, name: str, context: dict[str, Any]) -> str:
        try:
            return self.env.get_template(name).render(context)
        except jinja2.TemplateNotFound as exc:
            raise TemplateError(f"template {name} failed: {exc.name or exc} not found",
                                hint="check the file exists under the templates folder") from exc
        except jinja2.UndefinedError as exc:
            raise TemplateError(f"template {name} failed: {exc.message}",
                                hint="pass the variable in the context or guard it with "
                                "'is defined'") from exc
        except (jinja2.TemplateError, ValueError, TypeError, UnknownTimeZone) as exc:
            raise TemplateError(f"template {name} failed: {exc}") from exc

    def _version(self, names: Sequence[str], language: str) -> str:
        digest = hashlib.sha256()
        extras = [f"{language}/_layout.txt.j2", f"{language}/_layout.html.j2"]
        for name in [*names, *extras]:
            path = self.templates_dir / name
            if path.is_file():
                digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
        return digest.hexdigest()[:12]

    def render(self, template: str, language: str | None, context: Mapping[str, Any]) -> Rendered:
        """Render subject, text and (when the file exists) HTML in the best available language."""
        lang = self.resolve_language(template, language)
        ctx = dict(context)
        ctx["language"] = lang.split("-")[0]
        ctx["text_direction"] = "rtl" if lang.split("-")[0] in RTL_LANGUAGES else "ltr"
        names = [f"{lang}/{template}.subject.j2", f"{lang}/{template}.txt.j2"]
        subject = one_line(self._render_one(names[0], ctx))
        text = self._render_one(names[1], ctx)
        html = None
        html_name = f"{lang}/{template}.html.j2"
        if (self.templates_dir / html_name).is_file():
            names.append(html_name)
            html = self._render_one(html_name, ctx)
        if not subject:
            raise TemplateError(f"template {names[0]} rendered an empty subject")
        return Rendered(subject, text, html, lang, self._version(names, lang), template)

    def templates(self) -> dict[str, list[str]]:
        """Template name -> languages that have it (subject and text), for listings."""
        found: dict[str, list[str]] = {}
        for path in sorted(self.templates_dir.glob("*/*.subject.j2")):
            name = path.name.removesuffix(".subject.j2")
            if not name.startswith("_") and self._has(path.parent.name, name):
                found.setdefault(name, []).append(path.parent.name)
        return found


def build_mime(
    rendered: Rendered,
    from_addr: str,
    to_addr: str | Sequence[str],
    *,
    case_id: str | None = None,
    message_id: str | None = None,
    sent_at: datetime | None = None,
    extra_headers: Mapping[str, str] | None = None,
) -> EmailMessage:
    """A multipart/alternative message (text, then HTML when there is one).

    ``case_id`` is put in the Subject as "[ID]" (threading). Every header value has CR/LF removed.
    The message is not yet signed or encrypted: that is the outbound crypto step's job.
    """
    subject = header_text(rendered.subject)
    if case_id and f"[{one_line(case_id)}]" not in subject:
        subject = f"[{one_line(case_id)}] {subject}"
    recipients = [to_addr] if isinstance(to_addr, str) else list(to_addr)
    msg = EmailMessage()
    msg["From"] = header_address(from_addr)
    msg["To"] = ", ".join(header_address(a) for a in recipients)
    msg["Subject"] = subject
    msg["Date"] = format_datetime((sent_at or datetime.now(UTC)).astimezone(UTC))
    domain = one_line(from_addr).rpartition("@")[2].rstrip(">").strip() or None
    msg["Message-ID"] = one_line(message_id) if message_id else make_msgid(domain=domain)
    msg["Auto-Submitted"] = "auto-generated"
    for key, value in (extra_headers or {}).items():
        msg[one_line(key).replace(":", "")] = header_text(value)
    msg.set_content(rendered.text)
    if rendered.html is not None:
        msg.add_alternative(rendered.html, subtype="html")
    return msg


def sample_context(timezone: str = "America/Chicago") -> dict[str, Any]:
    """Plausible values for every documented variable (previews and template checks)."""
    clinic = get_zone("Europe/Istanbul")
    home = get_zone(timezone)
    return {
        "patient_name": "Alex Example",
        "case_id": "MT-2026-0042",
        "clinic": "Anatolia Orthopaedic Clinic",
        "procedure": "hip-replacement",
        "procedure_at": clinic.localize(datetime(2026, 12, 3, 8, 0)),
        "discharge_at": clinic.localize(datetime(2026, 12, 8, 11, 0)),
        "return_home_at": home.localize(datetime(2026, 12, 12, 18, 30)),
        "send_at": home.localize(datetime(2026, 11, 19, 9, 0)),
        "timezone": timezone,
        "coordinator": "Sam Rivera",
    }


def preview(renderer: TemplateRenderer, template: str, language: str | None,
            context: Mapping[str, Any] | None = None) -> str:
    """The text ``mailhub templates preview`` prints: header lines, the text part, the HTML."""
    rendered = renderer.render(template, language, context or sample_context())
    lines = [f"Template: {template}  Language: {rendered.language_used}  "
             f"Version: {rendered.version}", f"Subject: {rendered.subject}", "",
             "----- text/plain -----", rendered.text.rstrip("\n")]
    if rendered.html is not None:
        lines += ["", "----- text/html -----", rendered.html.rstrip("\n")]
    return "\n".join(lines) + "\n"
