"""
Provider faults: for each way a token endpoint fails, the daemon keeps serving the token it
has, retries with growing waits (Retry-After honoured), shows the error in `status`, and
recovers by itself once the provider does.

The daemon runs in-process on trio's MockClock; the provider's clock is the same, so its
request log is in test time and proves the spacing of the retries.
"""

from __future__ import annotations

import dataclasses
import itertools
import select
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing
from conftest import T0, helper, in_process_daemon, mock_now, quiet

from mailoauthd import config as config_module
from mailoauthd.refresh.attempt import BACKOFF_BASE_SECONDS
from mailoauthd.secret import Secret
from mailoauthd.storage import state
from mailoauthd.testing import DevProvider

from .support import Figures, Ledger, new_provider, write_config

REQUEST_TIMEOUT = 10
KEYS = f'refresh_spread = "0s"\nrequest_timeout = "{REQUEST_TIMEOUT}s"'
SEEDED = "seeded-access-token-of-work"  # valid for 500 s: due (refresh_before 10 min), usable


@dataclass(frozen=True)
class Fault:
    """One way the token endpoint fails, as the development provider plays it."""

    kind: str
    params: dict[str, object] = field(default_factory=dict)
    count: int = 3
    shows: str = ""  # what `status` must say
    retry_after: float = 0.0
    extra: float = 0.0  # time an attempt takes before it fails (a hang: the timeout)


FAULTS = {
    "HTTP 500": Fault("status", {"status": 500}, shows="HTTP 500"),
    "HTTP 502": Fault("status", {"status": 502}, shows="HTTP 502"),
    "HTTP 503": Fault("status", {"status": 503}, shows="HTTP 503"),
    "HTTP 429 with Retry-After": Fault(
        "status",
        {"status": 429, "headers": {"Retry-After": "120"}},
        count=2,
        shows="HTTP 429",
        retry_after=120,
    ),
    "a hang past the timeout": Fault(
        "hang", {"seconds": 60}, shows="did not answer within", extra=REQUEST_TIMEOUT
    ),
    "a reset connection": Fault("reset", shows="cannot reach the token endpoint"),
    "an HTML error page": Fault("html", {"status": 502}, shows="HTML page"),
    "malformed JSON": Fault("malformed", shows="not a JSON object"),
    "200 without access_token": Fault("no_access_token", shows="no access_token"),
    "a TLS failure": Fault("tls", shows="CERTIFICATE_VERIFY_FAILED"),
}


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two self-signed certificates for 127.0.0.1: one the daemon will trust, one not."""
    directory = tmp_path_factory.mktemp("tls")
    made = {}
    for name in ("trusted", "untrusted"):
        cert, key = directory / f"{name}.pem", directory / f"{name}.key"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
            + ["-nodes", "-days", "2", "-subj", "/CN=127.0.0.1", "-keyout", str(key)]
            + ["-out", str(cert), "-addext", "subjectAltName=IP:127.0.0.1"]
            + ["-addext", "basicConstraints=critical,CA:TRUE"],
            check=True,
            capture_output=True,
        )
        made[name], made[name + ".key"] = cert, key
    return made


class TLSFront:
    """
    An https endpoint on 127.0.0.1 in front of the provider. It presents the untrusted
    certificate until `fix()`; every handshake is logged with the provider's clock.
    """

    def __init__(self, provider: DevProvider, certs: dict[str, Path], now: Callable[[], float]):
        self.backend = (provider.host, int(provider.url.rsplit(":", 1)[1]))
        self.certs, self.now = certs, now
        self.handshakes: list[tuple[float, bool]] = []
        self._context = self._load("untrusted")
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self._closed = threading.Event()
        self.url = f"https://127.0.0.1:{self._listener.getsockname()[1]}"
        self._accept = threading.Thread(target=self._serve, daemon=True)
        self._accept.start()

    def _load(self, name: str) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.certs[name], self.certs[name + ".key"])
        return context

    def fix(self) -> None:
        """The provider's operators install a certificate clients trust."""
        self._context = self._load("trusted")

    def close(self) -> None:
        self._closed.set()
        self._accept.join()
        self._listener.close()

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            thread = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            thread.start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            tls = self._context.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError):
            self.handshakes.append((self.now(), False))
            conn.close()
            return
        self.handshakes.append((self.now(), True))
        with tls, socket.create_connection(self.backend) as upstream:
            ends = {tls: upstream, upstream: tls}
            while ends:
                ready, _, _ = select.select(list(ends), [], [], 10)
                if not ready:
                    return
                for end in ready:
                    try:
                        data = end.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    ends[end].sendall(data)


def seed_with_token(state_dir: Path, refresh_token: str) -> None:
    """An account whose access token is good for 500 more seconds."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    store = state.TokenStore(state_dir)
    store.open()
    st = state.imported("work", Secret(refresh_token), T0)
    st = dataclasses.replace(
        st, access_token=Secret(SEEDED), expires_at=T0 + timedelta(seconds=500)
    )
    store.save(st)
    store.close()


@pytest.mark.parametrize("name", list(FAULTS))
async def test_provider_fault(
    name: str,
    clock: trio.testing.MockClock,
    tmp_path: Path,
    certificates: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    figures: Figures,
    ledger: Ledger,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Through the fault the old token is served, retries back off, status shows the error,
    and the daemon recovers by itself."""
    fault = FAULTS[name]
    now = mock_now(clock)
    provider, client_secret = new_provider(
        refresh_token_rotation="strict", clock=lambda: now().timestamp()
    )
    front = None
    try:
        config_path = write_config(tmp_path, provider, client_secret, daemon_keys=KEYS)
        if fault.kind == "tls":
            front = TLSFront(provider, certificates, lambda: now().timestamp())
            endpoint = provider.endpoints["token_endpoint"]
            text = config_path.read_text().replace(endpoint, front.url + "/token")
            config_path.write_text(text)
            # What the daemon trusts; the front shows it only once fixed.
            monkeypatch.setenv("SSL_CERT_FILE", str(certificates["trusted"]))
        else:
            provider.add_fault(fault.kind, count=fault.count, **fault.params)
        seed_with_token(tmp_path / "state", provider.issue_refresh_token("work@example.com"))
        cfg = config_module.load(config_path)
        socket_path = tmp_path / "run" / "socket"

        def attempts() -> list[float]:
            if front is not None:
                return [t for t, _ in front.handshakes]
            return [r.time for r in provider.requests if r.path == "/token"]

        texts: list[tuple[str, str]] = []
        async with in_process_daemon(cfg, now=now) as d:
            for attempt in range(1, fault.count + 1):
                if fault.extra:
                    # A hang ends when the request's timeout passes on the clock: jump
                    # once the provider has the request (a wait on its condition).
                    arrived = partial(provider.wait_for, lambda: len(attempts()) >= attempt, 10)  # noqa: B023
                    assert await trio.to_thread.run_sync(arrived)
                    clock.jump(fault.extra)
                await quiet(d.scheduler)
                assert len(attempts()) == attempt
                row = d.scheduler.status()[0]
                assert row["failures"] == attempt
                assert row["status"] == "failing"
                assert fault.shows in str(row["last_error"]), row["last_error"]
                served = await trio.to_thread.run_sync(
                    lambda: helper("token", "work", socket=socket_path)
                )
                assert (served.returncode, served.stdout) == (0, SEEDED + "\n"), served.stderr
                shown = await trio.to_thread.run_sync(
                    lambda: helper("status", "--json", socket=socket_path)
                )
                assert fault.shows in shown.stdout
                texts += [("status --json", shown.stdout), ("helper stderr", served.stderr)]
                if front is not None and attempt == fault.count:
                    front.fix()
                # next_check is shown to the second, cut: the retry is due within 1 s of it.
                wait = (datetime.fromisoformat(str(row["next_check"])) - now()).total_seconds()
                clock.jump(max(0.0, wait - 0.5))
                await quiet(d.scheduler)
                assert len(attempts()) == attempt, "retried before its time"
                clock.jump(2)
            await quiet(d.scheduler)
            row = d.scheduler.status()[0]
            assert row["status"] == "ok"
            assert row["last_error"] is None
            assert row["failures"] == 0
            served = await trio.to_thread.run_sync(
                lambda: helper("token", "work", socket=socket_path)
            )
            token = served.stdout.strip()
            assert token != SEEDED
            assert provider.introspect(token)["active"]
        times = attempts()
        assert len(times) == fault.count + 1
        gaps = [b - a for a, b in itertools.pairwise(times)]
        for number, gap in enumerate(gaps, start=1):
            backoff = BACKOFF_BASE_SECONDS * 2 ** (number - 1)
            # Jumps land up to 1.5 s after the due time (whole seconds in status).
            low, high = fault.extra + backoff / 2, fault.extra + backoff + 1.5
            if fault.retry_after:
                low, high = fault.retry_after, fault.retry_after + 1.5
            assert low <= gap <= high, f"retry {number} after {gap:.1f} s"
        figures.add("faults", "fault kinds", 1)
        figures.add("faults", "faults injected", fault.count)
        figures.add("faults", "retries observed", len(gaps))
        figures.counts.setdefault("fault spacing", {})[name] = " / ".join(f"{g:.0f}" for g in gaps)
        figures.held(
            "faults",
            "for every fault kind: old token served, error shown in status, retries spaced "
            "by backoff (Retry-After honoured), recovery without help",
        )
        texts.append(("daemon log", capsys.readouterr().out))
        ledger.scan(provider.issued_secrets(), texts)
    finally:
        if front is not None:
            front.close()
        provider.stop()
