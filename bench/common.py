"""
What every benchmark needs: the programs under test, a daemon with its provider, /proc readings.

Everything here runs the real programs of one installation (`Install`): the
bench runs them from a non-editable install in bench/.venv (see setup.sh), as
users get them, and the smoke test from the development venv.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from mailoauthd.secret import Secret
from mailoauthd.storage import state
from mailoauthd.testing import DevProvider

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
USER_DOMAIN = "example.com"


@dataclass(frozen=True)
class Install:
    """One installation of mailoauthd: its interpreter and its two programs."""

    bin: Path

    @property
    def python(self) -> Path:
        return self.bin / "python"

    @property
    def mailoauth(self) -> Path:
        return self.bin / "mailoauth"

    @property
    def mailoauthd(self) -> Path:
        return self.bin / "mailoauthd"

    @property
    def editable(self) -> bool:
        """Whether this is an editable (development) install, whose start-up costs more."""
        site = Path(
            subprocess.run(
                [
                    str(self.python),
                    "-I",
                    "-c",
                    "import sysconfig; print(sysconfig.get_path('purelib'))",
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )
        return any(site.glob("__editable__*mailoauthd*"))


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], fraction: float) -> float:
    """The value below which `fraction` of `values` lie (nearest rank)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


# --- /proc ---------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in bytes."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0]) * 1024
    return found


def io_counters(pid: int) -> dict[str, int]:
    """/proc/PID/io: bytes passed to write() (wchar), to storage (write_bytes), write calls."""
    counters = {}
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        key, _, value = line.partition(":")
        counters[key] = int(value)
    return counters


def machine_busy() -> float:
    """CPU seconds every process on the machine has used so far (/proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:9]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields)
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def own_cpu() -> float:
    """CPU seconds of this process and of its children that have been waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class OtherWork:
    """
    How much CPU other processes took while something was measured.

    Numbers from a shared machine are only as good as the machine was quiet:
    the report says how busy it was with work that is not the bench's.
    """

    def __init__(self, *running: int) -> None:
        self.running = running  # our processes not yet waited for, measured through /proc
        self.started = time.monotonic()
        self.busy = machine_busy()
        self.own = own_cpu() + sum(cpu_seconds(pid) for pid in running)

    def cores(self) -> float:
        """Average cores used by processes other than ours since creation."""
        elapsed = time.monotonic() - self.started
        own = own_cpu() + sum(cpu_seconds(pid) for pid in self.running)
        others = (machine_busy() - self.busy) - (own - self.own)
        return max(0.0, others / elapsed) if elapsed > 0 else 0.0


def self_cpu() -> float:
    """CPU time of this process (the bench and the provider threads it hosts)."""
    t = os.times()
    return t.user + t.system


# --- the machine ---------------------------------------------------------------------


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.partition(":")[2].strip()
            break
    mem = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1]) * 1024
    osname = platform.system()
    with _suppress():
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                osname = line.partition("=")[2].strip('"')
    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "memory": f"{mem / 2**30:.0f} GiB",
        "os": f"{osname}, Linux {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "filesystem": filesystem_of(Path(tempfile.gettempdir())),
        "load": load(),
    }


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def filesystem_of(path: Path) -> str:
    """The type of the file system `path` is on, from /proc/mounts."""
    best, kind = "", "unknown"
    resolved = str(path.resolve())
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        mount, fstype = parts[1], parts[2]
        if (resolved == mount or resolved.startswith(mount.rstrip("/") + "/")) and len(
            mount
        ) >= len(best):
            best, kind = mount, fstype
    return f"{kind} ({best or '/'})"


@contextmanager
def _suppress() -> Iterator[None]:
    try:
        yield
    except OSError:
        pass


# --- configuration and state ---------------------------------------------------------


def account_names(count: int) -> list[str]:
    width = max(5, len(str(count)))
    return [f"a{i:0{width}d}" for i in range(count)]


def write_config(
    base: Path,
    provider: DevProvider,
    names: Sequence[str],
    *,
    daemon_keys: str = "",
    account_keys: dict[str, str] | None = None,
) -> Path:
    """A config with one profile at the development provider and `names` as accounts."""
    secret = base / "client-secret"
    secret.write_text("demo-secret\n")
    secret.chmod(0o600)
    lines = [
        "[daemon]",
        f'state_dir = "{base / "state"}"',
        f'socket = "{base / "run" / "socket"}"',
        'log_format = "json"',
        daemon_keys,
        "",
        "[providers.dev]",
        'client_id = "demo-client"',
        f'client_secret_file = "{secret}"',
        f'token_endpoint = "{provider.endpoints["token_endpoint"]}"',
        "",
    ]
    extra = account_keys or {}
    for name in names:
        lines += [
            f"[accounts.{name}]",
            'provider = "dev"',
            f'username = "{name}@{USER_DOMAIN}"',
            extra.get(name, ""),
            "",
        ]
    path = base / "config.toml"
    path.write_text("\n".join(lines))
    return path


def seed_state(
    base: Path, provider: DevProvider, names: Sequence[str], *, expires_in: float
) -> None:
    """
    State files as a daemon leaves them: each account with a refresh token the
    provider honours and an access token expiring in `expires_in` seconds.

    Written without fsync: this is set-up, not what is measured.
    """
    directory = base / "state"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    now = datetime.now(UTC).replace(microsecond=0)
    for name in names:
        refresh_token = provider.issue_refresh_token(f"{name}@{USER_DOMAIN}")
        st = state.AccountState(
            account=name,
            status=state.OK,
            access_token=Secret("bench-stale-" + name),
            expires_at=now + timedelta(seconds=expires_in),
            refresh_token=Secret(refresh_token),
            refresh_token_issued_at=now,
            last_refresh=now,
            last_attempt=now,
        )
        path = directory / f"{name}.toml"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(state.to_toml(st))


# --- a running daemon ----------------------------------------------------------------


@dataclass
class Daemon:
    """`mailoauthd --config PATH` as a subprocess, with READY=1 timed over NOTIFY_SOCKET."""

    install: Install
    config: Path
    socket_path: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    ready_seconds: float = float("nan")
    notify: socket.socket | None = None
    events_read: int = 0
    _log_offset: int = 0
    _partial: bytes = b""
    env: dict[str, str] = field(default_factory=dict)
    # What to run instead of the installed `mailoauthd` (it gets `--config PATH`).
    program: list[str] | None = None

    def start(self, *, timeout: float = 120.0) -> None:
        notify_path = self.config.parent / "notify"
        with _suppress():
            notify_path.unlink()
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(notify_path))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "WATCHDOG_"))}
        env["NOTIFY_SOCKET"] = str(notify_path)
        env.update(self.env)
        log = self.log_path.open("ab")
        started = time.perf_counter()
        self.proc = subprocess.Popen(
            [*(self.program or [str(self.install.mailoauthd)]), "--config", str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
        )
        log.close()
        deadline = started + timeout
        while True:
            remaining = deadline - time.perf_counter()
            if remaining <= 0 or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"mailoauthd did not become ready:\n{self.log_tail()}")
            self.notify.settimeout(min(remaining, 0.5))
            try:
                message = self.notify.recv(4096)
            except TimeoutError:
                continue
            if b"READY=1" in message.split(b"\n"):
                self.ready_seconds = time.perf_counter() - started
                return

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.notify is not None:
            self.notify.close()
            self.notify = None

    def new_events(self) -> list[dict[str, object]]:
        """JSON log events written since the last call."""
        with self.log_path.open("rb") as f:
            f.seek(self._log_offset)
            data = self._partial + f.read()
        self._log_offset += len(data) - len(self._partial)
        lines = data.split(b"\n")
        self._partial = lines.pop()
        events = []
        for line in lines:
            if line.startswith(b"{"):
                with _suppress_value():
                    events.append(json.loads(line))
        self.events_read += len(events)
        return events

    def log_tail(self, lines: int = 20) -> str:
        with _suppress():
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def request(self, message: dict[str, object], timeout: float = 30.0) -> dict[str, object]:
        """One request over the socket, as the helper sends it."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.socket_path))
            sock.sendall(json.dumps(message).encode() + b"\n")
            chunks = []
            while chunk := sock.recv(1 << 20):
                chunks.append(chunk)
        reply: dict[str, object] = json.loads(b"".join(chunks))
        return reply


@contextmanager
def _suppress_value() -> Iterator[None]:
    try:
        yield
    except ValueError:
        pass


@contextmanager
def running(daemon: Daemon) -> Iterator[Daemon]:
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


def timestamp(event: dict[str, object]) -> float:
    """An event's time as seconds since the epoch."""
    text = str(event["timestamp"]).replace("Z", "+00:00")
    return datetime.fromisoformat(text).timestamp()


def which(name: str) -> str | None:
    return shutil.which(name)


def program_version(argv: Sequence[str], pattern: str = r"[\d.]+") -> str:
    """The first version-looking word a program prints, or '?'."""
    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    found = re.search(pattern, out.stdout + out.stderr)
    return found.group(0) if found else "?"


def installed_versions(install: Install) -> dict[str, str]:
    """Versions of mailoauthd and what it runs on, in the install under test."""
    code = (
        "import json, importlib.metadata as m; "
        "print(json.dumps({n: m.version(n) for n in "
        "('mailoauthd', 'trio', 'httpx', 'structlog')}))"
    )
    out = subprocess.run(
        [str(install.python), "-I", "-c", code], capture_output=True, text=True, check=False
    )
    try:
        versions: dict[str, str] = json.loads(out.stdout)
    except ValueError:
        versions = {}
    return versions


def log(message: str) -> None:
    """Progress on stderr: the bench takes minutes, and says what it is doing."""
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()
