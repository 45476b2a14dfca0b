"""
What the reliability suite shares: sizes, the figures it reports, the secret ledger,
the daemon as a real subprocess, and a raw client of the socket protocol.

`make test` runs every check at a size that fits in a few minutes; `make soak`
(MAILOAUTHD_SOAK=1) runs the same code at the sizes of issue #6, and writes
docs/reliability.md from what it counted (MAILOAUTHD_RELIABILITY_REPORT).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

from conftest import MAILOAUTHD, USER, config_text

from mailoauthd.secret import Secret
from mailoauthd.storage import state
from mailoauthd.testing import DevProvider

SOAK = os.environ.get("MAILOAUTHD_SOAK") == "1"


def size(test: int, soak: int) -> int:
    """The count for this run: `test` under `make test`, `soak` under `make soak`."""
    return soak if SOAK else test


@dataclass
class Figures:
    """Counts the tests record as they go; the report is rendered from these alone."""

    counts: dict[str, dict[str, float]] = field(default_factory=lambda: defaultdict(dict))
    passed: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, section: str, key: str, value: float = 1) -> None:
        """Add `value` to a count."""
        with self._lock:
            row = self.counts[section]
            row[key] = row.get(key, 0) + value

    def peak(self, section: str, key: str, value: float) -> None:
        """Keep the largest value seen."""
        with self._lock:
            row = self.counts[section]
            row[key] = max(row.get(key, value), value)

    def held(self, section: str, claim: str) -> None:
        """Record a claim that a test checked and that held."""
        if claim not in self.passed[section]:
            self.passed[section].append(claim)


# Secrets are URL-safe base64 (tokens, codes, verifiers) and leak inside such runs.
WINDOW = 12  # 64**12 possible values: a match is a leak, never chance
_RUN = re.compile(r"[A-Za-z0-9_.~+/=-]{12,}")


@dataclass
class Ledger:
    """Every text the run produced, checked for every secret the run handed out."""

    figures: Figures

    def scan(self, secrets_: Iterable[str], texts: Iterable[tuple[str, str]]) -> None:
        """
        Assert that no 12-character piece of any secret appears in any text.

        Args:
            secrets_: the secrets (tokens, codes, verifiers, client secrets).
            texts: (where it came from, the text).
        """
        grams: set[str] = set()
        distinct = set(secrets_)
        for value in distinct:
            grams.update(value[i : i + WINDOW] for i in range(len(value) - WINDOW + 1))
        leaks: list[str] = []
        count = lines = scanned = 0
        for where, text in texts:
            count += 1
            lines += text.count("\n") + 1
            scanned += len(text)
            for run in _RUN.finditer(text):
                word = run.group()
                for i in range(len(word) - WINDOW + 1):
                    if word[i : i + WINDOW] in grams:
                        leaks.append(f"{where}: {word[i : i + 4]}… (a piece of a secret)")
                        break
        self.figures.add("secrets", "texts scanned", count)
        self.figures.add("secrets", "lines scanned", lines)
        self.figures.add("secrets", "bytes scanned", scanned)
        self.figures.add("secrets", "secrets looked for", len(distinct))
        assert not leaks, "secrets leaked:\n" + "\n".join(leaks[:20])


def write_config(
    tmp: Path,
    provider: DevProvider,
    client_secret: str,
    **keys: str | tuple[str, ...],
) -> Path:
    """A config for `provider` (tests/conftest.py's), with this client secret."""
    text = config_text(tmp, provider, **keys)  # type: ignore[arg-type]
    (tmp / "client-secret").write_text(client_secret + "\n")
    (tmp / "client-secret").chmod(0o600)
    path = tmp / "config.toml"
    path.write_text(text)
    return path


def new_provider(**options: object) -> tuple[DevProvider, str]:
    """A started provider whose one confidential client has a fresh random secret."""
    client_secret = "cs-" + secrets.token_urlsafe(24)
    provider = DevProvider(clients={"demo-client": client_secret}, **options)  # type: ignore[arg-type]
    provider.start()
    return provider, client_secret


def seed(state_dir: Path, account: str, refresh_token: str) -> None:
    """Leave a state file as `mailoauth import` would."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    store = state.TokenStore(state_dir)
    store.open()
    store.save(state.imported(account, Secret(refresh_token), datetime.now(UTC)))
    store.close()


def seed_accounts(tmp: Path, provider: DevProvider, names: Iterable[str]) -> dict[str, str]:
    """Give each account its own user's grant; returns the refresh tokens."""
    tokens = {}
    for name in names:
        tokens[name] = provider.issue_refresh_token(f"{name}-{USER}")
        seed(tmp / "state", name, tokens[name])
    return tokens


def ask(path: Path, request: dict[str, object], timeout: float = 20.0) -> dict[str, object]:
    """One request over the socket, as any client may send it; the answer parsed."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(json.dumps(request).encode() + b"\n")
        return json.loads(receive_all(sock))  # type: ignore[no-any-return]


def receive_all(sock: socket.socket) -> bytes:
    """Everything until the daemon closes."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def token_request(account: str, *, min_validity: float = 1.0, timeout: float = 10.0) -> bytes:
    """The helper's token request line."""
    body = {"v": 1, "op": "token", "account": account}
    return json.dumps({**body, "min_validity": min_validity, "timeout": timeout}).encode() + b"\n"


def memory_and_fds(pid: int) -> tuple[int, int]:
    """The process's resident memory in KiB (VmRSS) and its number of open descriptors."""
    rss = 0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def cmdline(pid: int) -> str:
    """A process's title and arguments as `ps` shows them; empty once it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Daemon:
    """
    The real `mailoauthd` as a subprocess, started with umask 000 (so that every mode
    it sets must be deliberate) and its stderr read through a pipe (so that a file
    size limit on it hits the state files, not its log).
    """

    running: ClassVar[list[Daemon]] = []  # killed after each test, whatever happened

    def __init__(self, config_path: Path, socket_path: Path, log_path: Path) -> None:
        self.socket = socket_path
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        self.proc = subprocess.Popen(
            [str(MAILOAUTHD), "--config", str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            umask=0,
        )
        self.pid = self.proc.pid
        Daemon.running.append(self)
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        with self.log_path.open("ab") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()

    def wait_ready(self, seconds: float = 15.0) -> None:
        """Until the daemon answers a ping."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._reader.join(5)
                raise AssertionError(f"mailoauthd exited {self.proc.returncode}: {self.log()}")
            try:
                if ask(self.socket, {"v": 1, "op": "ping"}, timeout=2).get("ok"):
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.005)
        raise AssertionError(f"mailoauthd not ready: {self.log()}")

    def kill(self) -> None:
        """SIGKILL, and reap."""
        self.stop(signal.SIGKILL)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send `sig` (SIGTERM: a clean stop) and wait for the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=30)
        self._reader.join(10)
        if self.proc.stdout is not None and not self.proc.stdout.closed:
            self.proc.stdout.close()
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self, name: str | None = None) -> list[dict[str, object]]:
        """The JSON log lines, or those of one event."""
        found = []
        for line in self.log().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a line cut short by SIGKILL, or not ours
            if isinstance(event, dict) and (name is None or event.get("event") == name):
                found.append(event)
        return found

    def status(self) -> dict[str, dict[str, object]]:
        """`status`, one row per account."""
        answer = ask(self.socket, {"v": 1, "op": "status"})
        assert answer["ok"], answer
        rows = answer["accounts"]
        assert isinstance(rows, list)
        return {row["account"]: row for row in rows}


def stored(state_dir: Path, account: str) -> state.AccountState:
    """The account's state file, parsed (a torn or garbled file fails here)."""
    path = state_dir / f"{account}.toml"
    return state.from_toml(path.read_text(), source=str(path))


def private_files(directory: Path) -> list[Path]:
    """Files under `directory` that someone other than the owner could read (should be none)."""
    loose = []
    for path in [directory, *directory.rglob("*")]:
        mode = path.lstat().st_mode
        if mode & 0o077:
            loose.append(path)
    return loose
