"""Notices to senders: a message held for want of a key, and final delivery failures (DSNs).

A notice names the recipient, the reason and what to do, and carries none of the message's
content: no Subject, no body, no attachment; only its Message-ID so the sender can find it.
DSNs follow RFC 3464 (multipart/report with a message/delivery-status part) but deliberately
omit the returned message or its headers, since those are protected health information.
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.message import EmailMessage, Message, MIMEPart
from email.utils import format_datetime, make_msgid

from mailhub.parse.headers import strip_crlf


def _base(from_addr: str, from_name: str, to_addr: str, subject: str, domain: str,
          original_id: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = f"{strip_crlf(from_name)} <{from_addr}>"
    msg["To"] = to_addr
    msg["Subject"] = subject
    msg["Date"] = format_datetime(datetime.now(UTC))
    msg["Message-ID"] = make_msgid(domain=domain)
    msg["Auto-Submitted"] = "auto-replied"
    if original_id:
        msg["In-Reply-To"] = strip_crlf(original_id)
        msg["References"] = strip_crlf(original_id)
    return msg


def hold_notice(*, from_addr: str, from_name: str, sender: str, recipient: str, reason: str,
                queue_id: int | str, original_id: str, domain: str) -> EmailMessage:
    """Tell the sender one recipient's copy is held and how to release it."""
    msg = _base(from_addr, from_name, sender, "Held: a message could not be sent encrypted",
                domain, original_id)
    msg.set_content(
        f"Your message {original_id or '(no Message-ID)'} was NOT sent to {recipient}.\n\n"
        f"Reason: {reason}\n\n"
        "mailhub never sends case mail unencrypted. The copy for this recipient is held "
        f"(queue id {queue_id}); copies for your other recipients were handled separately.\n\n"
        "What to do when the reason is a missing or unusable key:\n"
        f"  1. Get {recipient}'s OpenPGP public key or S/MIME certificate and ask an\n"
        "     administrator to import it:  mailhub keys import FILE\n"
        "  2. Nothing more: once the key is imported, the hub sends the held copy encrypted\n"
        "     by itself within seconds. An administrator can also release it at once:\n"
        f"       mailhub queue release {queue_id}\n"
        f"     or discard it:  mailhub queue drop {queue_id} --reason TEXT\n\n"
        "This notice contains none of the message's content.\n"
    )
    return msg


def failure_dsn(*, from_addr: str, from_name: str, sender: str, recipient: str, reply: str,
                queue_id: int | str, original_id: str, domain: str, reporting_mta: str,
                arrival: datetime | None = None) -> EmailMessage:
    """RFC 3464 failure report without the original message or its headers."""
    msg = _base(from_addr, from_name, sender, "Undeliverable: a message could not be delivered",
                domain, original_id)
    msg.set_content(
        f"Your message {original_id or '(no Message-ID)'} could not be delivered to "
        f"{recipient}.\n\nThe last answer was: {strip_crlf(reply)[:500]}\n\n"
        f"mailhub stopped retrying (queue id {queue_id}). Check the address, or contact the "
        "recipient another way. The message itself is not attached, because it may contain "
        "protected health information.\n"
    )
    status = "5.0.0"
    code = reply[:5].strip()
    if len(code) >= 3 and code[0] == "5" and len(reply) > 8 and reply[4:9].count(".") == 2:
        status = reply[4:9]
    fields = [("Reporting-MTA", f"dns; {reporting_mta}")]
    if arrival is not None:
        fields.append(("Arrival-Date", format_datetime(arrival.replace(tzinfo=UTC))))
    per_rcpt = [
        ("Final-Recipient", f"rfc822; {recipient}"),
        ("Action", "failed"),
        ("Status", status),
        ("Diagnostic-Code", f"smtp; {strip_crlf(reply)[:400]}"),
    ]
    # the generator writes message/delivery-status from a list of header blocks (RFC 3464
    # 2.1): a string payload there made every DSN fail to flatten, so none was ever sent
    part = MIMEPart()
    part["Content-Type"] = "message/delivery-status"
    part.set_payload([_field_block(fields), _field_block(per_rcpt)])
    msg.make_mixed()
    msg.attach(part)
    msg.set_type("multipart/report")  # the boundary is made when the message is written
    msg.set_param("report-type", "delivery-status")
    return msg


def _field_block(fields: list[tuple[str, str]]) -> Message:
    """One block of a delivery-status body: header-style fields, no body."""
    block = Message()
    for name, value in fields:
        block[name] = value
    return block
