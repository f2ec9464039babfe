"""aiosmtpd's reply texts rewritten to carry enhanced status codes (RFC 2034) and advice.

The submission and inbound listeners advertise ENHANCEDSTATUSCODES, so every reply but the
greeting, the HELO/EHLO replies and the 334/354 continuations needs one; aiosmtpd sends many
without (``500 Error: bad syntax``), and a mail client's user deserves a sentence that says what
to do. ``HubSMTP.push`` passes every reply through ``rewrite_reply``.
"""

from __future__ import annotations

import re

# aiosmtpd's own reply texts -> replies with enhanced status codes and advice.
_REWRITES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^500 Line too long"),
     "500 5.5.2 Line too long: RFC 5321 allows at most 1000 characters per line; "
     "fold long header lines or use a transfer encoding"),
    (re.compile(r"^500 Command line too long"), "500 5.5.2 Command line too long"),
    (re.compile(r"^552 Error: Too much mail data"),
     "552 5.3.4 Message too big for this server: send a smaller message or share the "
     "file another way"),
    (re.compile(r"^530 5\.7\.0 Authentication required"),
     "530 5.7.0 Authentication required: log in with your coordinator account"),
    (re.compile(r"^530 Must issue a STARTTLS command first"),
     "530 5.7.0 Must issue a STARTTLS command first"),
    (re.compile(r"^500 Error: command \"(.*)\" not recognized"),
     r"500 5.5.1 Command \1 not recognized"),
    (re.compile(r"^503 Error: need MAIL command"), "503 5.5.1 Send MAIL FROM first"),
    (re.compile(r"^503 Error: need RCPT command"), "503 5.5.1 Send RCPT TO first"),
    (re.compile(r"^503 Error: nested MAIL command"), "503 5.5.1 Nested MAIL command"),
    (re.compile(r"^503 Error: send HELO first"), "503 5.5.1 Send EHLO first"),
    (re.compile(r"^501 Syntax: (.*)"), r"501 5.5.4 Syntax: \1"),
    (re.compile(r"^501 Not enough value"), "501 5.5.4 AUTH needs a mechanism"),
    (re.compile(r"^501 Too many values"), "501 5.5.4 Too many AUTH arguments"),
    (re.compile(r"^503 Already authenticated"), "503 5.5.1 Already authenticated"),
    (re.compile(r"^500 Error: strict ASCII mode"),
     "500 5.6.7 Non-ASCII data without SMTPUTF8/8BITMIME"),
    (re.compile(r"^554 Command refused"), "554 5.7.0 Command refused"),
]


# Every pattern starts with its literal reply code: look only at the ones for this reply's code
# (most replies, 250/354/235, have none).
_REWRITES_BY_CODE: dict[str, list[tuple[re.Pattern[str], str]]] = {}
for _pattern, _replacement in _REWRITES:
    _REWRITES_BY_CODE.setdefault(_pattern.pattern[1:4], []).append((_pattern, _replacement))


def rewrite_reply(status: str) -> str:
    """aiosmtpd's reply text -> ours with an enhanced status code (unknown replies unchanged)."""
    for pattern, replacement in _REWRITES_BY_CODE.get(status[:3], ()):
        if pattern.search(status):
            return pattern.sub(replacement, status, count=1)
    return status
