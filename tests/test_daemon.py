"""
Black-box: the real `mailoauthd` and `mailoauth` programs as subprocesses, against the
development provider over real HTTP on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import (
    MAILOAUTHD,
    USER,
    DaemonProcess,
    config_text,
    helper,
)

from mailoauthd.testing import DevProvider

pytestmark = pytest.mark.slow

Start = Callable[..., DaemonProcess]


@pytest.fixture
def setup(tmp_path: Path, provider: DevProvider) -> Path:
    """A config file for one account `work` at the development provider."""
    path = tmp_path / "config.toml"
    path.write_text(config_text(tmp_path, provider))
    return path


def authorize(d: DaemonProcess, provider: DevProvider, account: str = "work") -> str:
    """Bootstrap an account as a user would today: `mailoauth import` with a refresh token."""
    refresh_token = provider.issue_refresh_token(USER)
    run = helper("import", account, socket=d.socket, stdin=refresh_token + "\n")
    assert run.returncode == 0, run.stderr
    return refresh_token


def status(d: DaemonProcess) -> dict[str, dict[str, object]]:
    run = helper("status", "--json", socket=d.socket)
    assert run.returncode == 0, run.stderr
    return {row["account"]: row for row in json.loads(run.stdout)["accounts"]}


class TestServing:
    def test_token_sasl_and_status(
        self, setup: Path, provider: DevProvider, start_daemon: Start
    ) -> None:
        """After import, `token` prints just the token, `sasl` its XOAUTH2 form; status says ok."""
        d = start_daemon(setup)
        assert status(d)["work"]["status"] == "needs_authorization"
        authorize(d, provider)
        token = helper("token", "work", socket=d.socket)
        assert token.returncode == 0, token.stderr
        assert token.stderr == ""
        value = token.stdout.removesuffix("\n")
        assert "\n" not in value
        assert provider.introspect(value)["active"] is True
        sasl = helper("sasl", "work", socket=d.socket)
        import base64

        assert (
            base64.b64decode(sasl.stdout) == f"user={USER}\x01auth=Bearer {value}\x01\x01".encode()
        )
        row = status(d)["work"]
        assert row["status"] == "ok"
        assert isinstance(row["expires_in"], int)
        assert 3500 < row["expires_in"] <= 3600

    def test_unknown_account_is_an_error(self, setup: Path, start_daemon: Start) -> None:
        """A name that is not configured exits 1 and says so; nothing on stdout."""
        d = start_daemon(setup)
        run = helper("token", "nosuch", socket=d.socket)
        assert run.returncode == 1
        assert run.stdout == ""
        assert "nosuch: no such account" in run.stderr

    def test_revoked_grant_exits_4_naming_authorize(
        self, setup: Path, provider: DevProvider, start_daemon: Start
    ) -> None:
        """When the provider revokes the grant, `token` exits 4 and names the fixing command."""
        # Tokens of 2 s, so that the one held runs out: asking for more validity than
        # the provider's tokens have no longer forces a refresh (min_validity is capped).
        provider.set_options(access_token_lifetime=2.0)
        d = start_daemon(setup)
        authorize(d, provider)
        provider.revoke_user(USER)
        refresh = helper("refresh", "work", socket=d.socket)
        assert refresh.returncode == 4
        deadline = time.monotonic() + 10
        while status(d)["work"]["expires_in"] and time.monotonic() < deadline:
            time.sleep(0.2)
        run = helper("token", "work", socket=d.socket)
        assert run.returncode == 4
        assert run.stdout == ""
        assert "mailoauth authorize work" in run.stderr
        assert status(d)["work"]["status"] == "needs_authorization"

    def test_provider_down_exits_5_with_its_answer(
        self, setup: Path, provider: DevProvider, start_daemon: Start
    ) -> None:
        """With no valid token and a failing provider, `token` exits 5 and says what it answered."""
        d = start_daemon(setup)
        provider.add_fault("status", count=10, status=503)
        refresh_token = provider.issue_refresh_token(USER)
        run = helper("import", "work", socket=d.socket, stdin=refresh_token + "\n")
        assert run.returncode == 5
        assert "503" in run.stderr
        token = helper("token", "work", socket=d.socket)
        assert token.returncode == 5
        assert "503" in token.stderr

    def test_state_survives_a_restart(
        self, setup: Path, provider: DevProvider, start_daemon: Start
    ) -> None:
        """A restarted daemon serves the stored token without asking the provider again."""
        d = start_daemon(setup)
        authorize(d, provider)
        first = helper("token", "work", socket=d.socket).stdout
        assert d.stop() == 0
        assert not d.socket.exists()
        before = provider.count(grant_type="refresh_token")
        d2 = start_daemon(setup)
        assert helper("token", "work", socket=d2.socket).stdout == first
        assert provider.count(grant_type="refresh_token") == before

    def test_state_files_are_private(
        self, setup: Path, provider: DevProvider, start_daemon: Start, tmp_path: Path
    ) -> None:
        """The state directory is 0700, each state file 0600, the socket 0600 in a 0700 dir."""
        d = start_daemon(setup)
        authorize(d, provider)
        state_dir = tmp_path / "state"
        assert state_dir.stat().st_mode & 0o777 == 0o700
        assert (state_dir / "work.toml").stat().st_mode & 0o777 == 0o600
        assert d.socket.stat().st_mode & 0o777 == 0o600
        assert d.socket.parent.stat().st_mode & 0o777 == 0o700


class TestExclusion:
    def test_second_daemon_on_the_same_state_is_refused(
        self, setup: Path, start_daemon: Start, tmp_path: Path
    ) -> None:
        """A second daemon on the same state dir exits 1 naming the directory and the holder."""
        d = start_daemon(setup)
        other = tmp_path / "other.toml"
        other.write_text(setup.read_text().replace(str(tmp_path / "run"), str(tmp_path / "run2")))
        second = start_daemon(other, wait=False)
        assert second.proc.wait(timeout=20) == 1
        log = second.log()
        assert str(tmp_path / "state") in log
        assert f"pid {d.proc.pid}" in log
        assert status(d)  # the first one is unharmed

    @pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
    def test_peer_with_another_uid_is_refused(
        self, provider: DevProvider, start_daemon: Start
    ) -> None:
        """The real helper run as uid 65534 is refused by SO_PEERCRED and told nothing of tokens."""
        if not shutil.which("setpriv"):
            pytest.skip("setpriv (util-linux) is not installed")
        # Everything the other uid needs must be reachable by it: pytest's
        # tmp_path is 0700, so use a world-readable directory of our own.
        base = Path(tempfile.mkdtemp(prefix="mailoauthd-peer-"))
        try:
            base.chmod(0o755)
            (base / "config.toml").write_text(config_text(base, provider))
            d = start_daemon(base / "config.toml")
            authorize(d, provider)
            # Open the way to the socket; the daemon's peer check is what must refuse.
            d.socket.parent.chmod(0o755)
            d.socket.chmod(0o666)
            package = base / "pkg" / "mailoauthd"
            shutil.copytree(Path(__file__).parent.parent / "mailoauthd", package)
            for path in [base / "pkg", *base.joinpath("pkg").rglob("*")]:
                path.chmod(0o755)
            python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
            run = subprocess.run(
                [
                    "setpriv",
                    "--reuid=65534",
                    "--regid=65534",
                    "--clear-groups",
                    python,
                    "-I",
                    "-c",
                    f"import sys; sys.path.insert(0, {str(base / 'pkg')!r}); "
                    "from mailoauthd.helper.token import main; "
                    f"sys.exit(main(['--socket', {str(d.socket)!r}, 'token', 'work']))",
                ],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert run.returncode == 1, run.stderr
            assert run.stdout == ""
            assert "uid 65534 may not use this mailoauthd" in run.stderr
            assert helper("token", "work", socket=d.socket).returncode == 0
            refused = [e for e in d.events() if e.get("event") == "request.refused"]
            assert refused
            assert refused[0]["uid"] == 65534
        finally:
            shutil.rmtree(base, ignore_errors=True)


def raw_request(path: Path, payload: bytes, *, half_close: bool = True) -> bytes:
    """Send raw bytes to the daemon and read its whole answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(20)
        s.connect(str(path))
        s.sendall(payload)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


class TestBadClients:
    @pytest.mark.parametrize(
        ("payload", "code"),
        [
            (b"\xff\xfe garbage\n", "bad-request"),
            (b"not json\n", "bad-request"),
            (b"[1, 2]\n", "bad-request"),
            (b'{"v": 2, "op": "token", "account": "work"}\n', "bad-request"),
            (b'{"v": 1, "op": "launch"}\n', "bad-request"),
            (b'{"v": 1, "op": "token", "account": 7}\n', "bad-request"),
            (b'{"v": 1, "op": "token", "account": "work", "timeout": "x"}\n', "bad-request"),
            (b"x" * 70000 + b"\n", "bad-request"),
            (b"", "bad-request"),
        ],
    )
    def test_malformed_request_gets_an_error(
        self, setup: Path, provider: DevProvider, start_daemon: Start, payload: bytes, code: str
    ) -> None:
        """Malformed, oversized or unknown requests get one error line; the daemon serves on."""
        d = start_daemon(setup)
        answer = json.loads(raw_request(d.socket, payload))
        assert answer["ok"] is False
        assert answer["error"] == code
        assert answer["message"]
        assert helper("status", socket=d.socket).returncode == 0

    def test_silent_and_flooding_clients_do_not_disturb_a_good_one(
        self, setup: Path, provider: DevProvider, start_daemon: Start
    ) -> None:
        """While clients hang silent or flood garbage, a good client is served at once."""
        d = start_daemon(setup)
        authorize(d, provider)
        silent = []
        for _ in range(50):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(d.socket))
            silent.append(s)
        stop = threading.Event()

        def flood() -> None:
            while not stop.is_set():
                try:
                    raw_request(d.socket, b"\x00" * 100000)
                except OSError:
                    pass

        flooders = [threading.Thread(target=flood) for _ in range(4)]
        for t in flooders:
            t.start()
        try:
            for _ in range(10):
                started = time.monotonic()
                run = helper("token", "work", socket=d.socket)
                assert run.returncode == 0, run.stderr
                assert time.monotonic() - started < 5
        finally:
            stop.set()
            for t in flooders:
                t.join()
            for s in silent:
                s.close()

    @pytest.mark.parametrize("field", ["timeout", "wait", "min_validity"])
    def test_ill_typed_field_is_refused_even_with_a_token_at_hand(
        self, setup: Path, provider: DevProvider, start_daemon: Start, field: str
    ) -> None:
        """A wrongly typed field is refused although the token could be answered at once."""
        d = start_daemon(setup)
        authorize(d, provider)
        line = json.dumps({"v": 1, "op": "token", "account": "work", field: "x"}) + "\n"
        answer = json.loads(raw_request(d.socket, line.encode()))
        assert answer["error"] == "bad-request"
        assert field in answer["message"]

    def test_silent_client_is_timed_out(self, setup: Path, start_daemon: Start) -> None:
        """A client that connects and says nothing gets a timeout answer and is closed."""
        d = start_daemon(setup)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(20)
            s.connect(str(d.socket))
            answer = json.loads(s.recv(65536))
        assert answer["error"] == "timeout"


@pytest.mark.integration  # ,  # the daemon under a NOTIFY_SOCKET
class TestOperations:
    def test_sighup_reloads_and_keeps_old_config_on_error(
        self, setup: Path, provider: DevProvider, start_daemon: Start
    ) -> None:
        """SIGHUP adds a new account; a broken config on SIGHUP is logged and the old one kept."""
        d = start_daemon(setup)
        setup.write_text(
            setup.read_text() + '\n[accounts.home]\nprovider = "dev"\nusername = "b@x"\n'
        )
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "home" not in status(d):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        setup.write_text(setup.read_text() + "\n[accounts.broken]\nprovder = 1\n")
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while not any(e.get("event") == "config.reload_failed" for e in d.events()):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        failed = next(e for e in d.events() if e.get("event") == "config.reload_failed")
        assert "accounts.broken" in str(failed["error"])
        assert set(status(d)) == {"work", "home"}

    def test_sigterm_stops_cleanly_and_removes_the_socket(
        self, setup: Path, start_daemon: Start
    ) -> None:
        """SIGTERM ends the daemon with status 0 and removes its socket."""
        d = start_daemon(setup)
        assert d.stop() == 0
        assert not d.socket.exists()

    def test_stopping_leaves_another_daemons_socket_alone(
        self, setup: Path, start_daemon: Start, tmp_path: Path
    ) -> None:
        """A daemon whose socket file was replaced by another's does not remove it on exit."""
        first = start_daemon(setup)
        first.socket.unlink()  # as a careless clean-up would
        other = tmp_path / "other.toml"
        other.write_text(setup.read_text().replace(str(tmp_path / "state"), str(tmp_path / "s2")))
        second = start_daemon(other)
        assert first.stop() == 0
        assert second.socket.exists()
        assert helper("status", socket=second.socket).returncode == 0

    def test_notify_socket_sees_ready_status_reloading_stopping(
        self, setup: Path, tmp_path: Path
    ) -> None:
        """READY=1 and STATUS=, RELOADING=1 on SIGHUP, STOPPING=1 on SIGTERM reach NOTIFY_SOCKET."""
        notify = tmp_path / "notify"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
            listener.bind(str(notify))
            listener.settimeout(15)
            env = {**os.environ, "NOTIFY_SOCKET": str(notify)}
            proc = subprocess.Popen(
                [str(MAILOAUTHD), "--config", str(setup)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                ready = listener.recv(4096).decode()
                assert "READY=1" in ready
                assert "STATUS=1 accounts" in ready
                proc.send_signal(signal.SIGHUP)
                assert "RELOADING=1" in listener.recv(4096).decode()
                assert "READY=1" in listener.recv(4096).decode()
                proc.send_signal(signal.SIGTERM)
                assert "STOPPING=1" in listener.recv(4096).decode()
                assert proc.wait(timeout=20) == 0
            finally:
                proc.kill()
                proc.wait()


@pytest.mark.integration  # ,  # `mailoauthd check-config`
class TestCheckConfig:
    def test_good_config_exits_0(self, setup: Path) -> None:
        """check-config validates and exits 0 without starting anything."""
        run = subprocess.run(
            [str(MAILOAUTHD), "--config", str(setup), "check-config"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert run.returncode == 0, run.stderr
        assert not (setup.parent / "run").exists()

    def test_bad_config_names_file_table_and_key(self, setup: Path) -> None:
        """A typo'd key is reported with the file, the table, the key and a suggestion."""
        setup.write_text(setup.read_text().replace("username =", "usrname ="))
        run = subprocess.run(
            [str(MAILOAUTHD), "--config", str(setup), "check-config"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert run.returncode == 1
        assert str(setup) in run.stderr
        assert "accounts.work" in run.stderr
        assert "usrname" in run.stderr
        assert "username" in run.stderr


class TestSecrets:
    def test_no_secret_in_logs_of_a_full_run(
        self, setup: Path, provider: DevProvider, start_daemon: Start, tmp_path: Path
    ) -> None:
        """At debug level, no token, refresh token or client secret appears in any log line."""
        d = start_daemon(setup)
        secrets = {"demo-secret", authorize(d, provider)}
        for _ in range(3):
            secrets.add(helper("token", "work", socket=d.socket).stdout.strip())
            assert helper("refresh", "work", socket=d.socket).returncode == 0
        stored = tomllib.loads((tmp_path / "state" / "work.toml").read_text())
        secrets |= {stored["access_token"], stored["refresh_token"]}
        provider.add_fault("status", status=500, body='{"error":"server_error"}')
        helper("refresh", "work", socket=d.socket)
        provider.revoke_user(USER)
        helper("refresh", "work", socket=d.socket)
        helper("revoke", "work", socket=d.socket)
        d.stop()
        log = d.log()
        assert "token.served" in log  # debug level really was on
        leaked = [s for s in secrets if s and s in log]
        assert leaked == []


@pytest.fixture(autouse=True)
def _no_stray_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests pass --socket explicitly; a developer's MAILOAUTHD_SOCKET must not interfere."""
    monkeypatch.delenv("MAILOAUTHD_SOCKET", raising=False)
