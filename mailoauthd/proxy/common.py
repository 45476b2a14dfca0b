"""
What the IMAP, POP3 and SMTP proxies share: limits, bounded line reading, the splice,
the penalty for wrong passwords, and the answers a login can get.

Before a client has logged in everything it sends is bounded: a line is at most
MAX_LINE bytes, every read waits at most `read_timeout`, the whole login at most
LOGIN_DEADLINE, and a listener serves at most MAX_CONNECTIONS clients, of them
MAX_PER_SOURCE from one address. After the login the proxy copies bytes both ways
untouched, in chunks of CHUNK bytes: no buffer grows with what a client sends.
"""

from __future__ import annotations

import base64
import binascii
import math
import resource
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

# A login line (a command with a password) fits easily; IMAP literals are bounded too.
MAX_LINE = 8192
# 1,000 idle IMAP sessions (issue #12's figure) fit; each holds two sockets.
MAX_CONNECTIONS = 1024
MAX_PER_SOURCE = 64
READ_TIMEOUT = 60.0
LOGIN_DEADLINE = 300.0
# Commands a client may send before logging in, so that a stream of NOOPs cannot
# keep a connection (and its slot) forever.
MAX_COMMANDS = 100
CHUNK = 131072
# Wrong passwords from one address: the answer waits PENALTY_BASE * 2^(n-1) seconds
# up to PENALTY_CAP; an address is forgotten after PENALTY_MEMORY seconds of quiet.
PENALTY_BASE = 0.5
PENALTY_CAP = 30.0
PENALTY_MEMORY = 900.0
MAX_TRACKED_SOURCES = 10000


class LineTooLong(Exception):
    """The client sent a line longer than the limit."""


class Closed(Exception):
    """The other end closed the connection."""


class LineReader:
    """Reads CRLF (or LF) terminated lines from a stream, bounded in size and time."""

    def __init__(self, stream: trio.abc.Stream, *, limit: int = MAX_LINE) -> None:
        self.stream = stream
        self.limit = limit
        self.buffer = bytearray()

    async def line(self, seconds: float) -> bytes:
        """The next line with its terminator; raises Closed, LineTooLong or trio.TooSlowError."""
        with trio.fail_after(seconds):
            while True:
                end = self.buffer.find(b"\n")
                if end >= 0:
                    line = bytes(self.buffer[: end + 1])
                    del self.buffer[: end + 1]
                    return line
                if len(self.buffer) > self.limit:
                    raise LineTooLong
                data = await self.stream.receive_some(self.limit)
                if not data:
                    raise Closed
                self.buffer += data

    async def exactly(self, size: int, seconds: float) -> bytes:
        """`size` bytes (an IMAP literal); size is checked by the caller."""
        with trio.fail_after(seconds):
            while len(self.buffer) < size:
                data = await self.stream.receive_some(self.limit)
                if not data:
                    raise Closed
                self.buffer += data
            chunk = bytes(self.buffer[:size])
            del self.buffer[:size]
            return chunk

    def take_rest(self) -> bytes:
        """What was read beyond the last line: passed on when the splice begins."""
        rest = bytes(self.buffer)
        self.buffer.clear()
        return rest


async def _copy(source: trio.abc.ReceiveStream, sink: trio.abc.SendStream) -> None:
    try:
        while data := await source.receive_some(CHUNK):
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def splice(client: trio.abc.Stream, upstream: trio.abc.Stream) -> int:
    """Copy bytes both ways until either side closes; then close both."""
    async with trio.open_nursery() as nursery:

        async def one_way(a: trio.abc.Stream, b: trio.abc.Stream) -> None:
            await _copy(a, b)
            nursery.cancel_scope.cancel()

        nursery.start_soon(one_way, client, upstream)
        nursery.start_soon(one_way, upstream, client)
    for stream in (client, upstream):
        with trio.move_on_after(1) as scope:
            scope.shield = True
            await trio.aclose_forcefully(stream)
    return 0


def plain_credentials(response: bytes) -> tuple[str, str] | None:
    """The user and password of a SASL PLAIN response (base64), or None if malformed."""
    try:
        decoded = base64.b64decode(response.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    parts = decoded.split("\0")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        return None
    authzid, user, password = parts
    if authzid and authzid != user:
        return None  # acting for another user is not offered
    return user, password


def b64text(response: bytes) -> str | None:
    """A base64 line (AUTH LOGIN) as text, or None."""
    try:
        return base64.b64decode(response.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None


@dataclass
class Penalties:
    """Growing delays for wrong passwords, per source address; bounded in memory."""

    base: float = PENALTY_BASE
    cap: float = PENALTY_CAP
    memory: float = PENALTY_MEMORY
    clock: Callable[[], float] = time.monotonic
    _failures: dict[str, tuple[int, float]] = field(default_factory=dict)

    def failed(self, source: str) -> float:
        """Record a failure; returns how long to wait before answering it."""
        now = self.clock()
        count, last = self._failures.pop(source, (0, now))
        if now - last > self.memory:
            count = 0
        count += 1
        if len(self._failures) >= MAX_TRACKED_SOURCES:
            # The oldest entry goes: dicts keep insertion order, and a failure re-inserts.
            del self._failures[next(iter(self._failures))]
        self._failures[source] = (count, now)
        return min(self.cap, self.base * 2.0 ** min(count - 1, 32))

    def count(self, source: str) -> int:
        entry = self._failures.get(source)
        return 0 if entry is None else entry[0]


class Outcome:
    """How a login ended, as each protocol words it."""

    OK = "ok"
    BAD_PASSWORD = "bad-password"  # noqa: S105 (a name, not a password)
    NEEDS_AUTH = "needs-auth"
    UNAVAILABLE = "unavailable"
    REFUSED = "refused"  # the upstream refused a current token


@dataclass
class Denied(Exception):
    """A login that did not succeed: the outcome and the text for the client."""

    outcome: str
    text: str


@dataclass
class Limits:
    """Connection caps of one listener, total and per source address."""

    total: int = MAX_CONNECTIONS
    per_source: int = MAX_PER_SOURCE
    open: int = 0
    by_source: dict[str, int] = field(default_factory=dict)

    def admit(self, source: str) -> bool:
        if self.open >= self.total or self.by_source.get(source, 0) >= self.per_source:
            return False
        self.open += 1
        self.by_source[source] = self.by_source.get(source, 0) + 1
        return True

    def release(self, source: str) -> None:
        self.open -= 1
        left = self.by_source.get(source, 1) - 1
        if left > 0:
            self.by_source[source] = left
        else:
            self.by_source.pop(source, None)


def raise_open_files_limit() -> int:
    """Lift the soft limit on open files to the hard one; the new soft limit.

    A proxied session holds two sockets, and a listener up to MAX_CONNECTIONS of them:
    systemd's default soft limit (1024) would run out at about 500. The daemon waits
    with epoll, never select(), so descriptors above 1024 are fine.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError):
        return soft
    return want


def source_of(stream: trio.abc.Stream) -> str:
    """The client's address (without the port), for limits and logs."""
    sock = getattr(stream, "socket", None)
    try:
        peer = sock.getpeername() if sock is not None else None
    except OSError:
        peer = None
    if isinstance(peer, tuple):
        return str(peer[0])
    return "unknown"


async def delayed(seconds: float, answer: Callable[[], Awaitable[None]]) -> None:
    """Answer after a penalty delay."""
    if seconds > 0 and math.isfinite(seconds):
        await trio.sleep(seconds)
    await answer()
