"""The socket server: requests answered at once in the accept loop, and the general path."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
import trio.testing

from mailoauthd.serve.request import Request, parse
from mailoauthd.serve.server import Peer, Server, bind

ANSWER = {"ok": True, "token": "tok", "expires_at": 1, "username": "u"}


class Recorder:
    """A quick handler and a general handler that record who answered what."""

    def __init__(self, *, quick_answers: bool) -> None:
        self.quick_answers = quick_answers
        self.quick_seen: list[Request] = []
        self.general_seen: list[Request] = []

    def quick(self, request: Request, peer: Peer) -> dict[str, object] | None:
        self.quick_seen.append(request)
        return {**ANSWER, "by": "quick"} if self.quick_answers else None

    async def general(self, request: Request, peer: Peer) -> dict[str, object]:
        self.general_seen.append(request)
        await trio.lowlevel.checkpoint()  # a real handler may wait
        return {**ANSWER, "by": "general"}


@asynccontextmanager
async def serving(
    path: Path, recorder: Recorder, *, before: list[bytes] = (), **limits: float
) -> AsyncIterator[tuple[Server, list[socket.socket]]]:
    """
    A Server on a real Unix socket at `path`, stopped on exit.

    Clients that send the lines in `before` connect (into the backlog) before
    the server accepts anything, so their lines are surely waiting. `limits` are
    the Server's timeouts (read_timeout, write_timeout …).
    """
    listener = bind(path)
    early = []
    for line in before:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(line)
        early.append(sock)
    server = Server(recorder.general, allowed_uids={os.geteuid()}, quick=recorder.quick, **limits)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, listener)
            yield server, early
            nursery.cancel_scope.cancel()
    finally:
        listener.close()
        for sock in early:
            sock.close()


def answer_of(sock: socket.socket) -> dict[str, object]:
    """Read an answer to the end and parse it."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    reply: dict[str, object] = json.loads(b"".join(chunks))
    return reply


def exchange(path: Path, parts: list[bytes], *, pause: float = 0.0) -> dict[str, object]:
    """A blocking client: connect, send `parts` with `pause` between them, read the answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        for i, part in enumerate(parts):
            if i or pause:
                time.sleep(pause)
            sock.sendall(part)
        return answer_of(sock)


LINE = b'{"v":1,"op":"token","account":"work","min_validity":-1.0,"timeout":15.0}\n'


class TestQuickPath:
    async def test_waiting_line_is_answered_by_the_quick_handler(self, tmp_path: Path) -> None:
        """A line already waiting at accept time is answered without the general handler."""
        recorder = Recorder(quick_answers=True)
        path = tmp_path / "s"
        with trio.fail_after(10):
            async with serving(path, recorder, before=[LINE]) as (server, early):
                reply = await trio.to_thread.run_sync(answer_of, early[0])
                assert server.active == 0  # answered in the accept loop: no task, no slot
        assert reply["by"] == "quick"
        assert recorder.general_seen == []
        assert recorder.quick_seen == [parse(json.loads(LINE))]

    async def test_quick_handler_declining_hands_over_what_was_read(self, tmp_path: Path) -> None:
        """When the quick handler cannot answer, the general path gets the same request,
        neither read nor checked again."""
        recorder = Recorder(quick_answers=False)
        path = tmp_path / "s"
        with trio.fail_after(10):
            async with serving(path, recorder, before=[LINE]) as (_, early):
                reply = await trio.to_thread.run_sync(answer_of, early[0])
        assert reply["by"] == "general"
        assert recorder.general_seen == [parse(json.loads(LINE))]
        # One path per request: the general path takes the request the quick one checked.
        assert recorder.general_seen[0] is recorder.quick_seen[0]

    async def test_line_arriving_after_accept_takes_the_general_path(self, tmp_path: Path) -> None:
        """A client that connects and sends later is still answered."""
        recorder = Recorder(quick_answers=True)
        path = tmp_path / "s"
        with trio.fail_after(10):
            async with serving(path, recorder):
                reply = await trio.to_thread.run_sync(lambda: exchange(path, [LINE], pause=0.2))
        assert reply["by"] == "general"
        assert recorder.general_seen == [parse(json.loads(LINE))]

    async def test_line_split_across_sends_is_read_whole(self, tmp_path: Path) -> None:
        """A line whose first half was read by the quick path is completed by the general path."""
        recorder = Recorder(quick_answers=True)
        path = tmp_path / "s"
        with trio.fail_after(10):
            async with serving(path, recorder, before=[LINE[:20]]) as (server, early):
                await trio.testing.wait_all_tasks_blocked()
                assert server.active == 1  # the general path holds it, waiting for the rest
                early[0].sendall(LINE[20:])
                reply = await trio.to_thread.run_sync(answer_of, early[0])
        assert reply["by"] == "general"
        assert recorder.general_seen == [parse(json.loads(LINE))]

    async def test_malformed_waiting_line_gets_the_general_error(self, tmp_path: Path) -> None:
        """A malformed line is answered with bad-request, as before the quick path existed."""
        recorder = Recorder(quick_answers=True)
        path = tmp_path / "s"
        with trio.fail_after(10):
            async with serving(path, recorder, before=[b"{not json\n"]) as (_, early):
                reply = await trio.to_thread.run_sync(answer_of, early[0])
        assert reply["ok"] is False
        assert reply["error"] == "bad-request"
        assert recorder.quick_seen == recorder.general_seen == []


def waiting_answer(sock: socket.socket) -> dict[str, object] | None:
    """The answer, if the server has written it and closed; None while nothing is there."""
    sock.setblocking(False)
    try:
        first = sock.recv(65536)
    except BlockingIOError:
        return None
    rest = b""
    while chunk := sock.recv(65536):
        rest += chunk
    reply: dict[str, object] = json.loads(first + rest)
    return reply


class TestTimeouts:
    async def test_silent_client_hears_timeout_when_the_read_timeout_ends(
        self, tmp_path: Path, autojump_clock: trio.testing.MockClock
    ) -> None:
        """The read timeout is the Server's to set: a silent client is answered `timeout`
        when it ends, not before (on trio's clock: nothing sleeps)."""
        recorder = Recorder(quick_answers=True)
        path = tmp_path / "s"
        async with serving(path, recorder, before=[b""], read_timeout=0.25) as (server, early):
            start = trio.current_time()
            await trio.sleep(0.2)
            assert waiting_answer(early[0]) is None
            assert server.active == 1
            await trio.sleep(0.1)
            reply = waiting_answer(early[0])
            assert trio.current_time() - start < 0.5
        assert reply is not None
        assert reply["error"] == "timeout"
        assert reply["message"] == "no complete request line within 0.25 s"
        assert recorder.general_seen == recorder.quick_seen == []
