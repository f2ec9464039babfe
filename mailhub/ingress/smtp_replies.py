"""aiosmtpd's reply texts rewritten to carry enhanced status codes (RFC 2034) and advice.

The submission and inbound listeners advertise ENHANCEDSTATUSCODES, so every reply but the
greeting, the HELO/EHLO replies and the 334/354 continuations needs one (RFC 2034; 354 stays bare
as in Postfix); aiosmtpd sends many without (``500 Error: bad syntax``), and a mail client's user
deserves a sentence that says what to do. ``HubSMTP.push`` passes every reply through
``rewrite_reply``; a test walks aiosmtpd's source for reply texts this table misses.
"""

from __future__ import annotations

import re

# aiosmtpd's own reply texts -> replies with enhanced status codes and advice. A pattern replaces
# what it matches; text after the match is kept.
_REWRITES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^500 Line too long"),
     "500 5.5.2 Line too long: RFC 5321 allows at most 1000 characters per line; "
     "fold long header lines or use a transfer encoding"),
    (re.compile(r"^500 Command line too long"), "500 5.5.2 Command line too long"),
    (re.compile(r"^552 Error: Too much mail data"),
     "552 5.3.4 Message too big for this server: send a smaller message or share the "
     "file another way"),
    (re.compile(r"^552 Error: message size exceeds fixed maximum message size"),
     "552 5.3.4 Message size exceeds fixed maximum message size: send a smaller message or "
     "share the file another way"),
    (re.compile(r"^530 5\.7\.0 Authentication required"),
     "530 5.7.0 Authentication required: log in with your coordinator account"),
    (re.compile(r"^530 Must issue a STARTTLS command first"),
     "530 5.7.0 Must issue a STARTTLS command first"),
    (re.compile(r"^500 Error: command [\"'](.*)[\"'] not recognized"),
     r"500 5.5.1 Command \1 not recognized"),
    (re.compile(r"^500 Error: bad syntax"),
     "500 5.5.2 Bad syntax: a command is an ASCII word, optionally followed by arguments"),
    # handle_exception's reply to an unexpected error (logged with its traceback): a fault on
    # our side, so a temporary failure the client retries, without the exception's text
    (re.compile(r"^500 Error: (?:\(\w+\) |Cannot describe error)(?s:.*)"),
     "451 4.3.0 Temporary problem processing the command; please try again later"),
    (re.compile(r"^503 Error: need MAIL command"), "503 5.5.1 Send MAIL FROM first"),
    (re.compile(r"^503 Error: need RCPT command"), "503 5.5.1 Send RCPT TO first"),
    (re.compile(r"^503 Error: nested MAIL command"), "503 5.5.1 Nested MAIL command"),
    (re.compile(r"^503 Error: send \w+ first"), "503 5.5.1 Send EHLO first"),
    (re.compile(r"^501 Syntax: (.*)"), r"501 5.5.4 Syntax: \1"),
    (re.compile(r"^501 Error: (.*)"), r"501 5.5.4 \1"),  # BODY=, SMTPUTF8 arguments
    (re.compile(r"^501 Not enough value"), "501 5.5.4 AUTH needs a mechanism"),
    (re.compile(r"^501 Too many values"), "501 5.5.4 Too many AUTH arguments"),
    (re.compile(r"^501 Supported commands: "), "501 5.5.4 No such command; supported commands: "),
    (re.compile(r"^555 (MAIL FROM|RCPT TO) parameters"), r"555 5.5.4 \1 parameters"),
    (re.compile(r"^503 Already authenticated"), "503 5.5.1 Already authenticated"),
    (re.compile(r"^500 Error: strict ASCII mode"),
     "500 5.6.7 Non-ASCII data without SMTPUTF8/8BITMIME"),
    (re.compile(r"^554 Command refused"), "554 5.7.0 Command refused"),
    (re.compile(r"^502 EXPN not implemented"), "502 5.5.1 EXPN not implemented"),
    (re.compile(r"^502 Could not VRFY "), "502 5.1.3 Could not VRFY "),
    (re.compile(r"^252 Cannot VRFY"), "252 2.0.0 Cannot VRFY"),
    (re.compile(r"^250 OK\Z"), "250 2.0.0 OK"),  # NOOP, RSET
    (re.compile(r"^250 (Syntax|Supported commands): "), r"250 2.0.0 \1: "),  # HELP
    (re.compile(r"^221 Bye\Z"), "221 2.0.0 Bye"),
    # RFC 3207's reply to STARTTLS; the greeting (also 220) stays as it is
    (re.compile(r"^220 Ready to start TLS"), "220 2.0.0 Ready to start TLS"),
    (re.compile(r"^454 TLS not available"), "454 4.7.0 TLS not available"),
]

# Every pattern starts with its literal reply code: look only at the ones for this reply's code
# (the hot replies, 250 from our handlers, 354 and 235, meet three anchored patterns at most).
_REWRITES_BY_CODE: dict[str, list[tuple[re.Pattern[str], str]]] = {}
for _pattern, _replacement in _REWRITES:
    _REWRITES_BY_CODE.setdefault(_pattern.pattern[1:4], []).append((_pattern, _replacement))


def rewrite_reply(status: str) -> str:
    """aiosmtpd's reply text -> ours with an enhanced status code (unknown replies unchanged)."""
    for pattern, replacement in _REWRITES_BY_CODE.get(status[:3], ()):
        if pattern.search(status):
            return pattern.sub(replacement, status, count=1)
    return status
