"""
The browser's side of a sign-in: one HTTP request per connection on the loopback listener.

The browser comes back to http://127.0.0.1:PORT/?code=...&state=... (or
localhost); h11 reads its request and writes the result page (signin_page.py)
with its headers. Bounded the same as before h11: a request head of at most
MAX_REQUEST_HEAD bytes, read within BROWSER_READ_TIMEOUT, the answer written
within SEND_TIMEOUT; anything that is not one well-formed HTTP/1.x request is
dropped without an answer. signin.py runs the listener and decides the pages.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import h11
import trio

from mailoauthd.authorization import signin_page

# A browser sends its request at once; speculative connections that send
# nothing are dropped after this.
BROWSER_READ_TIMEOUT = 10.0
# A request line with a code and a state is under 2 KiB; headers add a few.
MAX_REQUEST_HEAD = 16 * 1024
# A browser that does not take its page in this long is not waited for.
SEND_TIMEOUT = 5.0
_RECEIVE_SIZE = 4096


async def serve(
    stream: trio.abc.Stream, answer: Callable[[str], Awaitable[signin_page.Page]]
) -> bool:
    """
    Serve the one request on a browser's connection: `answer(query)` gives the page
    for GET /, anything else gets a 405 or 404 page.

    Returns:
        Whether a request came (and so a page was sent, or tried); False when the
        connection closed, timed out, or sent something that is not HTTP/1.x.
    """
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
    try:
        with trio.fail_after(BROWSER_READ_TIMEOUT):
            request = await _request(conn, stream)
    except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
        return False
    if request is None:
        return False
    parts = urlsplit(request.target.decode("ascii"))
    if request.method != b"GET":
        page = signin_page.notice(405, "Method not allowed", "Only GET is served here.")
    elif parts.path != "/":
        # /favicon.ico and the like
        page = signin_page.notice(404, "Not found", "Nothing here.")
    else:
        page = await answer(parts.query)
    body = signin_page.render(page)
    head = [(name.encode(), value.encode()) for name, value in signin_page.headers(body)]
    reason = signin_page.reason(page).encode()
    events: list[h11.Event] = [h11.Response(status_code=page.status, reason=reason, headers=head)]
    if request.method != b"HEAD":  # a 405 to HEAD has the headers of one to GET, no body
        events.append(h11.Data(data=body))
    events.append(h11.EndOfMessage())
    data = b"".join(conn.send(event) or b"" for event in events)
    with (
        trio.move_on_after(SEND_TIMEOUT),
        contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
    ):
        await stream.send_all(data)
    return True


async def _request(conn: h11.Connection, stream: trio.abc.Stream) -> h11.Request | None:
    """
    The request, once its head is in; None if the peer closed, broke the protocol, or
    sent more than MAX_REQUEST_HEAD bytes without completing a head.
    """
    received = 0
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:  # malformed
            return None
        if isinstance(event, h11.Request):
            return event
        if event is not h11.NEED_DATA:  # ConnectionClosed, or a PAUSED state
            return None
        data = await stream.receive_some(_RECEIVE_SIZE)
        received += len(data)
        # h11 bounds only an incomplete head; a complete one may not be bigger either.
        if received > MAX_REQUEST_HEAD:
            return None
        conn.receive_data(bytes(data))
