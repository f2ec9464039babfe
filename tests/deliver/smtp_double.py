"""A small scripted SMTP server on loopback that records exactly what it receives.

Unlike aiosmtpd it advertises PIPELINING (and STARTTLS when given a context), can hold the
replies to MAIL and RCPT until DATA arrives (as a pipelining server may: a lock-step client
would wait for ever, so a delivered message proves the commands came as one group), refuse any
step, answer with multi-line replies and hang up mid-transaction. Also: TLS material for tests.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass
class Transaction:
    commands: list[bytes]  # MAIL, RCPT, DATA lines as received (with CRLF)
    body: bytes | None  # the DATA bytes as received (still dot-stuffed), without the "." line
    tls: bool


@dataclass
class SmtpDouble:
    pipelining: bool = True
    smtputf8: bool = True
    tls: ssl.SSLContext | None = None
    hold_until_data: bool = False  # replies to MAIL/RCPT only once DATA was read
    mail_reply: str = "250 2.1.0 sender ok"
    rcpt_replies: dict[str, str] = field(default_factory=dict)  # address -> reply
    data_reply: str | None = None  # None: 354 when MAIL and RCPT were accepted, else 554
    final_reply: str = "250 2.0.0 queued as X1"
    drop_at: str = ""  # a verb ("MAIL", "DATA", ".") at which to hang up without a reply
    drops: int = 0  # how many connections hang up there (-1: all of them)
    drop_skip: int = 0  # times ``drop_at`` is passed on a connection before it hangs up there
    final_delay: float = 0.0  # seconds before the reply to a message's data (-1: never)
    lines: list[bytes] = field(default_factory=list)  # every command line, every connection
    transactions: list[Transaction] = field(default_factory=list)
    connections: int = 0
    port: int = 0

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self.on_data: list[object] = []  # callables run when a body has been read
        self._passed: dict[int, int] = {}  # connection -> times it passed ``drop_at``

    def start(self) -> SmtpDouble:
        self._thread.start()

        async def serve() -> asyncio.base_events.Server:
            return await asyncio.start_server(self._session, "127.0.0.1", 0)

        self._server = asyncio.run_coroutine_threadsafe(serve(), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def verbs(self) -> list[str]:
        return [line[:4].decode().upper() for line in self.lines]

    def _drops_now(self, verb: str, conn: int) -> bool:
        if self.drop_at != verb or not (self.drops < 0 or conn < self.drops):
            return False
        seen = self._passed.get(conn, 0)
        self._passed[conn] = seen + 1
        return seen >= self.drop_skip

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = self.connections
        self.connections += 1
        tls = False
        out: list[str] = []
        commands: list[bytes] = []
        mail_ok = rcpt_ok = False
        writer.write(b"220 double ESMTP\r\n")
        try:
            while line := await reader.readline():
                self.lines.append(line)
                verb = line[:4].decode("utf-8", "replace").upper()
                if self._drops_now(verb, conn):
                    return
                if verb == "EHLO":
                    ext = ["8BITMIME", "SIZE 10485760"] + (["SMTPUTF8"] if self.smtputf8 else [])
                    ext += ["PIPELINING"] if self.pipelining else []
                    ext += ["STARTTLS"] if self.tls is not None and not tls else []
                    out.append("\r\n".join(["250-double"] + [f"250-{e}" for e in ext[:-1]]
                                           + [f"250 {ext[-1]}"]))
                elif verb == "STAR" and self.tls is not None and not tls:
                    writer.write(b"220 2.0.0 go ahead\r\n")
                    await writer.drain()
                    await writer.start_tls(self.tls)
                    tls = True
                elif verb == "MAIL":
                    commands = [line]
                    mail_ok = self.mail_reply.startswith("250")
                    out.append(self.mail_reply)
                elif verb == "RCPT":
                    commands.append(line)
                    address = line.split(b":", 1)[1].strip().split(b">")[0].lstrip(b"<").decode()
                    reply = self.rcpt_replies.get(address, "250 2.1.5 ok")
                    rcpt_ok = reply.startswith("25")
                    out.append(reply)
                elif verb == "DATA":
                    commands.append(line)
                    reply = self.data_reply or ("354 go ahead" if mail_ok and rcpt_ok
                                                else "554 5.5.1 no valid recipients")
                    out.append(reply)
                    writer.write("".join(r + "\r\n" for r in out).encode())
                    out = []
                    if reply.startswith("354"):
                        body = await self._read_body(reader)
                        if self._drops_now(".", conn):
                            return
                        self.transactions.append(Transaction(commands, body, tls))
                        for hook in self.on_data:
                            hook()  # type: ignore[operator]
                        if self.final_delay < 0:  # a next hop that never answers
                            await reader.read()
                            return
                        await asyncio.sleep(self.final_delay)  # scanning the message, say
                        out.append(self.final_reply)
                    mail_ok = rcpt_ok = False
                elif verb == "RSET":
                    mail_ok = rcpt_ok = False
                    out.append("250 2.0.0 reset")
                elif verb == "QUIT":
                    writer.write(b"221 2.0.0 bye\r\n")
                    await writer.drain()
                    return
                else:
                    out.append("502 5.5.2 not here")
                if out and not (self.hold_until_data and verb in ("MAIL", "RCPT")):
                    writer.write("".join(r + "\r\n" for r in out).encode())
                    out = []
        except (ConnectionError, ssl.SSLError):
            return
        finally:
            writer.close()

    @staticmethod
    async def _read_body(reader: asyncio.StreamReader) -> bytes:
        lines = []
        while (line := await reader.readuntil(b"\r\n")) != b".\r\n":
            lines.append(line)
        return b"".join(lines)


def unstuff(body: bytes) -> bytes:
    """What the message was: the received DATA lines with transparency dots removed."""
    return b"".join(line[1:] if line.startswith(b".") else line
                    for line in body.splitlines(keepends=True))


@dataclass(frozen=True)
class TlsFiles:
    ca: Path  # the CA that signed the server's certificate
    other_ca: Path  # a CA that did not
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(self.cert), str(self.key))
        return ctx


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_tls_files(directory: Path) -> TlsFiles:
    """A test CA, a server certificate for 127.0.0.1 signed by it, and an unrelated CA."""
    ca_key, ca_cert = _ca("mailhub test CA")
    _, other = _ca("some other CA")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name("127.0.0.1"))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    files = TlsFiles(directory / "ca.pem", directory / "other-ca.pem", directory / "cert.pem",
                     directory / "key.pem")
    files.ca.write_bytes(ca_cert.public_bytes(pem))
    files.other_ca.write_bytes(other.public_bytes(pem))
    files.cert.write_bytes(cert.public_bytes(pem))
    files.key.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    return files


def serve(servers: list[SmtpDouble], **script: object) -> SmtpDouble:
    """Start a scripted server and add it to ``servers`` (the fixture stops them all)."""
    server = SmtpDouble(**script).start()  # type: ignore[arg-type]
    servers.append(server)
    return server
