"""
A fleet on etcd: 3 daemons sharing many accounts through a real 3-member etcd cluster.

    python bench/fleet.py [--accounts N] [--out docs/performance.md]   (or run.py --only fleet)

Measures the time to ready of each daemon, the etcd writes per refresh (etcd's
revision counts every write), the failover time after kill -9 of the leader,
and the helper's latency against a follower compared with a single-host daemon
(state files) holding the same accounts. The grants are written into etcd
directly (sealed, as the daemons write them), with access tokens valid for an
hour, so that what is timed is the fleet and not 10,000 first refreshes.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # for tests.fleet.cluster; mailoauthd is the installed one

from mailoauthd.provider import oauth  # noqa: E402
from mailoauthd.secret import Secret  # noqa: E402
from mailoauthd.storage import seal, state  # noqa: E402
from mailoauthd.storage.etcd import Etcd  # noqa: E402
from mailoauthd.storage.fleet import EtcdStore  # noqa: E402
from mailoauthd.testing import DevProvider  # noqa: E402
from tests.fleet.cluster import ETCD, Cluster  # noqa: E402

# 3 s: the lease TTL of the fleet measured (failover's target is TTL + 5 s).
LEASE_TTL = 3
# Grants written at once into etcd: enough to keep the gateway busy, few enough for 2 cores.
WRITERS = 16
# Helper calls timed per daemon.
CALLS = 200
# Refreshes asked of the leader to count etcd's writes per refresh.
REFRESHES = 50
MARKER, END = "<!-- fleet -->", "<!-- /fleet -->"


class DaemonProcess:
    """`mailoauthd --config PATH` of this installation, its log in a file."""

    def __init__(self, config_path: Path, socket: Path, log_path: Path) -> None:
        self.socket = socket
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "mailoauthd"), "--config", str(config_path)],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env=env,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def config_text(base: Path, provider: DevProvider, accounts: tuple[str, ...]) -> str:
    """One profile on the development provider and `accounts` on it (as tests/conftest.py)."""
    (base / "client-secret").write_text("demo-secret\n")
    text = f"""[daemon]
state_dir = "{base / "state"}"
socket = "{base / "run" / "socket"}"
log_level = "info"
log_format = "json"

[providers.dev]
client_id = "demo-client"
client_secret_file = "{base / "client-secret"}"
token_endpoint = "{provider.endpoints["token_endpoint"]}"
"""
    return text + "".join(
        f'\n[accounts.{name}]\nprovider = "dev"\nusername = "{name}@example.com"\n'
        for name in accounts
    )


def _grant(name: str, refresh_token: str, now: datetime) -> state.AccountState:
    tokens = oauth.TokenSet(
        access_token=Secret(f"at-{name}-bench"),
        token_type="Bearer",  # noqa: S106 - a token type, not a password
        expires_at=now + timedelta(hours=1),
        refresh_token=Secret(refresh_token),
        scopes=None,
    )
    return state.refreshed(state.imported(name, Secret(refresh_token), now), tokens, now)


async def _seed(
    endpoints: list[str], prefix: str, keyring: seal.Keyring, grants: list[Any]
) -> None:
    async with httpx.AsyncClient() as http:
        store = EtcdStore(Etcd(endpoints, http=http), prefix, keyring)
        await store.start()
        limit = trio.CapacityLimiter(WRITERS)

        async def one(grant: state.AccountState) -> None:
            async with limit:
                await store.save_async(grant)

        async with trio.open_nursery() as nursery:
            for grant in grants:
                nursery.start_soon(one, grant)


def _revision(endpoint: str) -> int:
    answer = httpx.post(f"{endpoint}/v3/kv/range", json={"key": base64.b64encode(b"x").decode()})
    return int(answer.json()["header"]["revision"])


def _helper(socket: Path, *args: str) -> subprocess.CompletedProcess[str]:
    mailoauth = Path(sys.executable).parent / "mailoauth"
    return subprocess.run(
        [str(mailoauth), "--socket", str(socket), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _latency(socket: Path, account: str, calls: int) -> dict[str, float]:
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        done = _helper(socket, "token", account)
        times.append((time.perf_counter() - started) * 1000)
        assert done.returncode == 0, done.stderr
    times.sort()
    return {"median_ms": statistics.median(times), "p95_ms": times[int(len(times) * 0.95) - 1]}


def _events(daemon: DaemonProcess, event: str) -> list[dict[str, Any]]:
    """The daemon's log events of one kind (the status reply of 10,000 accounts is slow)."""
    lines = daemon.log_path.read_text(errors="replace").splitlines()
    found = [json.loads(line) for line in lines if f'"event": "{event}"' in line]
    return [doc for doc in found if isinstance(doc, dict)]


def _wait_ready(daemon: DaemonProcess, seconds: float = 900) -> None:
    deadline = time.monotonic() + seconds
    while not _events(daemon, "daemon.ready"):
        if daemon.proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"mailoauthd not ready: {daemon.log()[-3000:]}")
        time.sleep(0.05)


def _leader(daemons: list[DaemonProcess]) -> DaemonProcess | None:
    """The daemon whose last word on the fleet is that it leads."""
    for daemon in daemons:
        if daemon.proc.poll() is not None:
            continue
        changes = _events(daemon, "fleet.changed")
        if changes and changes[-1].get("leading"):
            return daemon
    return None


def run(base: Path, accounts: int, calls: int = CALLS) -> dict[str, Any]:
    """Every figure of the fleet part, for `accounts` accounts."""
    names = [f"a{i:05d}" for i in range(accounts)]
    refreshes = min(REFRESHES, accounts)
    key = base64.b64encode(os.urandom(32)).decode()
    figures: dict[str, Any] = {"accounts": accounts, "lease_ttl": LEASE_TTL}
    rotation = {"refresh_token_rotation": "strict"}
    with Cluster(3) as cluster, DevProvider(**rotation) as provider:  # type: ignore[arg-type]
        now = datetime.now(UTC)
        grants = [_grant(n, provider.issue_refresh_token(f"{n}@example.com"), now) for n in names]
        keyring = seal.Keyring((base64.b64decode(key),), "bench")
        started = time.monotonic()
        trio.run(_seed, cluster.endpoints, "/bench/", keyring, grants)
        figures["seed_seconds"] = time.monotonic() - started
        daemons, ready = [], []
        for i in range(3):
            node = base / f"node{i}"
            node.mkdir(parents=True)
            (node / "fleet.key").write_text(key + "\n")
            (node / "fleet.key").chmod(0o600)
            text = config_text(node, provider, tuple(names))
            endpoints = ", ".join(f'"{e}"' for e in cluster.endpoints)
            text += (
                f'\n[store]\nbackend = "etcd"\nendpoints = [{endpoints}]\nprefix = "/bench/"\n'
                f'lease_ttl = "{LEASE_TTL}s"\nencryption_key_file = "{node / "fleet.key"}"\n'
            )
            (node / "config.toml").write_text(text)
            started = time.monotonic()
            daemon = DaemonProcess(node / "config.toml", node / "run" / "socket", node / "log")
            _wait_ready(daemon)
            ready.append(time.monotonic() - started)
            daemons.append(daemon)
        figures["ready_seconds"] = ready
        try:
            deadline = time.monotonic() + 30
            while (leader := _leader(daemons)) is None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert leader is not None, "no leader"
            follower = next(d for d in daemons if d is not leader)
            before = _revision(cluster.endpoints[0])
            for name in names[:refreshes]:
                done = _helper(leader.socket, "refresh", name)
                assert done.returncode == 0, done.stderr
            writes = _revision(cluster.endpoints[0]) - before
            figures["etcd_writes_per_refresh"] = writes / refreshes
            figures["helper_fleet"] = _latency(follower.socket, names[-1], calls)
            leader.proc.kill()
            leader.proc.wait()
            killed = time.monotonic()
            rest = [d for d in daemons if d is not leader]
            while _leader(rest) is None:
                time.sleep(0.05)
            figures["failover_seconds"] = time.monotonic() - killed
        finally:
            for daemon in daemons:
                if daemon.proc.poll() is None:
                    daemon.stop()
        single = _single_host(base / "single", provider, grants, names, calls)
        figures["helper_single_host"] = single
    return figures


def _single_host(
    base: Path, provider: DevProvider, grants: list[Any], names: list[str], calls: int
) -> Any:
    """The helper's latency against one daemon with the same accounts in state files."""
    base.mkdir(parents=True)
    store = state.TokenStore(base / "state")
    store.open()
    for grant in grants:
        store.save(grant)
    store.close()
    (base / "config.toml").write_text(config_text(base, provider, tuple(names)))
    daemon = DaemonProcess(base / "config.toml", base / "run" / "socket", base / "log")
    try:
        _wait_ready(daemon)
        return _latency(daemon.socket, names[-1], calls)
    finally:
        daemon.stop()


def render(figures: dict[str, Any], where: str) -> str:
    """The fleet section of docs/performance.md."""
    ready = ", ".join(f"{s:.1f}" for s in figures["ready_seconds"])
    fleet, single = figures["helper_fleet"], figures["helper_single_host"]
    load = figures.get("load", [float("nan"), float("nan")])
    rows = [
        (f"grants written into etcd first (sealed, {WRITERS} at once)", "", ""),
        ("time to ready, each daemon (reads every grant, opens each)", f"{ready} s", ""),
        (
            f"etcd writes per refresh (revisions / refreshes, {REFRESHES} refreshes)",
            f"{figures['etcd_writes_per_refresh']:.2f}",
            "1 (see below)",
        ),
        (
            "failover after kill -9 of the leader (until another says it refreshes)",
            f"{figures['failover_seconds']:.1f} s",
            f"≤ TTL + 5 s = {figures['lease_ttl'] + 5} s",
        ),
        (
            "helper `token` against a follower: median / p95",
            f"{fleet['median_ms']:.1f} / {fleet['p95_ms']:.1f} ms",
            "as one host",
        ),
        (
            "helper `token` against one daemon with state files: median / p95",
            f"{single['median_ms']:.1f} / {single['p95_ms']:.1f} ms",
            "",
        ),
    ]
    rows[0] = (rows[0][0], f"{figures['seed_seconds']:.1f} s", "")
    table = "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    return f"""{MARKER}
## A fleet on etcd (3 daemons, 3-member etcd cluster)

Measured {where} by `bench/fleet.py` (`bench/run.py --only fleet`): a real
3-member etcd 3.4 cluster and 3 daemons on one machine (loopback), sharing
{figures["accounts"]:,} accounts sealed with one key; `lease_ttl` {figures["lease_ttl"]} s.
The machine's load average (1 min) was {load[0]:.1f} before and {load[1]:.1f} after:
other work ran beside it, and the latencies move with it.

| figure | value | target |
|---|---|---|
{table}

A refresh costs two etcd writes, not one: the leader stores the note
`refresh_sent` before its request leaves (so that the next leader knows to
retry at once, inside the provider's reuse window, if it dies), then the
answer. Both are fenced transactions; a single write could not tell the next
leader which refreshes were in flight. The helper's latency is the same
against a follower: it is served from memory either way.
{END}
"""


def section(text: str) -> str:
    """The fleet section of a report, or "" (a full `make bench` run keeps it)."""
    if MARKER not in text or END not in text:
        return ""
    return MARKER + text.split(MARKER, 1)[1].split(END, 1)[0] + END + "\n"


def splice(text: str, section: str) -> str:
    """`text` with its fleet section replaced by `section` (appended if it has none)."""
    if MARKER in text and END in text:
        head, rest = text.split(MARKER, 1)
        return head + section.rstrip("\n") + rest.split(END, 1)[1]
    return text.rstrip("\n") + "\n\n" + section


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--calls", type=int, default=CALLS, help="helper calls timed per daemon")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "performance.md")
    args = parser.parse_args(argv)
    # Stopped from outside: unwind, so that every daemon and etcd member started is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if ETCD is None:
        parser.error("etcd is not installed (Debian: etcd-server)")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="mob-fleet-") as tmp:
        figures = run(Path(tmp), args.accounts, args.calls)
    figures["load"] = [load_before, os.getloadavg()[0]]
    print(json.dumps(figures, indent=1))
    where = time.strftime("%Y-%m-%d", time.gmtime()) + f" on {_machine()}"
    before = args.out.read_text() if args.out.is_file() else ""
    args.out.write_text(splice(before, render(figures, where)))
    return 0


def _machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{cpu}, {os.cpu_count()} cores"


if __name__ == "__main__":
    sys.exit(main())
