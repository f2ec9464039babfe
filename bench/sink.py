"""The counting sink the relay delivers to (the smarthost), in its own process.

In real use the smarthost is another machine; here it shares the two cores with the hub and
the load generator, so every millisecond it spends is taken from the relay being measured. It
is therefore written for low CPU: blocking sockets, one thread per connection, TLS done by
OpenSSL inside ``SSLSocket`` calls (asyncio's TLS runs its record layer in Python and cost this
sink about three times as much), and replies to pipelined commands sent together. It speaks
STARTTLS because plaintext exceptions may only leave the hub over TLS, and PIPELINING as
Postfix, the usual smarthost, offers it.
"""

from __future__ import annotations

import socket
import ssl
import threading
from multiprocessing.sharedctypes import Synchronized

END = b"\r\n.\r\n"
EHLO_PLAIN = (b"250-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
              b"250 SIZE 104857600\r\n")
EHLO_TLS = b"250-sink\r\n250-STARTTLS\r\n" + EHLO_PLAIN[len(b"250-sink\r\n"):]


class Session:
    """One client connection: commands answered in order, a message counted at its end."""

    def __init__(self, sock: socket.socket, counter: Synchronized, tls: ssl.SSLContext,  # type: ignore[type-arg]
                 ) -> None:
        self.sock: socket.socket = sock
        self.counter = counter
        self.tls = tls
        self.buf = bytearray()  # commands not yet answered
        self.chunk = bytearray(1 << 18)  # what recv_into fills: no fresh buffer a call
        self.view = memoryview(self.chunk)
        self.out: list[bytes] = []

    def _send(self) -> None:
        if self.out:
            self.sock.sendall(b"".join(self.out))
            self.out.clear()

    def _fill(self) -> None:
        """More bytes from the client; what we owe it goes first (it may be waiting for it)."""
        self.buf += self.view[: self._recv()]

    def _recv(self) -> int:
        self._send()
        n = self.sock.recv_into(self.chunk)
        if not n:
            raise EOFError
        return n

    def _line(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buf[:end])
                del self.buf[: end + 2]
                return line
            self._fill()

    def _body(self) -> None:
        """Skip the message up to its lone dot (an empty message is the dot alone).

        The body is searched where it arrives and never copied: only the last four bytes are
        kept, which may begin the end marker. What follows the end (pipelined commands) is
        kept for ``_line``."""
        seen = b"\r\n" + bytes(self.buf)  # the DATA line's CRLF: a lone dot first ends it
        end = seen.find(END)
        if end >= 0:
            del self.buf[: end + len(END) - 2]
            return
        tail = seen[-(len(END) - 1):]
        self.buf.clear()
        while True:
            n = self._recv()
            joint = tail + bytes(self.view[: min(n, len(END) - 1)])
            end = joint.find(END)
            if end >= 0:  # the marker spans the previous read and this one
                self.buf += self.view[end + len(END) - len(tail): n]
                return
            end = self.chunk.find(END, 0, n)
            if end >= 0:
                self.buf += self.view[end + len(END): n]
                return
            tail = (tail + bytes(self.view[max(0, n - len(END) + 1): n]))[-(len(END) - 1):]

    def run(self) -> None:
        self.out.append(b"220 sink ESMTP\r\n")
        secure = False
        while True:
            verb = self._line()[:4].upper()
            if verb == b"EHLO":
                self.out.append(EHLO_PLAIN if secure else EHLO_TLS)
            elif verb == b"STAR" and not secure:
                self.out.append(b"220 2.0.0 go ahead\r\n")
                self._send()
                self.sock = self.tls.wrap_socket(self.sock, server_side=True)
                self.buf.clear()
                secure = True
            elif verb == b"DATA":
                self.out.append(b"354 go ahead\r\n")
                self._body()
                with self.counter.get_lock():
                    self.counter.value += 1
                self.out.append(b"250 2.0.0 kept\r\n")
            elif verb == b"QUIT":
                self.out.append(b"221 bye\r\n")
                self._send()
                return
            else:
                self.out.append(b"250 ok\r\n")


def _serve_one(sock: socket.socket, counter: Synchronized, tls: ssl.SSLContext) -> None:  # type: ignore[type-arg]
    session = Session(sock, counter, tls)
    try:
        session.run()
    except (OSError, EOFError):
        pass
    finally:
        session.sock.close()


def sink_main(port: int, counter: Synchronized, cert: str, key: str) -> None:  # type: ignore[type-arg]
    """Accept connections on loopback ``port`` until the process is terminated."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", port), backlog=128)
    while True:
        sock, _ = listener.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_serve_one, args=(sock, counter, ctx), daemon=True).start()
