"""
TLS towards the upstream, reading several TLS records per wake-up.

trio's SSLStream returns one TLS record (at most 16 KB) per receive_some, and every
call is a checkpoint: a large FETCH through the proxy cost two trips through the
event loop (the receive and the client's send) per 16 KB, and ran at about a third
of a direct connection's speed. This stream decrypts everything that one read of the
socket brought (up to the caller's max_bytes) before it returns, so that the splice
moves up to CHUNK bytes per trip.

It is what the splice needs and no more: a client side (the proxy connects upstream),
one task receiving and one sending at a time (each side is checked, as trio's own
streams do), no renegotiation (upstream._context refuses it; TLS 1.3 has none): a
write that needed a read would wait for the other task. An end of the connection
without the server's close_notify reads as the end, as on a plain connection: the
splice treats both alike, and a login reading a line calls either "closed". Memory is bounded: the
incoming buffer is refilled only when the TLS object has used up what it holds, by at
most RECEIVE_SIZE bytes; what one send encrypts is at most SEND_SLICE bytes of
plaintext at a time.
"""

from __future__ import annotations

import ssl

import trio

# One read of the socket: what the kernel has ready, up to this.
RECEIVE_SIZE = 65536
# Plaintext encrypted (and its TLS records sent) per step of send_all.
SEND_SLICE = 65536
DEFAULT_MAX = 65536


class TLSStream(trio.abc.Stream):
    """A TLS client over a trio stream (in practice a SocketStream)."""

    def __init__(
        self, transport: trio.abc.Stream, context: ssl.SSLContext, server_hostname: str
    ) -> None:
        self.transport_stream = transport
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(
            self._incoming, self._outgoing, server_side=False, server_hostname=server_hostname
        )
        # Whoever holds it sends everything the TLS object has written so far, in order.
        self._send_lock = trio.StrictFIFOLock()
        self._receiving = False
        self._sending = False
        self._broken = False
        self._closed = False

    def _check(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError
        if self._broken:
            raise trio.BrokenResourceError

    async def _flush(self) -> None:
        """Send what the TLS object wrote (records, alerts, handshake answers)."""
        async with self._send_lock:
            data = self._outgoing.read()
            if data:
                try:
                    await self.transport_stream.send_all(data)
                except BaseException:
                    # Some of it may have gone out: the TLS stream cannot go on.
                    self._broken = True
                    raise

    async def _refill(self) -> None:
        data = await self.transport_stream.receive_some(RECEIVE_SIZE)
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()

    async def do_handshake(self) -> None:
        self._check()
        while True:
            try:
                self._ssl.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                await self._refill()
                continue
            except ssl.SSLError as exc:
                self._broken = True
                await self._flush_quietly()
                raise trio.BrokenResourceError from exc
            await self._flush()
            return

    async def _flush_quietly(self) -> None:
        """Send an alert if one is waiting; the stream is broken anyway."""
        try:
            with trio.move_on_after(1):
                async with self._send_lock:
                    data = self._outgoing.read()
                    if data:
                        await self.transport_stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    def _drain(self, max_bytes: int) -> tuple[bytearray, bool]:
        """All the plaintext the TLS object can give now, up to max_bytes; and whether at EOF."""
        data = bytearray()
        while len(data) < max_bytes:
            try:
                chunk = self._ssl.read(max_bytes - len(data))
            except ssl.SSLWantReadError:
                return data, False
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return data, True  # the server's close_notify, or the end of the socket
            except ssl.SSLError as exc:
                self._broken = True
                raise trio.BrokenResourceError from exc
            if not chunk:
                return data, True
            data += chunk
        return data, False

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        self._check()
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        limit = DEFAULT_MAX if max_bytes is None else max_bytes
        if limit < 1:
            raise ValueError("max_bytes must be >= 1")
        self._receiving = True
        try:
            waited = False
            while True:
                data, eof = self._drain(limit)
                if self._outgoing.pending:
                    # A TLS 1.3 KeyUpdate asks for an answer; send it before going on.
                    await self._flush()
                    waited = True
                if data or eof:
                    if not waited:
                        await trio.lowlevel.checkpoint()
                    return data
                await self._refill()
                waited = True
        finally:
            self._receiving = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._check()
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            with memoryview(data) as view:
                if not view:
                    await trio.lowlevel.checkpoint()
                for start in range(0, len(view), SEND_SLICE):
                    try:
                        self._ssl.write(view[start : start + SEND_SLICE])
                    except ssl.SSLError as exc:
                        self._broken = True
                        raise trio.BrokenResourceError from exc
                    await self._flush()
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        try:
            if not self._broken:
                # close_notify, without waiting for the server's.
                try:
                    self._ssl.unwrap()
                except ssl.SSLError:
                    pass
                data = self._outgoing.read()
                if data:
                    try:
                        await self.transport_stream.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
        finally:
            await self.transport_stream.aclose()
