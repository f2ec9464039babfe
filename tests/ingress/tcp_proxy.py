"""A tiny loopback TCP proxy that cuts a connection in the middle of a server response.

Why: a dropped connection mid-FETCH (a NAT timeout, a server crash while streaming a large
message) must not lose or double a message; a real cut of the real byte stream tests that.
"""

from __future__ import annotations

import socket
import threading


class CuttingProxy:
    """Forward 127.0.0.1:<port> to (host, port); cut ``cuts`` connections once the server has
    sent ``cut_after`` bytes after the client sent a command containing ``trigger``."""

    def __init__(self, host: str, port: int, *, trigger: bytes = b"FETCH",
                 cut_after: int = 2000, cuts: int = 1) -> None:
        self.target = (host, port)
        self.trigger = trigger
        self.cut_after = cut_after
        self.cuts_left = cuts
        self.cuts_done = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = int(self._listener.getsockname()[1])
        self._closed = threading.Event()
        self._socks: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self.connections += 1
                self._socks += [client, server]
            armed = threading.Event()
            threading.Thread(target=self._up, args=(client, server, armed), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, armed), daemon=True).start()

    def _up(self, src: socket.socket, dst: socket.socket, armed: threading.Event) -> None:
        """Client → server; arms the cut when the trigger command goes by."""
        try:
            while data := src.recv(65536):
                if self.trigger in data:
                    armed.set()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close_both(src, dst)

    def _down(self, src: socket.socket, dst: socket.socket, armed: threading.Event) -> None:
        """Server → client; after the trigger, forwards ``cut_after`` bytes and then cuts."""
        sent_after = 0
        try:
            while data := src.recv(65536):
                if armed.is_set():
                    with self._lock:
                        cutting = self.cuts_left > 0
                    if cutting:
                        room = self.cut_after - sent_after
                        if len(data) >= room:
                            dst.sendall(data[:room])
                            with self._lock:
                                self.cuts_left -= 1
                                self.cuts_done += 1
                            return
                        sent_after += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close_both(src, dst)

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        self._thread.join(5)
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            _close_both(s)


def _close_both(*socks: socket.socket) -> None:
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()
