"""Coordinator authentication for the submission port: scrypt hashes and slowed-down failures.

Passwords are stored only as scrypt hashes (``scrypt$n$r$p$salt$hash``); verification is
constant-time. Repeated failures from one client address are delayed, growing with each failure,
so guessing is slow while a coordinator who mistyped once is not punished.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1


def hash_password(password: str) -> str:
    """Hash a password with scrypt and a random salt."""
    if not password:
        raise ValueError("empty password")
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R,
                            p=SCRYPT_P, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    """Check a password against a stored scrypt hash; False for any malformed hash."""
    try:
        scheme, n, r, p, salt_b64, digest_b64 = stored.split("$")
        if scheme != "scrypt":
            return False
        salt = base64.b64decode(salt_b64)
        expected = base64.b64decode(digest_b64)
        actual = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=int(n), r=int(r),
                                p=int(p), dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


@dataclass
class FailureThrottle:
    """Counts AUTH failures per client address and says how long to wait before replying.

    Past the free failures each AUTH from the address waits its turn: a step after the one
    before it, whatever connection it came on, the step doubling with each failure up to
    ``max_delay``. Waiting per connection only, a guesser with a hundred connections had a
    hundred guesses per delay; now it has one. An AUTH whose turn is more than ``max_delay``
    away is refused at once (``None``): connections do not pile up waiting.

    The counts live in this process (``_get``/``_put``/``_drop``); ``SharedFailureThrottle``
    keeps them where every submission process sees them."""

    free_failures: int = 3
    base_delay: float = 1.0
    max_delay: float = 30.0
    forget_after: float = 900.0
    _failures: dict[str, tuple[int, float, float]] = field(default_factory=dict)

    def delay_for(self, client: str, now: float | None = None) -> float | None:
        """Seconds this AUTH waits before it is checked (its turn is taken); None: refuse it."""
        now = time.monotonic() if now is None else now
        with self._locked():
            count, last, turn = self._get(client) or (0, now, 0.0)
            if now - last > self.forget_after:
                self._drop(client)
                return 0.0
            over = count - self.free_failures
            if over < 0:
                return 0.0
            at = max(now, turn) + min(self.max_delay, self.base_delay * (2**over))
            if at - now > self.max_delay:
                return None
            self._put(client, count, last, at)
        return at - now

    def failed(self, client: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._locked():  # read and written together: concurrent failures all count
            count, last, turn = self._get(client) or (0, now, 0.0)
            if now - last > self.forget_after:
                count, turn = 0, 0.0
            self._put(client, count + 1, now, turn)

    def succeeded(self, client: str) -> None:
        with self._locked():
            self._drop(client)

    # storage: called with ``_locked()`` held
    def _locked(self) -> AbstractContextManager[object]:
        return nullcontext()

    def _get(self, client: str) -> tuple[int, float, float] | None:
        return self._failures.get(client)

    def _put(self, client: str, count: int, last: float, turn: float) -> None:
        self._failures[client] = (count, last, turn)
        if len(self._failures) > 10000:  # bound memory under a spray of addresses
            oldest = sorted(self._failures.items(), key=lambda kv: kv[1][1])[:5000]
            for key, _ in oldest:
                self._failures.pop(key, None)

    def _drop(self, client: str) -> None:
        self._failures.pop(client, None)
