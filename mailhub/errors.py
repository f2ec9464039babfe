"""One error hierarchy for the hub; the edges (SMTP replies, CLI) turn these into messages.

Every error carries a human text that says what happened and what to do. Errors that reach an
SMTP client also carry an SMTP code and an enhanced status code.
"""

from __future__ import annotations


class MailhubError(Exception):
    """Base of every error the hub raises on purpose."""

    smtp_code: int = 451
    smtp_status: str = "4.3.0"

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message

    def smtp_reply(self) -> str:
        """The reply line for an SMTP client: code, enhanced status, human text on one line."""
        text = " ".join(str(self).split())
        return f"{self.smtp_code} {self.smtp_status} {text}"


class ConfigError(MailhubError):
    """The configuration file or the rules are invalid; the message says how to fix them."""


class RuleError(ConfigError):
    """A file under rules/ is invalid (names the file and the entry)."""


class FileAccessError(MailhubError):
    """A file or folder the user named cannot be read or written (missing, a folder, no access)."""


class TemplateError(MailhubError):
    """A template is missing or failed to render."""


class CryptoError(MailhubError):
    """gpg or the S/MIME code failed; raised instead of returning a failed result."""

    smtp_code = 451
    smtp_status = "4.7.0"


class DecryptionFailed(CryptoError):
    """Inbound encrypted mail that the hub cannot open (not for our key, corrupt)."""

    smtp_code = 550
    smtp_status = "5.7.5"


class WorkerLost(CryptoError):
    """A crypto worker process died while it held the job (its replacement takes the next)."""


class KeyImportError(MailhubError):
    """A key or certificate was refused at import (private key, expired, revoked, no address)."""


class NoRecipientKey(MailhubError):
    """No usable key for a recipient: the message is held, never sent in plaintext."""

    smtp_code = 550
    smtp_status = "5.7.1"

    def __init__(self, recipient: str, reason: str) -> None:
        super().__init__(
            f"no usable encryption key for {recipient}: {reason}",
            hint="import the recipient's OpenPGP key or S/MIME certificate with "
            "'mailhub keys import FILE'; the serving hub then sends the held message by itself",
        )
        self.recipient = recipient
        self.reason = reason


class PolicyRefusal(MailhubError):
    """A message breaks a policy rule (plaintext from a partner that must encrypt, ...)."""

    smtp_code = 550
    smtp_status = "5.7.1"

    def __init__(self, message: str, *, status: str = "5.7.1", hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.smtp_status = status


class RecipientRefused(PolicyRefusal):
    """A recipient the listener does not serve (relay attempt, foreign domain)."""


class NotFound(MailhubError):
    """A case, queue entry, user or key named on the command line does not exist."""


class StoreError(MailhubError):
    """The database refused an operation."""


class DeliveryError(MailhubError):
    """The next hop refused or could not be reached."""

    def __init__(self, message: str, *, permanent: bool = False, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.permanent = permanent
