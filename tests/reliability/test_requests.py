"""
Every request is checked at the boundary, and no request ends the daemon (issue #10, §1, §4).

A real system-mode daemon (the tests run as root) with accounts shared with other uids.
Requests come from root (an owner) and from uid 65534 (a user allowed on one account, to
whom every other request is refused), through a relay process running as that uid:
the hand-written ones that used to end the process (`op` not a string, integers of
hundreds of digits), then Hypothesis' random byte strings and random JSON documents.
After each, the daemon is alive, the answer is one well-formed line with a known code
(never "internal"), and a well-behaved client asking for tokens all along is served.

Then one user's attempt to hold every connection slot: waits cancelled when their
clients hang up, a per-uid cap, and slots kept for the administrators.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailoauthd.serve.limits import BURST
from mailoauthd.serve.server import ADMIN_RESERVE, MAX_CONNECTIONS, MAX_PER_UID
from mailoauthd.testing import DevProvider

from .support import (
    Daemon,
    Figures,
    Ledger,
    ask,
    memory_and_fds,
    new_provider,
    seed_accounts,
    size,
    write_config,
)
from .test_clients import CODES, DESTRUCTIVE, GoodClient

EXAMPLES_TEST, EXAMPLES_SOAK = 150, 2000
EXAMPLES = size(EXAMPLES_TEST, EXAMPLES_SOAK)
OTHER = 65534  # nobody
# Users who may wait for the account that needs a sign-in ("lost").
WAITERS = (65530, 65531, 65532, 65533, OTHER)

RELAY = r"""
import json, socket, sys, time
held = []
for line in sys.stdin:
    command = json.loads(line)
    if command["do"] == "send":
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(command["within"])
        answer, hung_up = b"", False
        try:
            s.connect(command["path"])
            try:
                s.sendall(bytes.fromhex(command["payload"]))
                s.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                pass
            while chunk := s.recv(65536):
                answer += chunk
        except TimeoutError:
            hung_up = True
        except ConnectionResetError:
            pass
        s.close()
        print(json.dumps({"answer": answer.hex(), "hung_up": hung_up}), flush=True)
    elif command["do"] == "hold":
        busy = 0
        opened = []
        for _ in range(command["count"]):
            s = socket.socket(socket.AF_UNIX)
            s.connect(command["path"])
            s.sendall(bytes.fromhex(command["payload"]))
            opened.append(s)
        time.sleep(command["settle"])
        for s in opened:
            s.setblocking(False)
            try:
                answer = s.recv(65536)
            except BlockingIOError:
                held.append(s)
                continue
            busy += b'"busy"' in answer
            s.close()
        print(json.dumps({"held": len(held), "busy": busy}), flush=True)
    elif command["do"] == "release":
        for s in held:
            s.close()
        held.clear()
        print(json.dumps({"released": True}), flush=True)
"""


class Relay:
    """A process under another uid that sends what it is told over the socket."""

    def __init__(self, uid: int, path: Path) -> None:
        self.path = path
        self.proc = subprocess.Popen(
            [sys.executable if uid == 0 else "/usr/bin/python3", "-I", "-c", RELAY],
            user=uid,
            group=uid,
            extra_groups=[],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def command(self, **command: object) -> dict[str, object]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"path": str(self.path), **command}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the relay died"
        answer: dict[str, object] = json.loads(line)
        return answer

    def send(self, payload: bytes, *, within: float = 15.0) -> tuple[bytes, bool]:
        """The daemon's answer (all it sent), and whether we gave up waiting for it."""
        reply = self.command(do="send", payload=payload.hex(), within=within)
        return bytes.fromhex(str(reply["answer"])), bool(reply["hung_up"])

    def close(self) -> None:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.proc.stdout.close()


@dataclass
class Target:
    daemon: Daemon
    provider: DevProvider
    socket: Path
    relays: dict[int, Relay]


@pytest.fixture(scope="module")
def target(figures: Figures, ledger: Ledger) -> Iterator[Target]:
    """A system-mode daemon: "work" is root's, "home" is shared with 65534, "lost" (no grant)
    with the WAITERS; relays as root and as 65534."""
    base = Path(tempfile.mkdtemp(prefix="mailoauthd-requests-"))
    base.chmod(0o755)
    provider, client_secret = new_provider(refresh_token_rotation="rotate")
    daemon = None
    relays: dict[int, Relay] = {}
    try:
        config = write_config(
            base, provider, client_secret, accounts=("work", "home", "lost"), daemon_keys=""
        )
        text = config.read_text()
        text = text.replace(
            '[accounts.home]\nprovider = "dev"',
            f'[accounts.home]\nprovider = "dev"\nallow_users = [{OTHER}]',
        ).replace(
            '[accounts.lost]\nprovider = "dev"',
            f'[accounts.lost]\nprovider = "dev"\nallow_users = {list(WAITERS)}',
        )
        config.write_text(text)
        seed_accounts(base, provider, ("work", "home"))
        daemon = Daemon(config, base / "run" / "socket", base / "daemon.log")
        daemon.wait_ready()
        deadline = time.monotonic() + 10
        while {r["status"] for n, r in daemon.status().items() if n != "lost"} != {"ok"}:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        relays = {uid: Relay(uid, base / "run" / "socket") for uid in (0, OTHER)}
        yield Target(daemon, provider, base / "run" / "socket", relays)
        for relay in relays.values():
            relay.close()
        assert daemon.stop() == 0
        ledger.scan(provider.issued_secrets(), [("daemon log", daemon.log())])
    finally:
        for relay in relays.values():
            if relay.proc.poll() is None:
                relay.proc.kill()
                relay.close()
        if daemon is not None:
            daemon.kill()
        provider.stop()
        shutil.rmtree(base, ignore_errors=True)


def well_formed(raw: bytes) -> dict[str, object]:
    """One JSON line, an object with `ok`; an error has a known code (never "internal")."""
    assert raw.endswith(b"\n"), raw[:200]
    assert raw.count(b"\n") == 1, raw[:200]
    reply = json.loads(raw)
    assert isinstance(reply, dict)
    if reply["ok"] is not True:
        assert reply["error"] in CODES, reply
        assert isinstance(reply["message"], str), reply
        assert len(reply["message"]) < 2000, reply
        assert isinstance(reply["hint"], str)
    return reply


def alive(target: Target) -> None:
    assert target.daemon.proc.poll() is None, target.daemon.log()[-3000:]
    assert ask(target.socket, {"v": 1, "op": "ping"}, timeout=10)["ok"] is True


CRASHERS = [
    {"v": 1, "op": []},
    {},
    {"v": 1, "op": {}},
    {"v": 1, "op": ["token"], "account": "home"},
    {"v": 1, "op": "token", "account": "home", "min_validity": 10**400},
    {"v": 1, "op": "token", "account": "home", "timeout": 10**400},
    {"v": 1, "op": "token", "account": "home", "wait": -(10**400)},
    {"v": 1, "op": "token", "account": "work", "min_validity": 10**400},
    {"v": 1, "op": "token", "account": ["home"]},
    {"v": 1, "op": "token", "account": "x" * 60000},
    {"v": 1, "op": "status", "account": {"a": [1]}},
    {"v": 1, "op": "refresh", "account": "home", "timeout": 10**300},
]


@pytest.mark.parametrize("uid", [OTHER, 0])
@pytest.mark.parametrize("request_", CRASHERS, ids=range(len(CRASHERS)))
def test_requests_that_ended_the_daemon_are_bad_requests(
    target: Target, figures: Figures, uid: int, request_: dict[str, object]
) -> None:
    """`op` not a string (TypeError in the access check) and huge integers (OverflowError on
    the quick path) ended the process; now each is a bad request, from anyone."""
    raw, hung_up = target.relays[uid].send(json.dumps(request_).encode() + b"\n")
    assert not hung_up
    reply = well_formed(raw)
    assert reply["error"] == "bad-request", reply
    assert len(reply["message"]) < 200, reply  # type: ignore[arg-type]  # nothing echoed whole
    alive(target)
    figures.add("requests", "hand-written requests that used to end the daemon")


def json_documents() -> st.SearchStrategy[object]:
    """Any JSON value: huge integers, floats, deep and wide nesting, any text."""
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.integers(min_value=10**20, max_value=10**500),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=30),
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
        max_leaves=12,
    )


def requests_of(values: st.SearchStrategy[object]) -> st.SearchStrategy[dict[str, object]]:
    """Objects with the protocol's keys, each either right or any JSON value."""
    seconds = st.one_of(st.floats(-5, 3), st.integers(-(10**400), 10**400), values)
    return st.fixed_dictionaries(
        {},
        optional={
            "v": st.one_of(st.just(1), values),
            "op": st.one_of(st.sampled_from(["token", "status", "ping", "servers"]), values),
            "account": st.one_of(st.sampled_from(["work", "home", "lost", "nobody"]), values),
            "min_validity": seconds,
            "timeout": seconds,
            "wait": seconds,
            "refresh_token": st.one_of(st.text(max_size=10), values),
            "flow": values,
        },
    )


def payloads() -> st.SearchStrategy[bytes]:
    documents = json_documents()
    encoded = st.one_of(documents, requests_of(documents)).map(
        lambda doc: json.dumps(doc).encode() + b"\n"
    )
    return st.one_of(st.binary(max_size=2048), encoded)


@pytest.mark.parametrize("uid", [OTHER, 0])
def test_random_documents_never_end_the_daemon(target: Target, figures: Figures, uid: int) -> None:
    """Random byte strings and random JSON documents, from an owner and from another user:
    one well-formed answer each (or a request the daemon accepted and works on), the daemon
    alive, and a well-behaved client served all along."""
    relay = target.relays[uid]
    counted = {"answered": 0, "still working": 0}

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(payload=payloads())
    def attack(payload: bytes) -> None:
        if uid == 0 and any(f'"{op}"'.encode() in payload for op in (*DESTRUCTIVE, "refresh")):
            return  # root may revoke, re-import or refresh; the fuzzer must not
        raw, hung_up = relay.send(payload, within=4.0)
        if hung_up:
            # Only a request the daemon took: a token for an account with no grant, waited
            # for, or a refresh. It is given up when we hang up (see the test below).
            assert b'"op": "token"' in payload or b'"op": "refresh"' in payload, payload[:300]
            counted["still working"] += 1
        else:
            well_formed(raw)
            counted["answered"] += 1
        assert target.daemon.proc.poll() is None, target.daemon.log()[-3000:]

    with GoodClient(target.socket) as good:
        attack()
    good.check(figures, "random requests")
    alive(target)
    who = "an owner" if uid == 0 else "another user"
    sent = counted["answered"] + counted["still working"]
    figures.add("requests", f"random documents and byte strings sent by {who} (Hypothesis)", sent)
    figures.add(
        "requests", f"of them still being worked on after 4 s ({who})", counted["still working"]
    )
    figures.held("requests", "no random document or byte string ended the daemon")


def test_waits_end_when_their_clients_hang_up(target: Target, figures: Figures) -> None:
    """600 `token --wait 3600` requests for an account that needs a sign-in: one uid holds at
    most MAX_PER_UID, several together leave the administrators' slots free (`status` works),
    and once the clients hang up every slot and descriptor is given back within seconds."""
    _, fds_before = memory_and_fds(target.daemon.pid)
    line = json.dumps({"v": 1, "op": "token", "account": "lost", "wait": 3600, "timeout": 5})
    payload = (line + "\n").encode().hex()
    relays = [target.relays[OTHER]] + [Relay(uid, target.socket) for uid in WAITERS[:-1]]
    try:
        first = relays[0].command(do="hold", count=200, payload=payload, settle=2.0)
        assert first == {"held": MAX_PER_UID, "busy": 200 - MAX_PER_UID}, first
        held = MAX_PER_UID
        for relay in relays[1:]:
            got = relay.command(do="hold", count=100, payload=payload, settle=1.0)
            held += int(got["held"])  # type: ignore[call-overload]
        # A connection told to make room while its line was arriving may still be served
        # (the eviction lost the race): then a slot or two more are held, for a moment.
        assert MAX_CONNECTIONS - ADMIN_RESERVE <= held <= MAX_CONNECTIONS - ADMIN_RESERVE + 4, held
        # Every slot an ordinary user may take is taken; an administrator still gets in.
        started = time.monotonic()
        assert target.daemon.status()["lost"]["status"] == "needs_authorization"
        assert time.monotonic() - started < 2.0
        for relay in relays:
            assert relay.command(do="release") == {"released": True}
        deadline = time.monotonic() + 10
        while memory_and_fds(target.daemon.pid)[1] > fds_before + 2:
            assert time.monotonic() < deadline, "the waits outlived their clients"
            time.sleep(0.05)
        abandoned = target.daemon.events("request.abandoned")
        assert len(abandoned) >= held
    finally:
        relays[0].command(do="release")  # the module's relay: its waits must not outlive this
        for relay in relays[1:]:
            relay.close()
    alive(target)
    figures.add("requests", "waits cancelled when their clients hung up", held)
    figures.held("requests", "a user's waits never held the administrators' slots")


def test_refusals_are_logged_bounded_and_rate_limited(target: Target, figures: Figures) -> None:
    """A user looping on a refused request gets a few log lines, not one per request; the
    line that follows a quiet spell counts what was left out; long names are never logged."""
    before = [e for e in target.daemon.events("request.refused") if e.get("uid") == OTHER]
    line = json.dumps({"v": 1, "op": "token", "account": "work"}).encode() + b"\n"
    for _ in range(40):
        raw, _ = target.relays[OTHER].send(line)
        assert well_formed(raw)["error"] == "forbidden"
    raw, _ = target.relays[OTHER].send(
        json.dumps({"v": 1, "op": "token", "account": "w\n" + "x" * 60000}).encode() + b"\n"
    )
    assert well_formed(raw)["error"] == "bad-request"
    time.sleep(0.5)
    after = [e for e in target.daemon.events("request.refused") if e.get("uid") == OTHER]
    logged = after[len(before) :]
    assert 1 <= len(logged) <= BURST + 1, len(logged)
    assert all(len(str(e.get("account"))) <= 64 for e in after)
    assert all(len(line) < 4000 for line in target.daemon.log().splitlines())
    figures.add("requests", "refused requests in a loop from one uid", 40)
    figures.add("requests", "of them logged", len(logged))
