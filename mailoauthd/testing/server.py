"""
The development provider's HTTP plumbing: a threaded standard-library server, one request per
connection, with the scripted faults and hostile answers applied before routing.

`answer()` is the life of one request: read the body (at most MAX_BODY), count
it, give it a hostile answer or a fault if one is queued for its path, else
route it; record it before answering, so a client that has its answer sees the
record. `Listener` runs the server in a daemon thread, over TLS when given a
context.
"""

from __future__ import annotations

import socket
import ssl
import struct
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from mailoauthd.testing.faults import fault_response
from mailoauthd.testing.state import ProviderState, RequestRecord
from mailoauthd.testing.wire import MAX_BODY, Request, Response, json_response


def answer(st: ProviderState, route: Callable[[Request], Response], handler: _Handler) -> None:
    """Serve one request on `handler`'s connection."""
    try:
        length = int(handler.headers.get("Content-Length") or 0)
    except ValueError:
        length = -1
    if not 0 <= length <= MAX_BODY:
        send(handler, json_response({"error": "invalid_request"}, 400))
        return
    req = Request(handler.command, handler.path, handler.headers, handler.rfile.read(length))
    admin = req.path.startswith("/admin/")
    if not admin:
        st.note_arrival()
    hostile = None if admin else st.hostile.take(req.path)
    if hostile is not None:
        st.record(
            RequestRecord(
                st.clock(), req.method, req.path, req.first("grant_type"),
                req.client_hint(), hostile.status, "hostile",
            )
        )  # fmt: skip
        st.hostile.send(handler, hostile)
        return
    fault = None if admin else st.take_fault(req.path)
    kind = fault.kind if fault is not None else None
    response: Response | None = None
    if fault is None:
        response = route(req)
    elif kind == "delay":
        # The grant is processed only after the delay, so a client killed meanwhile
        # leaves the provider with, say, a rotated refresh token the client never saw.
        if not st.stopping.wait(fault.params.get("seconds", 1.0)):
            response = route(req)
    elif kind not in ("hang", "reset"):
        response = fault_response(fault, st.options.access_token_lifetime)
    if not admin:
        # Recorded before answering, so a client that has its answer sees the record.
        st.record(
            RequestRecord(
                st.clock(),
                req.method,
                req.path,
                req.first("grant_type"),
                req.client_hint(),
                response.status if response is not None else 0,
                kind,
            )
        )
    if fault is not None and kind == "hang":
        st.stopping.wait(fault.params.get("seconds", 3600.0))
    elif kind == "reset":
        handler.close_connection = True
        # Linger 0 turns close() into a TCP RST: an abortive close, not a clean EOF.
        handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        handler.rfile.close()
        handler.connection.close()
    elif response is not None:
        send(handler, response)


def send(handler: BaseHTTPRequestHandler, response: Response) -> None:
    handler.send_response(response.status)
    handler.send_header("Content-Type", response.content_type)
    handler.send_header("Content-Length", str(len(response.body)))
    handler.send_header("Cache-Control", "no-store")
    for name, value in response.headers.items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(response.body)


class _Server(ThreadingHTTPServer):
    serve_one: Callable[[_Handler], None]
    # socketserver's default backlog is 5: a daemon refreshing 8 accounts at once
    # overflows it, and each dropped SYN costs the client a 1 s retransmit,
    # which no real provider would charge (bench/scale.py saw it).
    request_queue_size = 128

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that hang up (timeouts, killed daemons) are routine here; bugs are not.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    # One request per connection: after stop() no kept-alive connection can still be
    # answered, so "the provider is down" is exact.
    protocol_version = "HTTP/1.0"
    timeout = 10  # an idle client must not pin a thread forever

    def version_string(self) -> str:
        return "mailoauthd-devprovider"

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: tests capture stderr, and request lines carry codes."""

    def do_GET(self) -> None:
        self.server.serve_one(self)

    def do_POST(self) -> None:
        self.server.serve_one(self)


class Listener:
    """The server and its thread: listening from start() until stop()."""

    def __init__(self, serve_one: Callable[[_Handler], None]) -> None:
        self._serve_one = serve_one
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None) -> int:
        """Listen and serve in a daemon thread; the port it listens on."""
        server = _Server((host, port), _Handler)
        if ssl_context is not None:
            server.socket = ssl_context.wrap_socket(server.socket, server_side=True)
        server.serve_one = self._serve_one
        port = server.socket.getsockname()[1]
        self._server = server
        # Where stop() cannot wake select() early, it waits up to one poll interval.
        self._thread = threading.Thread(
            target=server.serve_forever, args=(0.05,), name=f"devprovider:{port}", daemon=True
        )
        self._thread.start()
        return int(port)

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        try:
            # Wakes serve_forever's select() at once (on Linux), so tests don't pay a poll
            # interval per provider.
            server.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join()
        self._server = self._thread = None
