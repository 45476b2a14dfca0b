"""
The sign-in's loopback listener (signin_listener.py, on h11) under malformed HTTP: whatever
a local program sends, the listener answers a well-formed page or drops the connection,
asks the sign-in for a page only for `GET /`, keeps its bounds (head size, read timeout),
and never raises; the real daemon's sign-in still completes after a barrage of junk.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from urllib.parse import urlsplit

import trio
import trio.testing
from conftest import in_process_daemon
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_authorize import Conversation, browse, flow_config

from mailoauthd.authorization import signin_listener, signin_page
from mailoauthd.testing import DevProvider

ASKED = signin_page.notice(200, "Asked", "the sign-in was asked")


class Outcome:
    def __init__(self) -> None:
        self.served = False
        self.queries: list[str] = []
        self.sent = b""
        self.elapsed = 0.0


def exchange(data: bytes, *, eof: bool = True) -> Outcome:
    """Send `data` (then EOF, or nothing more) to one listener connection; what came of it."""
    outcome = Outcome()

    async def answer(query: str) -> signin_page.Page:
        outcome.queries.append(query)
        return ASKED

    async def main() -> None:
        client, server = trio.testing.memory_stream_pair()
        start = trio.current_time()
        async with trio.open_nursery() as nursery:

            async def browser() -> None:
                await client.send_all(data)
                if eof:
                    await client.send_eof()

            nursery.start_soon(browser)
            outcome.served = await signin_listener.serve(server, answer)
            outcome.elapsed = trio.current_time() - start
            await server.aclose()
        while chunk := await client.receive_some(65536):
            outcome.sent += chunk

    # Virtual time: the read timeout passes at once when nothing more comes.
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return outcome


def parsed(sent: bytes) -> tuple[int, dict[str, str], bytes]:
    """The status, headers (lower-case names) and body of one complete HTTP/1.1 response."""
    head, _, body = sent.partition(b"\r\n\r\n")
    lines = head.decode("ascii").split("\r\n")
    version, status, _reason = lines[0].split(" ", 2)
    assert version == "HTTP/1.1", lines[0]
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status), headers, body


def check_answer(outcome: Outcome, method: bytes) -> int:
    status, headers, body = parsed(outcome.sent)
    assert headers["content-security-policy"] == signin_page.CSP
    assert headers["referrer-policy"] == "no-referrer"
    assert headers["cache-control"] == "no-store"
    if method == b"HEAD":
        assert body == b""
    else:
        assert len(body) == int(headers["content-length"])
        assert body.startswith(b"<!DOCTYPE html>")
    return status


METHODS = st.one_of(
    st.just(b"GET"),
    st.sampled_from([b"HEAD", b"POST", b"PUT", b"OPTIONS", b"G\x00T", b"get", b""]),
)
TARGETS = st.one_of(
    st.sampled_from([b"/", b"/?code=c&state=s", b"/favicon.ico", b"*", b"http://x/", b""]),
    st.binary(max_size=40),
)
VERSIONS = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"HTTP/1.1x", b"HTTP", b""])
HEADERS = st.lists(
    st.one_of(
        st.sampled_from(
            [
                (b"Accept", b"*/*"),
                (b"Content-Length", b"5"),
                (b"Content-Length", b"-1"),
                (b"Transfer-Encoding", b"chunked"),
                (b"Connection", b"keep-alive"),
            ]
        ),
        st.tuples(st.binary(max_size=12), st.binary(max_size=20)),
    ),
    max_size=4,
)


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, bytes, bytes]:
    """(method, target, whole request): near-HTTP, broken in every way the strategies allow."""
    method, target, version = draw(METHODS), draw(TARGETS), draw(VERSIONS)
    newline = draw(st.sampled_from([b"\r\n", b"\n", b"\r"]))
    headers = draw(HEADERS)
    if draw(st.booleans()):
        headers.insert(draw(st.integers(0, len(headers))), (b"Host", b"127.0.0.1"))
    lines = [method + b" " + target + b" " + version]
    lines += [name + b": " + value for name, value in headers]
    data = newline.join(lines) + newline + newline + draw(st.binary(max_size=30))
    cut = draw(st.one_of(st.none(), st.integers(0, len(data))))
    return method, target, data[:cut]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests(), st.booleans())
@example((b"GET", b"/favicon.ico", b"GET /favicon.ico HTTP/1.0\r\n\r\n"), False)
@example((b"HEAD", b"/", b"HEAD / HTTP/1.1\nHost: h\n\n"), True)
@example((b"POST", b"/", b"POST /?code=c HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\n"), False)
def test_malformed_requests(request: tuple[bytes, bytes, bytes], eof: bool) -> None:
    """A page or nothing, never an exception; the sign-in is asked only for GET /."""
    method, target, data = request
    outcome = exchange(data, eof=eof)
    assert outcome.elapsed <= signin_listener.BROWSER_READ_TIMEOUT + 1
    if not outcome.served:
        assert outcome.sent == b""
        assert outcome.queries == []
        return
    status = check_answer(outcome, method)
    if outcome.queries:
        assert method == b"GET"
        assert urlsplit(target.decode()).path == "/"
        assert status == 200
    else:
        assert status in (404, 405)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000), st.booleans())
def test_random_bytes(data: bytes, eof: bool) -> None:
    outcome = exchange(data, eof=eof)
    if outcome.served:
        check_answer(outcome, data.split(b" ", 1)[0])
    else:
        assert outcome.sent == b""


def test_a_good_request_is_answered() -> None:
    """The baseline the properties rest on: a browser's request gets its page."""
    outcome = exchange(b"GET /?code=c&state=s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", eof=False)
    assert outcome.served
    assert outcome.queries == ["code=c&state=s"]
    assert check_answer(outcome, b"GET") == 200


def test_head_gets_headers_only() -> None:
    outcome = exchange(b"HEAD / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert outcome.served
    assert outcome.queries == []
    assert check_answer(outcome, b"HEAD") == 405


def test_an_oversized_head_is_dropped() -> None:
    """More than MAX_REQUEST_HEAD bytes of head: no answer, however it would have ended."""
    padding = b"X-Pad: " + b"a" * signin_listener.MAX_REQUEST_HEAD + b"\r\n"
    data = b"GET /?code=c HTTP/1.1\r\nHost: 127.0.0.1\r\n" + padding + b"\r\n"
    outcome = exchange(data, eof=False)
    assert not outcome.served
    assert outcome.sent == b""
    assert outcome.queries == []


def test_silence_is_dropped_after_the_read_timeout() -> None:
    outcome = exchange(b"GET / HTTP/1.1\r\n", eof=False)
    assert not outcome.served
    assert outcome.sent == b""
    assert outcome.elapsed == signin_listener.BROWSER_READ_TIMEOUT


JUNK = [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"GET /\x00 HTTP/1.1\r\n\r\n",
    b"\r\n" * 100,
    b"GET / HTTP/1.1\r\n" + b"A: b\r\n" * 5000,
]


async def test_the_sign_in_survives_junk(provider: DevProvider, tmp_path: Path) -> None:
    """Junk on the real listener gets no page, or a refusal; the browser then signs in."""
    cfg = flow_config(tmp_path, provider)
    async with in_process_daemon(cfg) as d:
        conv = await Conversation.start(d)
        first = await conv.next()
        port = urlsplit(str(first["redirect_uri"])).port
        assert port is not None
        for junk in JUNK:
            answer = b""
            with trio.fail_after(5):
                async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                    # A head over the bound is dropped unread: a reset, which is fine.
                    with contextlib.suppress(trio.BrokenResourceError):
                        await stream.send_all(junk)
                        await stream.send_eof()
                        answer = await stream.receive_some(65536)
            # Nothing, or a refusal (HTTP/2.0's preface is a PRI request: 405).
            assert answer == b"" or answer.startswith(b"HTTP/1.1 405 "), junk
        with trio.fail_after(20):
            page = await browse(str(first["url"]))
        assert page.status_code == 200, page.text
        assert page.headers["Content-Security-Policy"] == signin_page.CSP
        events, final = await conv.final()
        assert final["ok"] is True, final
