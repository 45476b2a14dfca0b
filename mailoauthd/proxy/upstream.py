"""
The proxy's side towards the real mail server: connect (implicit TLS or STARTTLS,
certificates verified), log in with XOAUTH2 or OAUTHBEARER, and hand over the stream.

The SASL response goes on the AUTH/AUTHENTICATE line itself only when that line stays
short (SASL_IR_LIMIT): some servers limit command lines (Dovecot submission: 1026
bytes), and a realistic token is 1.5 to 2.5 KB. Longer ones go on a continuation line.
"""

from __future__ import annotations

import base64
import ssl
from dataclasses import dataclass
from pathlib import Path

import trio

from mailoauthd import hostport
from mailoauthd.proxy.common import Closed, LineReader, LineTooLong
from mailoauthd.proxy.tls import TLSStream

# Lines up to this length carry the initial response; RFC 5321's 1,000 bytes.
SASL_IR_LIMIT = 1000
# A server's answers are bounded as a client's are: a capability list is not a mailbox.
MAX_SERVER_LINE = 65536
IMPLICIT_TLS_PORTS = (993, 995, 465)


class Unavailable(Exception):
    """The upstream could not be reached or spoke nonsense; a temporary failure."""


class Refused(Exception):
    """The upstream refused the token; `reply` is its answer, as it said it."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


@dataclass
class Server:
    """Where and how to reach one upstream."""

    host: str
    port: int
    security: str  # "tls", "starttls" or "none"
    ca_file: Path | None = None

    @classmethod
    def parse(cls, where: str, security: str | None, ca_file: Path | None) -> Server:
        host, port = hostport.parse(where)
        default = "tls" if port in IMPLICIT_TLS_PORTS else "starttls"
        return cls(host, port, security or default, ca_file)


@dataclass
class Session:
    """A logged-in upstream: the stream, its reader (maybe holding bytes), the success line."""

    stream: trio.abc.Stream
    reader: LineReader
    success: str


def xoauth2(user: str, token: str) -> str:
    return base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode()).decode()


def oauthbearer(user: str, token: str, host: str, port: int) -> str:
    safe = user.replace("=", "=3D").replace(",", "=2C")
    text = f"n,a={safe},\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01"
    return base64.b64encode(text.encode()).decode()


def _context(server: Server) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(server.ca_file) if server.ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # TLSStream: a write must never need a read (TLS 1.2 renegotiation).
    context.options |= ssl.OP_NO_RENEGOTIATION
    return context


class Connection:
    """A line-oriented conversation with the upstream, every read bounded by `timeout`."""

    def __init__(self, server: Server, timeout: float) -> None:
        self.server = server
        self.timeout = timeout
        self.stream: trio.abc.Stream | None = None
        self.reader: LineReader | None = None

    async def open(self) -> None:
        try:
            with trio.fail_after(self.timeout):
                tcp = await trio.open_tcp_stream(self.server.host, self.server.port)
                self.stream = tcp
                if self.server.security == "tls":
                    await self._wrap()
        except (OSError, trio.TooSlowError, ssl.SSLError, trio.BrokenResourceError) as exc:
            raise Unavailable(f"cannot reach {self.where}: {_why(exc)}") from None
        self.reader = LineReader(self.stream, limit=MAX_SERVER_LINE)

    async def _wrap(self) -> None:
        assert self.stream is not None
        tls = TLSStream(self.stream, _context(self.server), server_hostname=self.server.host)
        await tls.do_handshake()
        self.stream = tls

    async def starttls(self) -> None:
        try:
            with trio.fail_after(self.timeout):
                await self._wrap()
        except (OSError, trio.TooSlowError, ssl.SSLError, trio.BrokenResourceError) as exc:
            raise Unavailable(f"TLS with {self.where} failed: {_why(exc)}") from None
        assert self.stream is not None
        self.reader = LineReader(self.stream, limit=MAX_SERVER_LINE)

    @property
    def where(self) -> str:
        return f"{self.server.host}:{self.server.port}"

    async def send(self, line: str) -> None:
        assert self.stream is not None
        try:
            await self.stream.send_all(line.encode() + b"\r\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise Unavailable(f"{self.where} closed the connection: {_why(exc)}") from None

    async def line(self) -> str:
        assert self.reader is not None
        try:
            raw = await self.reader.line(self.timeout)
        except Closed:
            raise Unavailable(f"{self.where} closed the connection") from None
        except LineTooLong:
            raise Unavailable(f"{self.where} sent an over-long line") from None
        except trio.TooSlowError:
            raise Unavailable(f"{self.where} did not answer within {self.timeout:g} s") from None
        except (trio.BrokenResourceError, OSError, ssl.SSLError) as exc:
            raise Unavailable(f"{self.where}: {_why(exc)}") from None
        return raw.decode("utf-8", "replace").rstrip("\r\n")

    def session(self, success: str) -> Session:
        assert self.stream is not None
        assert self.reader is not None
        return Session(self.stream, self.reader, success)

    async def close(self) -> None:
        if self.stream is not None:
            with trio.move_on_after(1) as scope:
                scope.shield = True
                await trio.aclose_forcefully(self.stream)


def _why(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate not trusted ({exc.verify_message})"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _without_code(text: str) -> str:
    """An IMAP or POP3 answer's text without its [RESPONSE-CODE]: the proxy sets its own."""
    if text.startswith("[") and "]" in text:
        return text.split("]", 1)[1].strip() or text
    return text


def _mechanism(offered: set[str]) -> str:
    """XOAUTH2 where offered (Microsoft, Google), else OAUTHBEARER (RFC 7628)."""
    if "XOAUTH2" in offered or "OAUTHBEARER" not in offered:
        return "XOAUTH2"
    return "OAUTHBEARER"


def _response(mechanism: str, user: str, token: str, server: Server) -> str:
    if mechanism == "XOAUTH2":
        return xoauth2(user, token)
    return oauthbearer(user, token, server.host, server.port)


async def _guarded(conn: Connection, work: object) -> Session:
    try:
        return await work  # type: ignore[misc, no-any-return]
    except BaseException:
        await conn.close()
        raise


async def imap(server: Server, user: str, token: str, *, wait: float) -> Session:
    """Log in to an IMAP server; Refused with its tagged answer if it says NO."""
    conn = Connection(server, wait)
    return await _guarded(conn, _imap(conn, user, token))


async def _imap_command(conn: Connection, tag: str, command: str) -> tuple[str, list[str]]:
    await conn.send(f"{tag} {command}")
    untagged: list[str] = []
    while True:
        line = await conn.line()
        if line.startswith(tag + " "):
            return line, untagged
        untagged.append(line)


async def _imap(conn: Connection, user: str, token: str) -> Session:
    await conn.open()
    greeting = await conn.line()
    if not greeting.upper().startswith("* OK"):
        raise Unavailable(f"{conn.where} greeted with {greeting[:200]!r}")
    if conn.server.security == "starttls":
        answer, _ = await _imap_command(conn, "M0", "STARTTLS")
        if not answer.upper().startswith("M0 OK"):
            raise Unavailable(f"{conn.where} refused STARTTLS: {answer[:200]}")
        await conn.starttls()
    _, untagged = await _imap_command(conn, "M1", "CAPABILITY")
    words = {
        w.upper()
        for line in untagged
        if line.upper().startswith("* CAPABILITY")
        for w in line.split()
    }
    mechanism = _mechanism({w[5:] for w in words if w.startswith("AUTH=")})
    response = _response(mechanism, user, token, conn.server)
    command = f"M2 AUTHENTICATE {mechanism}"
    sent = False
    if "SASL-IR" in words and len(command) + len(response) + 3 <= SASL_IR_LIMIT:
        await conn.send(f"{command} {response}")
        sent = True
    else:
        await conn.send(command)
    while True:
        line = await conn.line()
        if line.startswith("+"):
            # The first prompt takes the response; a later one carries an error (XOAUTH2's
            # JSON), which the client acknowledges with an empty line.
            await conn.send("" if sent else response)
            sent = True
        elif line.startswith("M2 "):
            status = line[3:].split(" ", 1)[0].upper()
            if status == "OK":
                return conn.session(line[3:])
            raise Refused(_without_code(line[3:].split(" ", 1)[-1]))


async def pop3(server: Server, user: str, token: str, *, wait: float) -> Session:
    """Log in to a POP3 server (RFC 5034 AUTH); Refused with its -ERR line."""
    conn = Connection(server, wait)
    return await _guarded(conn, _pop3(conn, user, token))


async def _pop3(conn: Connection, user: str, token: str) -> Session:
    await conn.open()
    greeting = await conn.line()
    if not greeting.startswith("+OK"):
        raise Unavailable(f"{conn.where} greeted with {greeting[:200]!r}")
    if conn.server.security == "starttls":
        await conn.send("STLS")
        if not (answer := await conn.line()).startswith("+OK"):
            raise Unavailable(f"{conn.where} refused STLS: {answer[:200]}")
        await conn.starttls()
    await conn.send("CAPA")
    offered: set[str] = set()
    if (await conn.line()).startswith("+OK"):
        while (line := await conn.line()) != ".":
            if line.upper().startswith("SASL "):
                offered.update(line.upper().split()[1:])
    mechanism = _mechanism(offered)
    # RFC 5034 bounds the AUTH line at 255 bytes: the response always goes on its own line.
    await conn.send(f"AUTH {mechanism}")
    sent = False
    while True:
        line = await conn.line()
        if line.startswith("+OK"):
            return conn.session(line)
        if line.startswith("+"):
            await conn.send("" if sent else _response(mechanism, user, token, conn.server))
            sent = True
        else:
            raise Refused(_without_code(line.removeprefix("-ERR").strip()))


async def _smtp_reply(conn: Connection) -> tuple[int, list[str]]:
    lines = []
    while True:
        line = await conn.line()
        if len(line) < 3 or not line[:3].isdigit():
            raise Unavailable(f"{conn.where} answered {line[:200]!r}")
        lines.append(line[4:])
        if line[3:4] != "-":
            return int(line[:3]), lines


async def smtp(server: Server, user: str, token: str, *, helo: str, wait: float) -> Session:
    """Log in to an SMTP submission server (RFC 4954); Refused with its reply."""
    conn = Connection(server, wait)
    return await _guarded(conn, _smtp(conn, user, token, helo))


async def _smtp(conn: Connection, user: str, token: str, helo: str) -> Session:
    await conn.open()
    code, lines = await _smtp_reply(conn)
    if code != 220:
        raise Unavailable(f"{conn.where} greeted with {code} {' '.join(lines)[:200]}")
    await conn.send(f"EHLO {helo}")
    code, lines = await _smtp_reply(conn)
    if code != 250:
        raise Unavailable(f"{conn.where} refused EHLO: {code} {' '.join(lines)[:200]}")
    if conn.server.security == "starttls":
        await conn.send("STARTTLS")
        code, answer = await _smtp_reply(conn)
        if code != 220:
            raise Unavailable(f"{conn.where} refused STARTTLS: {code} {' '.join(answer)[:200]}")
        await conn.starttls()
        await conn.send(f"EHLO {helo}")
        code, lines = await _smtp_reply(conn)
        if code != 250:
            raise Unavailable(f"{conn.where} refused EHLO: {code} {' '.join(lines)[:200]}")
    offered = {
        w for line in lines if line.upper().startswith("AUTH") for w in line.upper().split()[1:]
    }
    mechanism = _mechanism(offered)
    response = _response(mechanism, user, token, conn.server)
    sent = False
    if len(mechanism) + len(response) + 8 <= SASL_IR_LIMIT:
        await conn.send(f"AUTH {mechanism} {response}")
        sent = True
    else:
        await conn.send(f"AUTH {mechanism}")
    while True:
        code, lines = await _smtp_reply(conn)
        if code == 334:
            await conn.send("" if sent else response)
            sent = True
        elif code == 235:
            return conn.session(f"{code} {lines[-1]}")
        elif 400 <= code < 500:
            raise Unavailable(f"{conn.where} answered {code} {' '.join(lines)[:200]}")
        else:
            raise Refused(f"{code} {' '.join(lines)}")
