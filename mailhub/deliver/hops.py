"""The delivery worker's connections to its next hops: one per sender thread and relay.

Kept apart from ``worker`` (which decides what is sent and records outcomes) because their
lifetime has rules of its own: made on a thread's first use, and at shutdown either closed with
QUIT or, when a next hop has not answered within the worker's grace, cut off first.
"""

from __future__ import annotations

import threading

from mailhub.config import DeliveryConfig, HostPort
from mailhub.deliver.smtp_client import SmtpConnection


class NextHops:
    """Every connection the sender threads opened (each thread uses only its own)."""

    def __init__(self, cfg: DeliveryConfig, helo: str) -> None:
        self.cfg = cfg
        self.helo = helo
        self.abort = threading.Event()  # set past the shutdown grace: no send is made again
        self._local = threading.local()
        self._all: list[SmtpConnection] = []
        self._lock = threading.Lock()

    def hop(self, relay: str) -> HostPort:
        if relay == "internal" and self.cfg.internal_relay is not None:
            return self.cfg.internal_relay
        return self.cfg.smarthost

    def connection(self, relay: str) -> SmtpConnection:
        """This thread's connection to the relay's next hop (made on first use)."""
        try:
            return self._local.conns[relay]  # type: ignore[no-any-return]
        except AttributeError:
            self._local.conns = {}
        except KeyError:
            pass
        hop = self.hop(relay)
        conn = SmtpConnection(hop.host, hop.port, starttls=self.cfg.starttls,
                              ca_file=self.cfg.ca_file, helo=self.helo, abort=self.abort)
        self._local.conns[relay] = conn
        with self._lock:
            self._all.append(conn)
        return conn

    def cut_off(self) -> None:
        """End every send still waiting on a next hop (from the shutting-down thread)."""
        self.abort.set()
        with self._lock:
            for conn in self._all:
                conn.cut_off()

    def close(self) -> None:
        """QUIT every connection (the sender threads are done with them)."""
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()
