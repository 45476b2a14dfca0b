"""
The rest of a conversation's connection (`authorize`): event lines out, further lines in.

The server makes one for a request whose op-table row is a conversation
(ops.py) and hands it to that handler; the final answer is still written by
the server. Lines either way are bounded by protocol.MAX_LINE; an over-long
one from the client is refused once and thrown away as it arrives.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from mailoauthd import protocol
from mailoauthd.errors import ProtocolError
from mailoauthd.serve.peers import Peer
from mailoauthd.serve.request import Request

# A client that takes longer than this to read a line it asked for is stuck or
# hostile; 5 s is generous on a loaded box. (The default: the Server passes its own.)
WRITE_TIMEOUT = 5.0


class Channel:
    """The rest of a conversation's connection: event lines out, further request lines in."""

    def __init__(self, stream: trio.SocketStream, *, write_timeout: float = WRITE_TIMEOUT) -> None:
        self._stream = stream
        self._write_timeout = write_timeout
        self._buffer = bytearray()
        self._sending = trio.Lock()
        self._skipping = False  # the rest of an over-long line is being thrown away

    async def send(self, message: dict[str, object]) -> None:
        """
        Send one line, within the write timeout.

        Raises:
            trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError: the
                client is gone or not reading.
        """
        async with self._sending:
            with trio.fail_after(self._write_timeout):
                await self._stream.send_all(protocol.encode(message))

    async def receive(self) -> dict[str, object] | None:
        """
        The client's next line, or None once it hangs up; waits as long as the caller lets it.

        An over-long line is refused once (ProtocolError) and the rest of it, up
        to its newline, is thrown away as it arrives: the caller may go on
        receiving, and the buffer never holds more than MAX_LINE and a chunk.

        Raises:
            ProtocolError: the line is not a JSON object, or longer than MAX_LINE.
        """
        await trio.lowlevel.checkpoint()  # a caller that loops on errors still yields
        while (newline := self._buffer.find(b"\n")) < 0 or self._skipping:
            if newline >= 0:  # the end of the over-long line: what follows is a new one
                del self._buffer[: newline + 1]
                self._skipping = False
                continue
            if self._skipping:
                self._buffer.clear()
            elif len(self._buffer) > protocol.MAX_LINE:
                self._buffer.clear()
                self._skipping = True
                raise ProtocolError(f"line longer than {protocol.MAX_LINE} bytes")
            try:
                chunk = await self._stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return None
            if not chunk:
                return None
            self._buffer += chunk
        line = bytes(self._buffer[:newline])
        del self._buffer[: newline + 1]
        if len(line) > protocol.MAX_LINE:
            raise ProtocolError(f"line longer than {protocol.MAX_LINE} bytes")
        try:
            return protocol.decode(line)
        except protocol.WireError as exc:
            raise ProtocolError(f"malformed line: {exc}") from None


# A conversation: gets the request, the peer and the Channel; returns the final answer.
Conversation = Callable[[Request, Peer, Channel], Awaitable[dict[str, object]]]
