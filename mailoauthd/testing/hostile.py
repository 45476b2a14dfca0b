"""
The development provider's hostile mode: scripted answers that no honest provider sends.

Tests queue `HostileAnswer`s for a path (`DevProvider.hostile.add("/token", ...)`);
the next requests on that path get them instead of the provider's own answer:
any status, any headers, any bytes for a body, and optionally a body of any
size streamed after it (hundreds of MB cost nothing here: the bytes are written
as the client reads them, and a client that hangs up ends the answer). What the
answers hold is up to the test (tests/reliability/test_hostile_provider.py generates them
with Hypothesis). Standard library only, like the provider.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

CHUNK = 1 << 16


@dataclass(frozen=True)
class HostileAnswer:
    """One answer: status line, headers, body, then `filler` repeated to `size` bytes."""

    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    filler: bytes = b""
    size: int = 0  # bytes of filler streamed after `body`
    # Content-Length to declare; None sends none (the body ends when the connection does).
    content_length: int | None = None


class HostileAnswers:
    """The answers queued per path; thread-safe (the provider serves from threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queued: dict[str, deque[HostileAnswer]] = {}
        self.served = 0
        self.bytes_sent = 0

    def add(self, path: str, *answers: HostileAnswer) -> None:
        """Answer the next requests on `path` (e.g. "/token") with these, in order."""
        with self._lock:
            self._queued.setdefault(path, deque()).extend(answers)

    def clear(self) -> None:
        with self._lock:
            self._queued.clear()

    def pending(self, path: str | None = None) -> int:
        with self._lock:
            if path is not None:
                return len(self._queued.get(path, ()))
            return sum(len(q) for q in self._queued.values())

    def take(self, path: str) -> HostileAnswer | None:
        with self._lock:
            queue = self._queued.get(path)
            if not queue:
                return None
            self.served += 1
            return queue.popleft()

    def send(self, handler: Any, answer: HostileAnswer) -> None:
        """Write `answer` on the request handler's connection, then close it."""
        handler.close_connection = True
        sent = 0
        try:
            handler.send_response_only(answer.status, "Hostile")
            for name, value in answer.headers:
                handler.send_header(name, value)
            if answer.content_length is not None:
                handler.send_header("Content-Length", str(answer.content_length))
            handler.send_header("Connection", "close")
            handler.end_headers()
            handler.wfile.write(answer.body)
            sent = len(answer.body)
            if answer.size and answer.filler:
                block = answer.filler * max(1, CHUNK // len(answer.filler))
                left = answer.size
                while left > 0:
                    piece = block[:left]
                    handler.wfile.write(piece)
                    left -= len(piece)
                    sent += len(piece)
            handler.wfile.flush()
        except OSError:
            pass  # the client hung up: what a daemon that caps bodies does
        finally:
            with self._lock:
                self.bytes_sent += sent
