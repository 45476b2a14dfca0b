"""
The Unix socket's server: the accept loop, per-connection limits, one request each.

One request per connection (protocol.py). The peer's uid is read with
SO_PEERCRED (peers.py) before anything else and checked against the allowed uids
(per-user mode); in system mode everyone is let in and a gate from `daemon`
decides each request by the peer's uid and groups (access.py). The listener is
bound or inherited from systemd in listening.py. Every connection is bounded in
time (`read_timeout` to send its line, `write_timeout` to take the answer: the
Server's arguments) and in size (MAX_LINE); at most MAX_CONNECTIONS are
served at once (slots.py). When all are taken, the connection that has waited longest
without sending its line is told "busy" to make room for the newcomer; only
when every one is a request being served is the newcomer told "busy".
In system mode no one uid but the administrators' holds more than MAX_PER_UID,
and the last ADMIN_RESERVE slots are for administrators only; a request that
may wait is given up when its client hangs up. Every request is checked and
typed once (request.parse) for both paths; the op table (ops.py) says which
wait and which are conversations. A fault nobody foresaw ends
only its own request, answered "internal" (lastresort.py).
Whatever one client does, the others are served. The server knows nothing of
tokens: `daemon` hands it handlers (handlers.py), and a quick handler for what
can be answered from memory.

Under load the helper's line is usually waiting by the time we accept the
connection, and most token requests need no waiting: those are answered in
the accept loop itself, without a task (see `Server._answer_at_once`). That
path is what lets one Python thread serve tens of thousands of requests a
second; anything else (a line not yet here, a refresh to wait for, a refused
peer, a malformed line) goes to a task of its own as before.

A few operations are conversations (`authorize`): their handler gets a Channel
(channel.py) to send event lines and read further lines on the same connection, and bounds
its own duration; the final answer is still written here. The client sends a
further line only after it has read the first event, so nothing follows the
request line in the first read.
"""

from __future__ import annotations

import contextlib
import select
import socket as stdsocket
from collections.abc import Awaitable, Callable, Collection

import structlog
import trio

from mailoauthd import protocol
from mailoauthd.errors import INTERNAL, AccessDenied, Busy, MailoauthdError, ProtocolError, TimedOut
from mailoauthd.fastpath import accept_fd
from mailoauthd.lastresort import fault
from mailoauthd.serve.channel import WRITE_TIMEOUT, Conversation
from mailoauthd.serve.channel import Channel as Channel
from mailoauthd.serve.listening import bind as bind
from mailoauthd.serve.listening import inherited as inherited
from mailoauthd.serve.listening import listen_fds as listen_fds
from mailoauthd.serve.ops import OPS
from mailoauthd.serve.peers import Peer as Peer
from mailoauthd.serve.peers import peer_of as peer_of
from mailoauthd.serve.request import Request, parse, shown
from mailoauthd.serve.slots import ADMIN_RESERVE as ADMIN_RESERVE
from mailoauthd.serve.slots import BUSY, Privileged, Slots
from mailoauthd.serve.slots import MAX_CONNECTIONS as MAX_CONNECTIONS
from mailoauthd.serve.slots import MAX_PER_UID as MAX_PER_UID

log = structlog.get_logger(__name__)

# A well-behaved helper sends its line at once; 5 s is generous on a loaded box
# and short enough that silent clients cannot pile up. (Defaults: Server takes others;
# WRITE_TIMEOUT, the time to take an answer, is channel.py's.)
READ_TIMEOUT = 5.0
# A refused newcomer is not worth waiting for long: "busy" gets this long to go out.
BUSY_TIMEOUT = 1.0
# How often a client that half-closed its side is checked for having gone entirely.
HANGUP_POLL = 1.0
# Connections taken per wake-up before other tasks get their turn: enough to
# drain a burst in one go, few enough that a scheduled refresh never waits long.
ACCEPT_BATCH = 64
# What the general path reads at a time too, so that a line is cut in the same
# places either way (an oversized line is drained alike).
QUICK_READ = 65536


Handler = Callable[[Request, Peer], Awaitable[dict[str, object]]]
# Decides whether this peer may make this request; raises (AccessDenied) when not.
Gate = Callable[[Request, Peer], None]
# Answers a request on the spot when that needs no waiting; None hands it to the Handler.
QuickHandler = Callable[[Request, Peer], dict[str, object] | None]


class Server:
    """Accepts connections and runs one request on each."""

    def __init__(
        self,
        handler: Handler,
        *,
        allowed_uids: Collection[int] | None,
        gate: Gate | None = None,
        peer_groups: bool = False,
        quick: QuickHandler | None = None,
        converse: Conversation | None = None,
        privileged: Privileged | None = None,
        read_timeout: float = READ_TIMEOUT,
        write_timeout: float = WRITE_TIMEOUT,
        busy_timeout: float = BUSY_TIMEOUT,
        hangup_poll: float = HANGUP_POLL,
    ) -> None:
        self.handler = handler
        self.quick = quick
        # The time each connection gets (tests shorten them instead of sleeping).
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.busy_timeout = busy_timeout
        self.hangup_poll = hangup_poll
        self.slots = Slots(privileged)  # who gets a connection slot (slots.py)
        # Answers the operations that talk back and forth (ops.OPS: `conversation`).
        self.converse = converse
        # None: every local user is let in, and `gate` decides each request (system mode).
        self.allowed_uids = None if allowed_uids is None else frozenset(allowed_uids)
        self.gate = gate
        self.peer_groups = peer_groups  # read each peer's supplementary groups, for `gate`

    @property
    def active(self) -> int:
        """Connections being served now (by tasks; the quick path takes no slot)."""
        return self.slots.active

    def _admitted(self, peer: Peer) -> bool:
        return self.allowed_uids is None or peer.uid in self.allowed_uids

    async def serve(
        self,
        listener: stdsocket.socket,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept forever on a non-blocking listener; `started` once listening."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                await trio.lowlevel.wait_readable(listener)
                for _ in range(ACCEPT_BATCH):
                    try:
                        # A plain C-level socket: the Python subclass's constructor
                        # and close() are a visible share of a quick answer.
                        fd = accept_fd(listener)
                        conn = stdsocket.SocketType(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM, 0, fd)
                    except BlockingIOError:
                        break
                    except OSError as exc:
                        # EMFILE and friends: back off instead of spinning; the
                        # listener stays open and clients queue in the backlog.
                        log.error("socket.accept_failed", error=str(exc))
                        await trio.sleep(0.1)
                        break
                    try:
                        self._take(nursery, conn)
                    except Exception as exc:  # the last resort: the loop must go on
                        fault("socket.accept_fault", exc)
                        conn.close()

    def _take(self, nursery: trio.Nursery, conn: stdsocket.SocketType) -> None:
        """Answer a new connection at once, or give it a task, or say "busy"."""
        peer, received, request, reply = self._answer_at_once(conn)
        if reply is not None:
            rest = _send_at_once(conn, reply)
            if not rest:
                conn.close()
                return
            nursery.start_soon(self._send_rest, _stream(conn), rest)
            return
        refusal = self.slots.admit(peer)
        if refusal is not None:
            nursery.start_soon(self._refuse_busy, _stream(conn), refusal)
            return
        nursery.start_soon(self._connection, _stream(conn), peer, received, request)

    def _answer_at_once(
        self, conn: stdsocket.SocketType
    ) -> tuple[Peer | None, bytes, Request | None, bytes | None]:
        """
        Answer without a task when the line is already here and needs no waiting.

        A task, its cancel scopes and its scheduling rounds cost more than
        everything else a request does (docs/performance.md), so a request
        that can be answered at once is answered here, in the accept loop.

        Returns:
            The peer (None when the kernel cannot tell), what was read and the
            request it holds, if it was read whole and checked (for the general
            path, when it must take over: it does not read or check it again),
            and the answer line, or None when the general path must take over.
        """
        try:
            peer = peer_of(conn, groups=self.peer_groups)
        except OSError:
            return None, b"", None, None
        if self.quick is None:
            return peer, b"", None, None
        try:
            received = conn.recv(QUICK_READ, stdsocket.MSG_DONTWAIT)
        except OSError:  # BlockingIOError: the line is not here yet
            return peer, b"", None, None
        newline = received.find(b"\n")
        if newline < 0 or not self._admitted(peer):
            return peer, received, None, None
        try:
            request = parse(protocol.decode(received[:newline]))
        except (MailoauthdError, protocol.WireError):
            return peer, received, None, None  # the general path says what is wrong
        try:
            reply = self.quick(request, peer)
        except MailoauthdError:
            return peer, received, request, None  # the handler says it again, on the general path
        except Exception as exc:  # the last resort; the general path answers "internal"
            fault("request.quick_fault", exc, uid=peer.uid, pid=peer.pid)
            return peer, received, request, None
        return peer, received, request, None if reply is None else protocol.encode(reply)

    async def _send_rest(self, stream: trio.SocketStream, rest: bytes) -> None:
        await _send(stream, rest, self.write_timeout)
        await _close(stream)

    async def _refuse_busy(self, stream: trio.SocketStream, message: str = BUSY) -> None:
        reply = protocol.error_reply(Busy.code, message, "")
        await _send(stream, protocol.encode(reply), self.busy_timeout)
        await _close(stream)

    async def _connection(
        self,
        stream: trio.SocketStream,
        peer: Peer | None,
        received: bytes = b"",
        request: Request | None = None,
    ) -> None:
        try:
            try:
                reply = await self._answer(stream, peer, received, request)
            except Exception as exc:  # the last resort: one request's fault ends only it
                fault(
                    "request.internal_error",
                    exc,
                    uid=None if peer is None else peer.uid,
                    pid=None if peer is None else peer.pid,
                )
                reply = protocol.error_reply(
                    INTERNAL,
                    "mailoauthd failed on this request; its log says where",
                    "try again; if it persists, report it with the daemon's log",
                )
            await _send(stream, protocol.encode(reply), self.write_timeout)
        finally:
            self.slots.release(peer)
            await _close(stream)

    async def _answer(
        self,
        stream: trio.SocketStream,
        peer: Peer | None,
        received: bytes,
        request: Request | None,
    ) -> dict[str, object]:
        """The answer to the connection's request; `request` when the quick path checked it."""
        if peer is None:
            try:
                peer = peer_of(stream.socket, groups=self.peer_groups)
            except OSError as exc:
                return protocol.error_reply(AccessDenied.code, f"cannot identify the peer: {exc}")
        if request is None:
            read = await self._request(stream, peer, received)
            if not isinstance(read, Request):
                return read  # what is wrong with it, as the answer
            request = read
        try:
            if self.gate is not None:
                self.gate(request, peer)  # before any operation, conversations included
            op = OPS[request.op]
            if op.conversation and self.converse is not None:
                return await self.converse(
                    request, peer, Channel(stream, write_timeout=self.write_timeout)
                )
            if not op.waits:
                return await self.handler(request, peer)
            return await self._unless_hung_up(stream, request, peer)
        except MailoauthdError as exc:
            return protocol.error_reply(exc.code, exc.message, exc.hint)

    async def _request(
        self, stream: trio.SocketStream, peer: Peer, received: bytes
    ) -> Request | dict[str, object]:
        """Read the request line after what was `received`, and check it; or the error answer."""
        try:
            # Read the line even from a peer we will refuse: closing on unread
            # data would reset the connection and lose our answer.
            with self.slots.silent() as waiting, trio.fail_after(self.read_timeout):
                line = await _read_line(stream, received)
            if waiting.cancelled_caught:  # evicted to make room (see serve)
                return protocol.error_reply(Busy.code, f"{BUSY}; this one sent nothing")
            if not self._admitted(peer):
                log.info("request.refused", uid=peer.uid, pid=peer.pid, reason="uid not allowed")
                return protocol.error_reply(
                    AccessDenied.code,
                    f"uid {peer.uid} may not use this mailoauthd",
                    "ask its administrator, or run your own per-user mailoauthd",
                )
            return parse(protocol.decode(line))
        except (ProtocolError, protocol.WireError) as exc:
            log.info("request.malformed", uid=peer.uid, pid=peer.pid, error=str(exc))
            return protocol.error_reply(ProtocolError.code, f"malformed request: {exc}")
        except trio.TooSlowError:
            return protocol.error_reply(
                TimedOut.code, f"no complete request line within {self.read_timeout:g} s"
            )
        except (trio.BrokenResourceError, OSError) as exc:
            return protocol.error_reply(ProtocolError.code, f"connection failed: {exc}")

    async def _unless_hung_up(
        self, stream: trio.SocketStream, request: Request, peer: Peer
    ) -> dict[str, object]:
        """
        Run the handler while watching the client: one that hangs up is not waited for.

        A mail program killed while its `token --wait` waits must not keep its slot
        for an hour. Nothing may follow the request line, so the socket is watched
        for the hang-up alone (POLLHUP: both directions closed); a client that only
        half-closed its side is still there, and is checked every `hangup_poll`.
        """
        answer: list[dict[str, object]] = []

        async def work() -> None:
            try:
                answer.append(await self.handler(request, peer))
            except MailoauthdError as exc:  # raised out of the nursery it would come wrapped
                answer.append(protocol.error_reply(exc.code, exc.message, exc.hint))
            nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(work)
            await _hang_up(stream.socket, self.hangup_poll)
            nursery.cancel_scope.cancel()
        if answer:
            return answer[0]
        log.info(
            "request.abandoned",
            uid=peer.uid,
            pid=peer.pid,
            op=request.op,
            account=shown(request.account),
            reason="the client hung up",
        )
        return protocol.error_reply(TimedOut.code, "the client hung up")


async def _hang_up(sock: trio.socket.SocketType, poll: float) -> None:
    """Return once the peer has closed its end entirely; what it sends meanwhile is dropped."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    while True:
        await trio.lowlevel.wait_readable(sock)
        events = poller.poll(0)
        if any(mask & (select.POLLHUP | select.POLLERR) for _, mask in events):
            return
        try:
            data = sock.recv(65536, stdsocket.MSG_DONTWAIT)
        except BlockingIOError:
            continue
        except OSError:
            return
        if not data:  # half-closed: readable for good, so look again in a while
            await trio.sleep(poll)


def _stream(conn: stdsocket.SocketType) -> trio.SocketStream:
    sock = stdsocket.socket(fileno=conn.detach())
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


async def _send(stream: trio.SocketStream, line: bytes, seconds: float) -> None:
    """Send an answer within `seconds`; a peer that is gone, or does not read, loses it."""
    with (
        trio.move_on_after(seconds),
        contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
    ):
        await stream.send_all(line)


async def _close(stream: trio.SocketStream) -> None:
    with contextlib.suppress(OSError):
        await stream.aclose()


def _send_at_once(conn: stdsocket.SocketType, line: bytes) -> bytes:
    """Send what the socket takes now; returns the rest (empty: done, or the peer is gone)."""
    try:
        return line[conn.send(line, stdsocket.MSG_DONTWAIT) :]
    except BlockingIOError:
        return line
    except OSError:
        return b""


async def _read_line(stream: trio.SocketStream, received: bytes = b"") -> bytes:
    """One line of at most MAX_LINE bytes, after what was `received`; the caller bounds it."""
    buffer = bytearray()
    while True:
        chunk = received or await stream.receive_some(65536)
        received = b""
        if not chunk:
            if not buffer:
                raise ProtocolError("empty request")
            return bytes(buffer)  # a client that half-closed instead of sending "\n"
        newline = chunk.find(b"\n")
        if newline >= 0:
            buffer += chunk[:newline]
            if len(buffer) > protocol.MAX_LINE:
                break
            return bytes(buffer)
        buffer += chunk
        if len(buffer) > protocol.MAX_LINE:
            break
    raise ProtocolError(f"request longer than {protocol.MAX_LINE} bytes")
