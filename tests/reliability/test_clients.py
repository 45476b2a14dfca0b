"""
Hostile and broken clients on the socket, against the real daemon: random bytes, invalid
UTF-8, a line of 10 MB, no newline ever, thousands of half-open connections, clients that
never read, unknown operations, wrong types, another user asking for an account.

Each gets an error or a timeout; the daemon's memory and descriptors stay bounded; and a
well-behaved client asking for tokens all along sees no error and no unusual delay.
"""

from __future__ import annotations

import json
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import MAILOAUTH, helper
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailoauthd.protocol import MAX_LINE
from mailoauthd.serve.server import MAX_CONNECTIONS, READ_TIMEOUT
from mailoauthd.testing import DevProvider

from .support import (
    Daemon,
    Figures,
    Ledger,
    ask,
    memory_and_fds,
    new_provider,
    receive_all,
    seed_accounts,
    size,
    token_request,
    write_config,
)

CODES = {
    "bad-request",
    "forbidden",
    "unknown-account",
    "timeout",
    "busy",
    "usage",
    "needs-auth",
    "provider-unavailable",
    "misconfigured",
    "state",
}
# Operations that change what the daemon holds: a fuzzer must not revoke the account
# the well-behaved client is using, nor start an interactive sign-in.
DESTRUCTIVE = {"revoke", "import", "authorize"}
HALF_OPEN_TEST, HALF_OPEN_SOAK = 2000, 8000
HALF_OPEN = size(HALF_OPEN_TEST, HALF_OPEN_SOAK)
EXAMPLES_TEST, EXAMPLES_SOAK = 300, 3000
EXAMPLES = size(EXAMPLES_TEST, EXAMPLES_SOAK)


@dataclass
class Target:
    daemon: Daemon
    provider: DevProvider
    socket: Path
    base: Path
    replies: list[str] = field(default_factory=list)  # every error answer, for the ledger

    def record(self, reply: dict[str, object]) -> None:
        if reply.get("ok") is not True:
            self.replies.append(json.dumps(reply))


@pytest.fixture(scope="module")
def target(figures: Figures, ledger: Ledger) -> Iterator[Target]:
    """One real daemon (system mode: the tests run as root) with two accounts, for the module.

    Its directory is world-traversable so that a client under another uid can connect.
    """
    base = Path(tempfile.mkdtemp(prefix="mailoauthd-hostile-"))
    base.chmod(0o755)
    provider, client_secret = new_provider(refresh_token_rotation="rotate")
    daemon = None
    try:
        config = write_config(
            base, provider, client_secret, accounts=("work", "home"), daemon_keys=""
        )
        # "home" is shared with uid 65534, so the socket is open to every local user and
        # each request is decided by the peer's uid (SO_PEERCRED); "work" is root's alone.
        text = config.read_text().replace(
            '[accounts.home]\nprovider = "dev"',
            '[accounts.home]\nprovider = "dev"\nallow_users = [65534]',
        )
        config.write_text(text)
        seed_accounts(base, provider, ("work", "home"))
        daemon = Daemon(config, base / "run" / "socket", base / "daemon.log")
        daemon.wait_ready()
        deadline = time.monotonic() + 10
        while {r["status"] for r in daemon.status().values()} != {"ok"}:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        found = Target(daemon, provider, base / "run" / "socket", base)
        yield found
        assert daemon.stop() == 0
        ledger.scan(
            provider.issued_secrets(),
            [("daemon log", daemon.log()), ("error answers", "\n".join(found.replies))],
        )
    finally:
        if daemon is not None:
            daemon.kill()
        provider.stop()
        shutil.rmtree(base, ignore_errors=True)


class GoodClient:
    """Asks for a token in a loop the whole time, as a mail program would; keeps latencies."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> GoodClient:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(10)
                    connect(sock, self.path)
                    sock.sendall(token_request("work", min_validity=60, timeout=5))
                    reply = json.loads(receive_all(sock))
                if reply.get("ok") is not True:
                    self.errors.append(str(reply))
            except (OSError, ValueError) as exc:
                self.errors.append(repr(exc))
            self.latencies.append(time.monotonic() - started)
            time.sleep(0.005)

    def check(self, figures: Figures, what: str) -> None:
        """No error, and no request slower than a second (the median is far below)."""
        assert not self.errors, self.errors[:5]
        assert self.latencies, "the good client never got a turn"
        slowest = max(self.latencies)
        assert slowest < 1.0, f"a token took {slowest:.3f} s during {what}"
        figures.add("clients", "well-behaved requests served alongside", len(self.latencies))
        figures.peak("clients", "slowest well-behaved request (ms)", round(slowest * 1000, 1))
        median = statistics.median(self.latencies) * 1000
        figures.peak("clients", "worst median of a well-behaved client (ms)", round(median, 2))


def connect(sock: socket.socket, path: Path) -> bool:
    """Connect as the helper does, waiting while the listen queue is full; True if it was."""
    waited = False
    deadline = time.monotonic() + 10
    while True:
        try:
            sock.connect(str(path))
            return waited
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            waited = True
            time.sleep(0.001)


def exchange(path: Path, payload: bytes, *, half_close: bool = True) -> bytes:
    """Send `payload`, optionally end our side, and read what comes back until close."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(READ_TIMEOUT + 5)
        connect(sock, path)
        try:
            sock.sendall(payload)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon stopped reading: it answered or hung up already
        try:
            return receive_all(sock)
        except ConnectionResetError:
            return b""


def check_answer(target: Target, raw: bytes) -> dict[str, object]:
    """One JSON line, an object with `ok`; errors carry a known code, a message and a hint."""
    assert raw.endswith(b"\n"), raw[:200]
    assert raw.count(b"\n") == 1, raw[:200]
    reply = json.loads(raw)
    assert isinstance(reply, dict)
    target.record(reply)
    if reply["ok"] is not True:
        assert reply["error"] in CODES, reply
        assert isinstance(reply["message"], str)
        assert isinstance(reply["hint"], str)
    return reply


def invalid_utf8() -> st.SearchStrategy[bytes]:
    """Lines that are not UTF-8: stray continuation bytes, overlongs, surrogates, 0xff."""
    bad = st.sampled_from([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\x80", b"\xf8\x88\x80\x80"])
    return st.tuples(st.binary(max_size=64), bad, st.binary(max_size=64)).map(
        lambda parts: b'{"v": 1, "op": "' + b"".join(parts) + b'"}\n'
    )


def json_requests() -> st.SearchStrategy[bytes]:
    """Objects with the protocol's keys and any JSON values: wrong types, unknown ops."""
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False),
        st.text(max_size=20),
    )
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=5)
    ops = st.one_of(
        st.sampled_from(["token", "status", "ping", "servers", "refresh", "nope", ""]),
        st.text(max_size=12).filter(lambda op: op not in DESTRUCTIVE),
        values,
    )
    accounts = st.one_of(st.sampled_from(["work", "home", "nobody", "", "../work"]), values)
    request = st.fixed_dictionaries(
        {},
        optional={
            "v": st.one_of(st.just(1), values),
            "op": ops,
            "account": accounts,
            "min_validity": st.one_of(st.floats(-10, 120), values),
            "timeout": st.one_of(st.floats(-1, 2), values),
        },
    )
    return request.map(lambda r: json.dumps(r).encode() + b"\n")


class TestHostileClients:
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(payload=st.one_of(st.binary(max_size=4096), invalid_utf8(), json_requests()))
    def test_anything_sent_gets_one_well_formed_answer(
        self, target: Target, figures: Figures, payload: bytes
    ) -> None:
        """Random bytes, invalid UTF-8 and ill-typed requests each get one well-formed answer."""
        reply = check_answer(target, exchange(target.socket, payload))
        assert reply.get("ok") is not True or not payload.startswith(b'{"v": 1, "op": "\xff')
        figures.add("clients", "malformed or random requests (Hypothesis)")
        figures.add("clients", "of them answered with an error", reply.get("ok") is not True)
        figures.held(
            "clients", "every random or malformed input got exactly one well-formed answer line"
        )

    def test_alongside_the_fuzzer_the_good_client_is_served(
        self, target: Target, figures: Figures
    ) -> None:
        """While a burst of garbage arrives from many threads, a mail client sees no error."""
        junk = [b"\xff\xfe" * 50, b"{", b"[" * 5000 + b"\n", b'{"v":1,"op":"token"}\n', b"\n"]
        with GoodClient(target.socket) as good:
            threads = [
                threading.Thread(
                    target=lambda n=n: [
                        exchange(target.socket, junk[(n + i) % len(junk)]) for i in range(100)
                    ]
                )
                for n in range(8)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        good.check(figures, "a garbage burst")
        figures.add("clients", "malformed requests in bursts", 800)

    @pytest.mark.parametrize(
        ("request_", "code"),
        [
            ({"v": 1, "op": "nope"}, "bad-request"),
            ({"v": 2, "op": "token", "account": "work"}, "bad-request"),
            ({"op": "token", "account": "work"}, "bad-request"),
            ({"v": 1, "op": "token", "account": 5}, "bad-request"),
            ({"v": 1, "op": "token", "account": ["work"]}, "bad-request"),
            ({"v": 1, "op": "token", "account": "work", "timeout": "5"}, "bad-request"),
            ({"v": 1, "op": "token", "account": "work", "min_validity": True}, "bad-request"),
            ({"v": 1, "op": "token", "account": "nobody"}, "unknown-account"),
            ({"v": "1", "op": "status"}, "bad-request"),
            ({"v": 1, "op": None}, "bad-request"),
        ],
    )
    def test_wrong_requests_are_refused_by_name(
        self, target: Target, figures: Figures, request_: dict[str, object], code: str
    ) -> None:
        """Unknown operations, wrong versions and wrong types get their own error code."""
        reply = check_answer(target, exchange(target.socket, json.dumps(request_).encode() + b"\n"))
        assert reply["ok"] is False, reply
        assert reply["error"] == code, reply
        figures.add("clients", "hand-written wrong requests")

    @pytest.mark.parametrize(
        "line",
        [b"[" * 100_000, b'{"v": 1e999, "op": "status"}', b'{"v": NaN}', b'{"v": 1} {"v": 1}'],
    )
    def test_pathological_json(self, target: Target, figures: Figures, line: bytes) -> None:
        """Deep nesting, infinities, NaN and two objects on a line are bad requests."""
        reply = check_answer(target, exchange(target.socket, line + b"\n"))
        assert reply["error"] == "bad-request"
        figures.add("clients", "hand-written wrong requests")

    def test_ten_megabyte_line(self, target: Target, figures: Figures) -> None:
        """A 10 MB line is cut at the limit and refused; the daemon's memory does not follow."""
        rss_before, _ = memory_and_fds(target.daemon.pid)
        with GoodClient(target.socket) as good:
            for payload in (b"x" * 10_000_000, b'{"v": 1, "op": "' + b"a" * 10_000_000 + b'"}\n'):
                raw = exchange(target.socket, payload)
                if raw:  # or the daemon hung up on the rest, which resets the connection
                    assert check_answer(target, raw)["error"] == "bad-request"
                figures.add("clients", "10 MB lines")
        rss_after, _ = memory_and_fds(target.daemon.pid)
        assert rss_after - rss_before < 4 * MAX_LINE // 1024 + 2048  # KiB: nothing like 10 MB
        good.check(figures, "10 MB lines")

    def test_no_newline_ever(self, target: Target, figures: Figures) -> None:
        """A client that never finishes its line gets a timeout answer after READ_TIMEOUT."""
        with GoodClient(target.socket) as good:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(READ_TIMEOUT + 5)
                sock.connect(str(target.socket))
                started = time.monotonic()
                sock.sendall(b'{"v": 1, "op": "token", "acc')
                raw = receive_all(sock)
                waited = time.monotonic() - started
        assert check_answer(target, raw)["error"] == "timeout"
        assert READ_TIMEOUT - 0.5 <= waited <= READ_TIMEOUT + 2
        good.check(figures, "a silent client")
        figures.add("clients", "clients that never sent a newline")

    def test_thousands_of_half_open_connections(self, target: Target, figures: Figures) -> None:
        """Thousands of connections that send nothing, or half a line, or hang up at once:
        each gets busy, a timeout or an error; the good client and the real helper are served."""
        _, fds_before = memory_and_fds(target.daemon.pid)
        rss_before, _ = memory_and_fds(target.daemon.pid)
        opened: list[socket.socket] = []
        with GoodClient(target.socket) as good:
            for n in range(HALF_OPEN):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(READ_TIMEOUT + 10)
                if connect(sock, target.socket):
                    figures.add("clients", "half-open connects that waited for a full queue")
                if n % 3 == 1:
                    sock.sendall(b'{"v": 1, "op": "tok')
                elif n % 3 == 2:
                    sock.shutdown(socket.SHUT_WR)
                opened.append(sock)
            peak_rss, peak_fds = memory_and_fds(target.daemon.pid)
            for _ in range(5):  # the real helper, as a mail program spawns it
                run = helper("token", "work", socket=target.socket, timeout=10)
                assert run.returncode == 0, run.stderr
                assert run.stdout.count("\n") == 1
            codes: dict[str, int] = {}
            for sock in opened:
                try:
                    raw = receive_all(sock)
                except OSError:
                    raw = b""
                code = str(check_answer(target, raw).get("error")) if raw else "hung up"
                codes[code] = codes.get(code, 0) + 1
                sock.close()
        assert set(codes) <= {"busy", "timeout", "bad-request"}, codes
        # Silent ones beyond the slots are evicted (busy): at most a slotful waits to time out.
        assert codes.get("timeout", 0) <= MAX_CONNECTIONS
        good.check(figures, "thousands of half-open connections")
        figures.held(
            "clients",
            "a well-behaved client asking alongside every hostile case saw no error and no "
            "request slower than a second; the real helper was served during the flood",
        )
        time.sleep(0.5)
        rss_after, fds_after = memory_and_fds(target.daemon.pid)
        assert fds_after <= fds_before + 2, (fds_before, peak_fds, fds_after)
        assert peak_fds <= fds_before + HALF_OPEN + 10
        assert rss_after - rss_before < 32 * 1024  # KiB: bounded by the slots, not the flood
        figures.add("clients", "half-open connections", HALF_OPEN)
        for code, count in codes.items():
            figures.add("clients", f"half-open connections answered {code}", count)
        figures.peak("clients", "daemon descriptors at the peak of the half-open flood", peak_fds)
        figures.peak("clients", "daemon RSS growth during the flood (KiB)", peak_rss - rss_before)
        figures.peak(
            "clients", "daemon RSS growth kept after the flood (KiB)", rss_after - rss_before
        )

    def test_clients_that_never_read(self, target: Target, figures: Figures) -> None:
        """Clients that send a request and never read the answer cost the daemon nothing after."""
        _, fds_before = memory_and_fds(target.daemon.pid)
        held = []
        with GoodClient(target.socket) as good:
            for n in range(500):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
                connect(sock, target.socket)
                op = "status" if n % 2 else "token"
                sock.sendall(json.dumps({"v": 1, "op": op, "account": "work"}).encode() + b"\n")
                held.append(sock)
            time.sleep(1.0)
        _, fds_after = memory_and_fds(target.daemon.pid)
        for sock in held:
            sock.close()
        assert fds_after <= fds_before + 2
        good.check(figures, "clients that never read")
        figures.add("clients", "clients that never read their answer", len(held))

    def test_another_users_request(self, target: Target, figures: Figures) -> None:
        """Another uid gets the account shared with it, and for any other account, existing or
        not, the same refusal; its status lists only what it may see."""
        code = (
            "import json, socket, sys\n"
            "answers = []\n"
            "for account in ('work', 'nobody', 'home'):\n"
            "    s = socket.socket(socket.AF_UNIX)\n"
            "    s.connect(sys.argv[1])\n"
            "    line = json.dumps({'v': 1, 'op': 'token', 'account': account})\n"
            "    s.sendall(line.encode() + b'\\n')\n"
            "    answers.append(json.loads(s.makefile('rb').read()))\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "s.connect(sys.argv[1])\n"
            's.sendall(b\'{"v": 1, "op": "status"}\\n\')\n'
            "answers.append(json.loads(s.makefile('rb').read()))\n"
            "print(json.dumps(answers))\n"
        )
        run = subprocess.run(
            ["/usr/bin/python3", "-I", "-c", code, str(target.socket)],
            user=65534,
            group=65534,
            extra_groups=[],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert run.returncode == 0, run.stderr
        work, nobody, home, status = json.loads(run.stdout)
        for reply in (work, nobody):
            target.record(reply)
        assert home["ok"] is True
        assert target.provider.introspect(home["token"])["active"]
        assert work["ok"] is False
        assert work["error"] == "forbidden"
        assert {k: v for k, v in work.items() if k != "message"} == {
            k: v for k, v in nobody.items() if k != "message"
        }
        assert "token" not in work
        assert status["ok"] is True
        assert [row["account"] for row in status["accounts"]] == ["home"]
        figures.add("clients", "requests from another uid (refused)", 2)

    def test_memory_and_descriptors_stay_bounded(self, target: Target, figures: Figures) -> None:
        """After everything above, the daemon still answers and holds no extra descriptors."""
        rss, fds = memory_and_fds(target.daemon.pid)
        assert ask(target.socket, {"v": 1, "op": "ping"})["ok"] is True
        figures.peak("clients", "daemon RSS at the end of the hostile run (KiB)", rss)
        figures.peak("clients", "daemon descriptors at the end of the hostile run", fds)
        assert fds < 40
        figures.held("clients", "descriptors returned to their idle count after every case")


def test_helper_waits_out_a_full_listen_queue(tmp_path: Path, figures: Figures) -> None:
    """`mailoauth token` waits while the daemon's listen queue is full, instead of failing."""
    path = tmp_path / "socket"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    queued = []
    while True:  # fill the queue, as a burst of connections would
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(str(path))
        except BlockingIOError:
            sock.close()
            break
        queued.append(sock)
    run = subprocess.Popen(
        [str(MAILOAUTH), "--socket", str(path), "token", "work"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.3)  # the helper is now waiting for room in the queue
    assert run.poll() is None
    for _ in queued:  # the "daemon" catches up: it serves everyone queued, then the helper
        conn, _ = listener.accept()
        conn.close()
    conn, _ = listener.accept()
    with conn:
        conn.makefile("rb").readline()
        conn.sendall(b'{"ok": true, "token": "t0ken", "expires_at": null, "username": ""}\n')
    out, err = run.communicate(timeout=10)
    assert (run.returncode, out) == (0, "t0ken\n"), err
    for sock in queued:
        sock.close()
    listener.close()
    figures.held("clients", "the helper waits out a full listen queue instead of failing")
