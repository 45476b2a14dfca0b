"""
mailoauthd as a systemd service: the units in systemd/ checked by systemd's own tools, socket
activation with a real inherited socket, sd_notify on a real datagram socket, journald output,
and `mailoauth status --check` for monitoring.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import pytest
import structlog
import trio
import trio.testing
from conftest import (
    MAILOAUTH,
    MAILOAUTHD,
    USER,
    DaemonProcess,
    config_text,
    helper,
    mock_now,
    quiet,
)

from mailoauthd import config, daemon, logs, paths
from mailoauthd.errors import MailoauthdError
from mailoauthd.secret import Secret
from mailoauthd.serve import server
from mailoauthd.storage import state
from mailoauthd.storage.state import TokenStore
from mailoauthd.testing import DevProvider

ROOT = Path(__file__).resolve().parents[1]
UNITS = ROOT / "systemd"
# The install path the units document; the tests point copies at the venv's program.
INSTALLED = "/opt/mailoauthd/bin/mailoauthd"
USER_INSTALLED = "%h/.local/bin/mailoauthd"
# What `systemd-analyze security` must rate the system service at most: "OK".
MAX_EXPOSURE = 2.0
Start = Callable[..., DaemonProcess]

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze (systemd) is not installed"
)


def unit_settings(path: Path) -> dict[str, list[str]]:
    """Every `Key=value` of a unit file, in order, comments left out."""
    found: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def runnable_copy(unit: Path, directory: Path, *, drop_in: Path | None = None) -> Path:
    """
    A copy of `unit` in `directory` whose ExecStart= names the venv's mailoauthd.

    `systemd-analyze verify` insists that the program exists; the units name the documented
    install path (/opt/mailoauthd, or ~/.local/bin for pipx), which a test machine lacks.
    A drop-in's lines are appended, which is how systemd merges one into the unit.
    """
    text = unit.read_text().replace(INSTALLED, str(MAILOAUTHD))
    text = text.replace(USER_INSTALLED, str(MAILOAUTHD))
    if drop_in is not None:
        text += "\n" + drop_in.read_text()
    copy = directory / unit.name
    copy.write_text(text)
    return copy


def verify(*units: Path, user: bool, runtime: Path) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify`, as a user manager would load the units when `user`."""
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    mode = ["--user"] if user else []
    return subprocess.run(
        ["systemd-analyze", "verify", *mode, "--man=no", *map(str, units)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def exposure(unit: Path) -> float:
    """The overall exposure `systemd-analyze security --offline=yes` gives a unit file."""
    run = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", run.stdout)
    assert match, run.stdout + run.stderr
    return float(match.group(1))


@needs_analyze
class TestUnits:
    @pytest.mark.parametrize(
        ("units", "user", "drop_in"),
        [
            (("mailoauthd.service", "mailoauthd.socket"), False, None),
            (("mailoauthd.service",), False, "examples/credentials.conf"),
            (("user/mailoauthd.service", "user/mailoauthd.socket"), True, None),
        ],
        ids=["system", "system-with-credentials", "user"],
    )
    def test_units_verify_without_a_warning(
        self, tmp_path: Path, units: tuple[str, ...], user: bool, drop_in: str | None
    ) -> None:
        """`systemd-analyze verify` accepts every unit and drop-in, and prints not one warning."""
        runtime = tmp_path / "runtime"
        runtime.mkdir(mode=0o700)
        copies = [
            runnable_copy(UNITS / name, tmp_path, drop_in=UNITS / drop_in if drop_in else None)
            for name in units
        ]
        run = verify(*copies, user=user, runtime=runtime)
        # verify exits 0 even for unknown keys and bad values, which it only warns about.
        assert (run.returncode, run.stdout, run.stderr) == (0, "", "")

    def test_verify_catches_a_mistake(self, tmp_path: Path) -> None:
        """The check above can fail: a misspelt key is reported."""
        copy = runnable_copy(UNITS / "mailoauthd.service", tmp_path)
        copy.write_text(copy.read_text().replace("NoNewPrivileges=", "NoNewPrivilege="))
        run = verify(copy, user=False, runtime=tmp_path)
        assert "Unknown key 'NoNewPrivilege'" in run.stderr

    def test_system_service_exposure_is_ok(self, tmp_path: Path) -> None:
        """`systemd-analyze security --offline=yes` rates the system service 2.0 ("OK") or less."""
        assert exposure(runnable_copy(UNITS / "mailoauthd.service", tmp_path)) <= MAX_EXPOSURE

    def test_exposure_check_can_fail(self, tmp_path: Path) -> None:
        """Without its hardening the same service rates far above 2.0: the score is real."""
        bare = tmp_path / "mailoauthd.service"
        bare.write_text(f"[Service]\nType=notify\nExecStart={MAILOAUTHD}\n")
        assert exposure(bare) > 5.0

    def test_system_units_match_the_contract(self) -> None:
        """The system units use the documented paths, systemd's notify/watchdog/reload protocol."""
        service = unit_settings(UNITS / "mailoauthd.service")
        socket_unit = unit_settings(UNITS / "mailoauthd.socket")
        assert service["ExecStart"] == [f"{INSTALLED} --system --config {paths.SYSTEM_CONFIG}"]
        assert service["Type"] == ["notify"]
        assert service["NotifyAccess"] == ["main"]
        assert service["Restart"] == ["on-failure"]
        assert service["WatchdogSec"]
        assert "kill -HUP $MAINPID" in service["ExecReload"][0]
        assert service["StateDirectory"] == [Path(paths.SYSTEM_STATE_DIR).name]
        assert service["RuntimeDirectory"] == [Path(paths.SYSTEM_SOCKET).parent.name]
        assert service["ConfigurationDirectory"] == [Path(paths.SYSTEM_CONFIG).parent.name]
        assert socket_unit["ListenStream"] == [paths.SYSTEM_SOCKET]
        # The socket file must outlive a service restart while the .socket unit holds it.
        assert service["RuntimeDirectoryPreserve"] == ["yes"]
        # In a user namespace every other uid reads as "nobody": no allow list would work.
        assert "PrivateUsers" not in service
        assert service["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]

    def test_user_units_match_the_contract(self, tmp_path: Path) -> None:
        """The per-user socket is where `mailoauth` looks first ($XDG_RUNTIME_DIR/mailoauthd)."""
        service = unit_settings(UNITS / "user" / "mailoauthd.service")
        socket_unit = unit_settings(UNITS / "user" / "mailoauthd.socket")
        runtime = str(tmp_path)
        expected = paths.user_socket({"XDG_RUNTIME_DIR": runtime}, os.getuid())
        assert socket_unit["ListenStream"][0].replace("%t", runtime) == expected
        assert socket_unit["SocketMode"] == ["0600"]
        assert service["ExecStart"] == [USER_INSTALLED]
        assert service["Type"] == ["notify"]


# Runs a program the way MemoryDenyWriteExecute=yes does (prctl PR_SET_MDWE, Linux 6.3+,
# kept across execve): no memory may become both writable and executable.
MDWE = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    sys.exit(97)
os.execv(sys.argv[1], sys.argv[1:])
"""
PROBE = """
import mmap
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except PermissionError:
    print("refused")
"""


@pytest.mark.slow
class TestSandbox:
    def test_daemon_works_without_writable_executable_memory(
        self, tmp_path: Path, provider: DevProvider
    ) -> None:
        """Under the kernel's equivalent of MemoryDenyWriteExecute=yes the daemon serves tokens."""
        probe = subprocess.run(
            [sys.executable, "-c", MDWE, sys.executable, "-c", PROBE],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if probe.returncode == 97:
            pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+)")
        assert probe.stdout.strip() == "refused"  # the restriction is really on
        config_path = tmp_path / "config.toml"
        config_path.write_text(config_text(tmp_path, provider))
        socket_path = tmp_path / "run" / "socket"
        with (tmp_path / "daemon.log").open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-c", MDWE, str(MAILOAUTHD), "--config", str(config_path)],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
            try:
                deadline = time.monotonic() + 15
                while helper("status", socket=socket_path).returncode:
                    assert proc.poll() is None, (tmp_path / "daemon.log").read_text()
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
                refresh_token = provider.issue_refresh_token(USER) + "\n"
                run = helper("import", "work", socket=socket_path, stdin=refresh_token)
                assert run.returncode == 0, run.stderr
                token = helper("token", "work", socket=socket_path)
                assert token.returncode == 0, token.stderr
                assert provider.introspect(token.stdout.strip())["active"] is True
            finally:
                proc.terminate()
                assert proc.wait(timeout=20) == 0


# --- socket activation and sd_notify ------------------------------------------------------


class NotifySocket:
    """A real NOTIFY_SOCKET: a datagram socket that collects what the daemon says."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def wait_for(self, text: str, seconds: float = 15.0) -> str:
        """The first message not yet taken that contains `text`; fails after `seconds`."""
        deadline = time.monotonic() + seconds
        while True:
            for index, message in enumerate(self.messages):
                if text in message:
                    del self.messages[: index + 1]
                    return message
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {text!r} from the daemon; got {self.messages}"
            self.sock.settimeout(remaining)
            self.messages.append(self.sock.recv(4096).decode())

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    """A NOTIFY_SOCKET to hand the daemon."""
    listener = NotifySocket(tmp_path / "notify")
    yield listener
    listener.close()


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate is missing"
)
class TestSocketActivation:
    def test_inherited_socket_is_served_and_systemd_told_everything(
        self, tmp_path: Path, provider: DevProvider, notify_socket: NotifySocket
    ) -> None:
        """
        Under systemd-socket-activate the daemon serves the inherited socket and sends
        READY=1, STATUS=, WATCHDOG=1, RELOADING=1 and STOPPING=1 to NOTIFY_SOCKET.
        """
        config_path = tmp_path / "config.toml"
        config_path.write_text(config_text(tmp_path, provider))
        own_socket = tmp_path / "run" / "socket"  # the config's: must stay unused
        activated = tmp_path / "activated.socket"
        log = (tmp_path / "daemon.log").open("wb")
        proc = subprocess.Popen(
            [
                "systemd-socket-activate",
                "--listen",
                str(activated),
                "-E",
                f"NOTIFY_SOCKET={notify_socket.path}",
                "-E",
                "WATCHDOG_USEC=200000",  # WATCHDOG=1 every 0.1 s
                str(MAILOAUTHD),
                "--config",
                str(config_path),
            ],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 15
            while not activated.exists():
                assert proc.poll() is None
                assert time.monotonic() < deadline
                time.sleep(0.01)
            # The first client starts the daemon and waits in the backlog meanwhile.
            imported = helper(
                "import",
                "work",
                socket=activated,
                stdin=provider.issue_refresh_token(USER) + "\n",
            )
            assert imported.returncode == 0, imported.stderr
            ready = notify_socket.wait_for("READY=1")
            assert "STATUS=1 accounts: 1 needs_authorization" in ready
            token = helper("token", "work", socket=activated)
            assert token.returncode == 0, token.stderr
            assert provider.introspect(token.stdout.strip())["active"] is True
            notify_socket.wait_for("WATCHDOG=1")
            notify_socket.wait_for("WATCHDOG=1")
            pid = json.loads(
                subprocess.run(
                    [str(MAILOAUTH), "--socket", str(activated), "status", "--json"],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
            )["accounts"][0]
            assert pid["status"] == "ok"
            proc.send_signal(signal.SIGHUP)  # systemd-socket-activate became the daemon
            notify_socket.wait_for("RELOADING=1")
            reloaded = notify_socket.wait_for("READY=1")
            assert re.search(r"STATUS=1 accounts: 1 ok; next expiry work in 5\dm", reloaded)
            proc.send_signal(signal.SIGTERM)
            notify_socket.wait_for("STOPPING=1")
            assert proc.wait(timeout=20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
        text = (tmp_path / "daemon.log").read_text()
        ready_event = next(
            json.loads(line) for line in text.splitlines() if '"daemon.ready"' in line
        )
        assert ready_event["socket_activated"] is True
        assert ready_event["socket"] == str(activated)
        assert not own_socket.exists()
        # The socket belongs to whoever passed it: the daemon leaves it in place.
        assert activated.exists()


class TestInheritedSocket:
    def test_listen_fds_only_for_our_pid(self) -> None:
        """LISTEN_FDS counts from fd 3, and only when LISTEN_PID is ours (sd_listen_fds)."""
        assert server.listen_fds({"LISTEN_PID": "42", "LISTEN_FDS": "2"}, 42) == [3, 4]
        assert server.listen_fds({"LISTEN_PID": "41", "LISTEN_FDS": "1"}, 42) == []
        assert server.listen_fds({"LISTEN_FDS": "1"}, 42) == []
        assert server.listen_fds({"LISTEN_PID": "42", "LISTEN_FDS": "x"}, 42) == []

    def test_a_listening_unix_socket_is_taken_over(self, tmp_path: Path) -> None:
        """A listening Unix stream socket is taken: non-blocking, not inherited by children."""
        original = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        original.bind(str(tmp_path / "s"))
        original.listen()
        fd = os.dup(original.fileno())
        os.set_inheritable(fd, True)
        original.close()
        taken = server.inherited(fd)
        try:
            assert taken.getsockname() == str(tmp_path / "s")
            assert taken.getblocking() is False
            assert taken.get_inheritable() is False
        finally:
            taken.close()

    @pytest.mark.parametrize("kind", ["pipe", "datagram", "unlistened"])
    def test_anything_else_is_refused_with_a_hint(self, kind: str) -> None:
        """A pipe, a datagram socket or a socket not listening is refused, naming the fd."""
        keep: list[socket.socket] = []
        if kind == "pipe":
            fd, other = os.pipe()
            os.close(other)
        else:
            sock = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM if kind == "datagram" else socket.SOCK_STREAM
            )
            keep.append(sock)
            fd = sock.fileno()
        try:
            with pytest.raises(MailoauthdError, match=f"fd {fd}"):
                server.inherited(fd)
            os.fstat(fd)  # still open: not ours to close
        finally:
            for sock in keep:
                sock.close()
            if kind == "pipe":
                os.close(fd)


@pytest.mark.slow
class TestStatusLine:
    async def test_status_follows_state_changes_and_watchdog_ticks(
        self,
        clock: trio.testing.MockClock,
        tmp_path: Path,
        provider: DevProvider,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """STATUS= counts accounts by state with the nearest expiry and follows a change within
        STATUS_INTERVAL; WATCHDOG=1 comes every WATCHDOG_USEC/2."""
        notify = NotifySocket(tmp_path / "notify")
        notify.sock.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", str(notify.path))  # sdnotify reads os.environ
        env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "60000000"}
        path = tmp_path / "config.toml"
        path.write_text(config_text(tmp_path, provider, accounts=("work", "home")))
        cfg = config.load(path)

        def drain() -> list[str]:
            got = []
            with contextlib.suppress(BlockingIOError):
                while True:
                    got.append(notify.sock.recv(4096).decode())
            return got

        def statuses(messages: list[str]) -> list[str]:
            return [m for m in messages if m.startswith("STATUS=")]

        try:
            async with trio.open_nursery() as nursery:
                run = partial(
                    daemon.run,
                    cfg,
                    config_path=None,
                    env=env,
                    system=False,
                    handle_signals=False,
                    now=mock_now(clock),
                )
                d: daemon.Daemon = await nursery.start(run)
                # Every task blocked: what the daemon sends to NOTIFY_SOCKET (at once, not
                # in a thread) is there to read.
                await quiet(d.scheduler)
                first = drain()
                assert "READY=1\nSTATUS=2 accounts: 2 needs_authorization" in first
                assert first.count("WATCHDOG=1") == 1
                await d.scheduler.import_token("work", Secret(provider.issue_refresh_token(USER)))
                clock.jump(daemon.STATUS_INTERVAL)
                await quiet(d.scheduler)
                assert statuses(drain()) == [
                    "STATUS=2 accounts: 1 needs_authorization, 1 ok; next expiry work in 59m"
                ]
                clock.jump(daemon.STATUS_INTERVAL)
                await quiet(d.scheduler)
                assert statuses(drain()) == []  # nothing changed, nothing sent
                later: list[str] = []
                for _ in range(11):  # on to 65 s, in the steps a running clock would take
                    clock.jump(daemon.STATUS_INTERVAL)
                    await quiet(d.scheduler)
                    later += drain()
                # WATCHDOG=1 at 30 s and 60 s (half of WATCHDOG_USEC); the expiry minute
                # changed at 61 s and STATUS= followed at the next tick.
                assert later == [
                    "WATCHDOG=1",
                    "WATCHDOG=1",
                    "STATUS=2 accounts: 1 needs_authorization, 1 ok; next expiry work in 58m",
                ]
                nursery.cancel_scope.cancel()
        finally:
            notify.close()


# --- journald -------------------------------------------------------------------------------


def journal_fields(datagram: bytes) -> dict[str, str]:
    """Parse one native journal entry (KEY=value lines, or KEY, length and raw value)."""
    fields: dict[str, str] = {}
    rest = datagram
    while rest:
        line, newline, after = rest.partition(b"\n")
        assert newline, rest
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields[key.decode()] = value.decode()
            rest = after
        else:
            (size,) = struct.unpack("<Q", after[:8])
            fields[line.decode()] = after[8 : 8 + size].decode()
            assert after[8 + size : 9 + size] == b"\n"
            rest = after[9 + size :]
    return fields


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put structlog back as it was, and close a journal socket a test opened."""
    yield
    logger = structlog.get_config()["logger_factory"]()
    if isinstance(logger, logs.JournalLogger):
        logger.close()
    structlog.reset_defaults()


@pytest.mark.usefixtures("restore_logging")
class TestJournal:
    def test_native_entries_carry_the_event_as_fields(self, tmp_path: Path) -> None:
        """Each event is one native entry: MESSAGE, PRIORITY, EVENT and a field per key."""
        journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        journal.bind(str(tmp_path / "journal"))
        journal.settimeout(5)
        stream = io.StringIO()
        with journal:
            logs.configure(level="debug", stream=stream, journal=str(tmp_path / "journal"))
            log = structlog.get_logger("test")
            log.info(
                "token.refreshed",
                account="work",
                expires_in=3599,
                refresh_token="not-for-the-journal",
                note="two\nlines",
                message="an event key named like a journal field",
            )
            log.warning("token.refresh_failed", account="work")
            log.debug("token.served", uid=1000, pid=42, exe="/usr/bin/mbsync")
            entries = [journal.recv(65536) for _ in range(3)]
        assert stream.getvalue() == ""
        assert b"not-for-the-journal" not in entries[0]
        first = journal_fields(entries[0])
        assert first["MESSAGE"].startswith("token.refreshed account=work expires_in=3599")
        assert first["PRIORITY"] == "6"
        assert first["SYSLOG_IDENTIFIER"] == "mailoauthd"
        assert first["EVENT"] == "token.refreshed"
        assert first["ACCOUNT"] == "work"
        assert first["EXPIRES_IN"] == "3599"
        assert first["REFRESH_TOKEN"] == "***"
        assert first["NOTE"] == "two\nlines"
        assert first["MAILOAUTHD_MESSAGE"] == "an event key named like a journal field"
        assert journal_fields(entries[1])["PRIORITY"] == "4"
        served = journal_fields(entries[2])
        assert (served["PRIORITY"], served["UID"], served["EXE"]) == (
            "7",
            "1000",
            "/usr/bin/mbsync",
        )

    def test_without_journald_lines_go_to_stderr_with_a_priority(self, tmp_path: Path) -> None:
        """No journal socket: each event is a '<N>' JSON line on stderr, which journald parses."""
        stream = io.StringIO()
        logs.configure(level="info", stream=stream, journal=str(tmp_path / "no-journald"))
        structlog.get_logger("test").error("state.write_failed", account="work", secret="s3")
        line = stream.getvalue()
        assert line.startswith("<3>{")
        event = json.loads(line[3:])
        assert (event["event"], event["account"], event["secret"]) == (
            "state.write_failed",
            "work",
            "***",
        )

    def test_journal_stream_must_be_our_stderr(self, tmp_path: Path) -> None:
        """JOURNAL_STREAM counts only when it names the very file stderr is (dev:ino)."""
        with (tmp_path / "stream").open("w") as stream:
            info = os.fstat(stream.fileno())
            mine = f"{info.st_dev}:{info.st_ino}"
            assert logs.stderr_is_journal({"JOURNAL_STREAM": mine}, stream.fileno())
            other = f"{info.st_dev}:{info.st_ino + 1}"
            assert not logs.stderr_is_journal({"JOURNAL_STREAM": other}, stream.fileno())
            assert not logs.stderr_is_journal({}, stream.fileno())
            assert not logs.stderr_is_journal({"JOURNAL_STREAM": "x:y"}, stream.fileno())

    @pytest.mark.slow
    @pytest.mark.skipif(
        os.path.exists(logs.JOURNAL_SOCKET), reason="journald is running: entries go there"
    )
    def test_the_daemon_under_systemd_logs_for_the_journal(
        self, tmp_path: Path, provider: DevProvider
    ) -> None:
        """With JOURNAL_STREAM naming its stderr, the real daemon logs for journald."""
        config_path = tmp_path / "config.toml"
        config_path.write_text(
            config_text(tmp_path, provider).replace('log_format = "json"', 'log_format = "auto"')
        )
        with (tmp_path / "stderr").open("wb") as stderr:
            info = os.fstat(stderr.fileno())
            env = {**os.environ, "JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}
            env.pop("NOTIFY_SOCKET", None)
            proc = subprocess.Popen(
                [str(MAILOAUTHD), "--config", str(config_path)],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env=env,
            )
            try:
                deadline = time.monotonic() + 15
                while helper("status", socket=tmp_path / "run" / "socket").returncode:
                    assert proc.poll() is None
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
            finally:
                proc.terminate()
                assert proc.wait(timeout=20) == 0
        lines = (tmp_path / "stderr").read_text().splitlines()
        ready = next(line for line in lines if '"daemon.ready"' in line)
        assert ready.startswith("<6>{")
        assert json.loads(ready[3:])["mode"] in ("system", "per-user")


# --- mailoauth status --check ----------------------------------------------------------------

HEALTH_ACCOUNTS = """
[providers.down]
client_id = "demo-client"
token_endpoint = "http://127.0.0.1:1/token"

[accounts.failing-recent]
provider = "down"
username = "b@example.com"

[accounts.failing-old]
provider = "down"
username = "c@example.com"

[accounts.failing-new]
provider = "down"
username = "d@example.com"
"""


def seed_state(directory: Path, now: datetime) -> None:
    """State files as a daemon would have left them: failing briefly and for long, misconfigured,
    and one that cannot be read."""
    failing = state.AccountState(
        account="failing-recent",
        status=state.FAILING,
        refresh_token=Secret("refresh-1"),
        # The last access token still bridges the outage.
        access_token=Secret("access-1"),
        expires_at=now + timedelta(minutes=40),
        last_attempt=now - timedelta(minutes=1),
        last_error="token endpoint unreachable",
        last_error_code="provider-unavailable",
        error_since=now - timedelta(minutes=1),
        failures=1,
    )
    store = TokenStore(directory)
    store.open()
    try:
        store.save(failing)
        store.save(
            dataclasses.replace(
                failing, account="failing-old", error_since=now - timedelta(hours=2)
            )
        )
        # Imported, and the first refresh failed: no access token to bridge anything.
        store.save(
            dataclasses.replace(failing, account="failing-new", access_token=None, expires_at=None)
        )
        store.save(
            dataclasses.replace(
                failing,
                account="misconf",
                status=state.MISCONFIGURED,
                last_error="the provider does not know this client (invalid_client)",
                last_error_code="misconfigured",
            )
        )
    finally:
        store.close()
    (directory / "broken.toml").write_text("this is not TOML = = =\n")


@pytest.mark.slow
class TestHealthCheck:
    @pytest.fixture
    def running(self, tmp_path: Path, provider: DevProvider, start_daemon: Start) -> Path:
        """A daemon with one account in each state; returns its socket."""
        config_path = tmp_path / "config.toml"
        config_path.write_text(
            config_text(
                tmp_path,
                provider,
                accounts=("ok", "fresh", "misconf", "broken"),
                daemon_keys='unhealthy_after = "30m"',
            )
            + HEALTH_ACCOUNTS
        )
        (tmp_path / "state").mkdir(mode=0o700)
        seed_state(tmp_path / "state", datetime.now(UTC))
        d = start_daemon(config_path)
        imported = helper(
            "import", "ok", socket=d.socket, stdin=provider.issue_refresh_token(USER) + "\n"
        )
        assert imported.returncode == 0, imported.stderr
        return d.socket

    @pytest.mark.parametrize(
        ("account", "exit_status", "shown"),
        [
            ("ok", 0, "OK: 1 account healthy"),
            ("failing-recent", 0, "OK: 1 account healthy"),
            ("failing-new", 5, "failing-new: failing since "),
            ("fresh", 4, "fresh: needs_authorization; run 'mailoauth authorize fresh'"),
            ("failing-old", 5, "failing-old: failing since "),
            ("misconf", 1, "misconf: misconfigured"),
            ("broken", 1, "broken: state_error"),
        ],
    )
    def test_each_state(self, running: Path, account: str, exit_status: int, shown: str) -> None:
        """`status ACCOUNT --check` exits 0 when healthy, else with the code for its state."""
        run = helper("status", account, "--check", socket=running)
        assert run.returncode == exit_status, run.stdout + run.stderr
        assert shown in run.stdout
        if exit_status:
            assert run.stdout.startswith(f"UNHEALTHY: 1 of 1 account: {account} ")

    def test_all_accounts_most_urgent_first(self, running: Path) -> None:
        """Over every account the most urgent problem decides: a broken config or state is 1."""
        run = helper("status", "--check", socket=running)
        assert run.returncode == 1
        first, *rest = run.stdout.splitlines()
        assert first.startswith("UNHEALTHY: 5 of 7 accounts: ")
        assert sorted(line.split(":")[0] for line in rest) == [
            "broken",
            "failing-new",
            "failing-old",
            "fresh",
            "misconf",
        ]

    def test_json(self, running: Path) -> None:
        """`--check --json` prints every row with its `healthy` flag and keeps the exit status."""
        run = helper("status", "--check", "--json", socket=running)
        assert run.returncode == 1
        report = json.loads(run.stdout)
        assert report["healthy"] is False
        health = {row["account"]: row["healthy"] for row in report["accounts"]}
        assert health == {
            "ok": True,
            "fresh": False,
            "misconf": False,
            "broken": False,
            "failing-recent": True,
            "failing-old": False,
            "failing-new": False,
        }

    def test_unreachable_daemon(self, tmp_path: Path) -> None:
        """No daemon: exit 3, naming the socket tried."""
        run = helper("status", "--check", socket=tmp_path / "nothing-here")
        assert run.returncode == 3
        assert str(tmp_path / "nothing-here") in run.stderr
