"""
The socket's boundary (issue #10): requests checked once, over-long lines in a conversation,
peers with very many groups, refusal logs limited per uid. Real sockets; the groups test
runs a client under setgroups(2), so it needs root (skipped otherwise).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import trio
from conftest import MAILOAUTHD
from hypothesis import given, settings
from hypothesis import strategies as st

from mailoauthd import protocol
from mailoauthd.errors import ProtocolError
from mailoauthd.serve import request as request_module
from mailoauthd.serve.limits import LogLimit
from mailoauthd.serve.ops import OPS
from mailoauthd.serve.request import MAX_SECONDS, Request, parse
from mailoauthd.serve.server import Channel, peer_of

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(10**300, 10**400)
    | st.floats()
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)
requests = st.fixed_dictionaries(
    {},
    optional={
        key: json_values | st.sampled_from([1, "token", "status", "work", 5.0, -1])
        for key in ("v", "op", "account", "min_validity", "timeout", "wait", "refresh_token")
    },
)

# Mostly well-formed: the helper's keys, with values near and past the limits.
seconds = (
    st.integers(-(10**10), 10**10) | st.floats() | st.booleans() | st.none() | st.text(max_size=3)
)
token_requests = st.fixed_dictionaries(
    {
        "v": st.sampled_from([1] * 6 + [2, True]),
        "op": st.sampled_from(["token"] * len(OPS) + sorted(OPS)),
        "account": st.sampled_from(["work", "a.b-c_1", "x" * 64, "", "a b", "x" * 65, 7]),
    },
    optional={"min_validity": seconds, "timeout": seconds, "wait": seconds},
)


class TestParse:
    @given(raw=requests)
    def test_any_object_is_a_request_or_a_bad_request(self, raw: dict[str, object]) -> None:
        """Nothing but ProtocolError escapes, and what passes is typed and in range."""
        refused: ProtocolError | None = None
        try:
            request = parse(raw)
        except ProtocolError as exc:
            refused = exc
        if refused is not None:
            assert len(refused.message) < 200  # nothing is echoed whole
            return
        rules = OPS[request.op]
        assert request.account is not None or not rules.account
        assert all(raw.get(key) for key in rules.requires)
        for seconds in (request.min_validity, request.timeout, request.wait):
            assert seconds is None or (isinstance(seconds, float) and abs(seconds) <= MAX_SECONDS)
        assert request.account is None or len(request.account) <= 64

    @pytest.mark.parametrize(
        "raw",
        [
            {"v": 1, "op": []},
            {},
            {"v": True, "op": "ping"},
            {"v": 1, "op": "token", "account": "work", "min_validity": 10**400},
            {"v": 1, "op": "token", "account": "work", "timeout": float("inf")},
            {"v": 1, "op": "token", "account": "work", "wait": float("nan")},
            {"v": 1, "op": "token", "account": "a\nb"},
            {"v": 1, "op": "token"},
            {"v": 1, "op": "import", "account": "work"},
            {"v": 1, "op": "import", "account": "work", "refresh_token": "x" * 20000},
        ],
    )
    def test_refused(self, raw: dict[str, object]) -> None:
        with pytest.raises(ProtocolError):
            parse(raw)

    @settings(max_examples=300)
    @given(raw=token_requests)
    def test_the_token_requests_shortcut_decides_as_the_general_path(
        self, raw: dict[str, object]
    ) -> None:
        """
        A request with only the helper's keys takes a shorter way through `parse`; a
        `"flow": null` (the account's own flow) sends the same request the general way.
        """
        answers = []
        for line in (raw, {**raw, "flow": None}):
            try:
                answers.append(parse(line))
            except ProtocolError as exc:
                answers.append(exc.message)  # type: ignore[arg-type]
        assert answers[0] == answers[1]

    def test_account_names_are_remembered_within_a_bound(self) -> None:
        """Checked names are kept to skip the regex; a flood of made-up ones cannot grow it."""
        for i in range(request_module.MAX_NAMES_KEPT + 500):
            parse({"v": 1, "op": "token", "account": f"made-up-{i}"})
        assert len(request_module._NAMES) <= request_module.MAX_NAMES_KEPT
        assert parse({"v": 1, "op": "token", "account": "made-up-1"}).account == "made-up-1"
        with pytest.raises(ProtocolError):
            parse({"v": 1, "op": "token", "account": "made up"})
        assert "made up" not in request_module._NAMES

    def test_a_helpers_request(self) -> None:
        line = protocol.encode_token_request("work", min_validity=60, timeout=15, wait=5)
        assert parse(protocol.decode(line)) == Request(
            op="token", account="work", min_validity=60.0, timeout=15.0, wait=5.0
        )


class TestChannel:
    async def test_over_long_line_is_refused_once_then_skipped(self) -> None:
        """A line over MAX_LINE is one ProtocolError; its rest is dropped; the next line is
        read; a hang-up after it is None (the buffer used to stay full and refuse forever)."""
        ours, theirs = trio.socket.socketpair()
        stream = trio.SocketStream(ours)
        channel = Channel(stream)
        with theirs:
            payload = b"x" * (protocol.MAX_LINE * 3) + b'\n{"op": "redirect"}\n'

            async def send() -> None:
                await trio.SocketStream(theirs).send_all(payload)

            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send)
                    with pytest.raises(ProtocolError):
                        await channel.receive()
                    assert await channel.receive() == {"op": "redirect"}
            theirs.shutdown(socket.SHUT_WR)
            with trio.fail_after(10):
                assert await channel.receive() is None
        await stream.aclose()

    async def test_a_loop_that_ignores_errors_ends_on_hang_up(self) -> None:
        """The device flow's watcher loops over receive() ignoring ProtocolError: after an
        over-long line and a hang-up it must end (it used to spin at 100 % CPU)."""
        ours, theirs = trio.socket.socketpair()
        stream = trio.SocketStream(ours)
        channel = Channel(stream)
        await trio.SocketStream(theirs).send_all(b"y" * (protocol.MAX_LINE + 10))
        theirs.close()
        errors = 0
        with trio.fail_after(10):
            while errors < 5:
                try:
                    if await channel.receive() is None:
                        break
                except ProtocolError:
                    errors += 1
        assert errors == 1
        await stream.aclose()


@pytest.mark.integration  # ,  # a client under setpriv
@pytest.mark.skipif(os.geteuid() != 0, reason="setgroups(2) needs root")
@pytest.mark.parametrize("count", [10, 300, 5000])
def test_peer_with_many_groups(tmp_path: Path, count: int) -> None:
    """SO_PEERGROUPS for a peer in more groups than Python's getsockopt has room for (AD/LDAP
    users); it was refused with "getsockopt buflen out of range" above 64 (1024 bytes)."""
    path = tmp_path / "s"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    groups = list(range(100000, 100000 + count))
    code = (
        "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.recv(1)"
    )
    child = subprocess.Popen(
        [sys.executable, "-I", "-c", code, str(path)],
        extra_groups=groups,
    )
    try:
        conn, _ = listener.accept()
        with conn:
            peer = peer_of(conn, groups=True)
            conn.sendall(b"x")
        assert sorted(peer.groups) == groups
        assert peer.uid == os.geteuid()
    finally:
        child.wait(timeout=10)
        listener.close()


def test_refusal_log_limit() -> None:
    """A burst is logged, then one line per interval; the next logged line counts the rest;
    uids are limited each on its own, and only so many are remembered."""
    limit = LogLimit(burst=3, interval=10.0, tracked=2)
    assert [limit.allow(1000, 0.0) for _ in range(10)] == [True] * 3 + [False] * 7
    assert limit.allow(1001, 0.0)  # another uid has its own bucket
    assert not limit.allow(1000, 5.0)
    assert limit.allow(1000, 10.0)
    assert limit.suppressed(1000) == {"suppressed": 8}
    assert limit.suppressed(1000) == {}
    limit.allow(1002, 10.0)
    assert len(limit._buckets) == 2
    assert json.dumps(limit.suppressed(1001)) == "{}"


@pytest.mark.integration  # ,
@pytest.mark.skipif(os.geteuid() != 0, reason="runs the daemon as another user")
def test_daemon_is_not_dumpable_and_raises_its_descriptor_limit() -> None:
    """The real daemon, under an ordinary uid with a low soft RLIMIT_NOFILE: its /proc
    entries belong to root (PR_SET_DUMPABLE 0: no core file with tokens, no ptrace by that
    uid), and its soft descriptor limit was raised to the hard one."""
    home = Path(tempfile.mkdtemp(prefix="mailoauthd-dumpable-"))
    home.chmod(0o755)
    os.chown(home, 65534, 65534)
    config = home / "config.toml"
    config.write_text(
        f'[daemon]\nstate_dir = "{home / "state"}"\nsocket = "{home / "run" / "socket"}"\n'
    )

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096))

    env = {"PATH": "/usr/bin:/bin", "HOME": str(home)}
    # setpriv rather than Popen(user=...): the same exec, but it finds the venv's python.
    who = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    daemon = subprocess.Popen(
        [*who, str(MAILOAUTHD), "--config", str(config)],
        env=env,
        preexec_fn=low_limit,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 15
        while not (home / "run" / "socket").exists():
            assert daemon.poll() is None, daemon.stderr.read() if daemon.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert os.stat(f"/proc/{daemon.pid}/fd").st_uid == 0
        limits = Path(f"/proc/{daemon.pid}/limits").read_text()
        row = next(line for line in limits.splitlines() if line.startswith("Max open files"))
        assert row.split()[3:5] == ["4096", "4096"], row
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
        if daemon.stderr is not None:
            daemon.stderr.close()
        shutil.rmtree(home, ignore_errors=True)
