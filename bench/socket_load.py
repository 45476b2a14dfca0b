"""
Benchmark 2: token requests per second and latency over the daemon's socket, and
benchmark 4's first half: no client ever gets a token expiring within min_validity.

The load comes from bench/loadgen.c (compiled here with the machine's C
compiler): each simulated client connects, sends the helper's exact request
line, reads the answer and closes, as `mailoauth token` does. Its own CPU time
is reported next to the daemon's, to show which one was the bottleneck.

Every run is made twice in the same round, back to back and in alternating
order: against the daemon and against bench/refserver.c, the least a
Unix-socket token service can cost on this machine (one epoll loop in C that
writes a canned answer of the daemon's size). The report judges the daemon by
its ratio to that reference, which the machine's other load slows alike.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from common import (
    Daemon,
    Install,
    OtherWork,
    account_names,
    cpu_seconds,
    log,
    median,
    seed_state,
    write_config,
)

from mailoauthd.testing import DevProvider

HERE = Path(__file__).resolve().parent
ACCOUNTS = 10
MIN_VALIDITY = 60.0


def build(out: Path, name: str) -> Path:
    """Compile bench/NAME.c; returns the binary."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler: install gcc (bench/setup.sh does)")
    binary = out / name
    subprocess.run(
        [compiler, "-O2", "-Wall", "-o", str(binary), str(HERE / f"{name}.c"), "-lm"],
        check=True,
    )
    return binary


def build_loadgen(out: Path) -> Path:
    """Compile loadgen.c; returns the binary."""
    return build(out, "loadgen")


class Server(Protocol):
    """What the load generator is pointed at: the daemon or the reference."""

    @property
    def pid(self) -> int: ...

    socket_path: Path


def raw_answer(socket_path: Path, line: bytes, timeout: float = 30.0) -> bytes:
    """The bytes a server answers to one request line, as the load generator reads them."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(socket_path))
        sock.sendall(line)
        chunks = []
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
    return b"".join(chunks)


def token_request_line(account: str) -> bytes:
    """The helper's exact request line, as loadgen.c sends it."""
    return (
        b'{"v":1,"op":"token","account":"'
        + account.encode()
        + b'","min_validity":-1.0,"timeout":15.0}\n'
    )


@dataclass
class RefServer:
    """bench/refserver.c as a subprocess: a canned answer over a Unix socket, in C."""

    binary: Path
    socket_path: Path
    answer: bytes
    max_seconds: float
    proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        answer_file = self.socket_path.parent / "answer"
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        answer_file.write_bytes(self.answer)
        self.proc = subprocess.Popen(
            [str(self.binary), str(self.socket_path), str(answer_file), str(self.max_seconds)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline() != b"ready\n":
            self.stop()
            raise RuntimeError("the reference server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


def loadgen(
    binary: Path,
    daemon: Server,
    *,
    clients: int,
    seconds: float,
    rate: float,
    accounts: Sequence[str],
    min_validity: float = MIN_VALIDITY,
) -> dict[str, Any]:
    """One run of the load generator, with the daemon's CPU time over it."""
    cpu_before = cpu_seconds(daemon.pid)
    others = OtherWork(daemon.pid)
    out = subprocess.run(
        [
            str(binary),
            str(daemon.socket_path),
            str(clients),
            str(seconds),
            str(rate),
            str(min_validity),
            *accounts,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    result["daemon_cpu_s"] = cpu_seconds(daemon.pid) - cpu_before
    result["others_cores"] = others.cores()
    if result["errors"]:
        raise RuntimeError(f"the daemon answered with errors: {result}")
    return result


def wait_for_refreshes(daemon: Daemon, count: int, timeout: float = 60.0) -> None:
    seen = 0
    deadline = time.monotonic() + timeout
    while seen < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {seen} of {count} refreshes:\n{daemon.log_tail()}")
        seen += sum(e.get("event") == "token.refreshed" for e in daemon.new_events())
        time.sleep(0.02)


ROUND_FIGURES = ("rate", "p50_us", "p99_us", "max_us", "others_cores", "loadavg")


def _round_figures(run_: dict[str, Any]) -> dict[str, float]:
    """What the report needs of each round: the figures that are judged, and the load."""
    figures = {k: float(run_[k]) for k in ROUND_FIGURES}
    figures["cpu_cores"] = run_["daemon_cpu_s"] / run_["seconds"]
    figures["generator_cores"] = run_["cpu_s"] / run_["seconds"]
    return figures


def summarize(runs: list[dict[str, float]]) -> dict[str, float]:
    """Median of each figure over repeated runs; counts are summed."""
    summed = ("requests", "ok", "errors", "violations")
    keys = [k for k, v in runs[0].items() if isinstance(v, int | float)]
    out = {
        k: (sum(r[k] for r in runs) if k in summed else median([r[k] for r in runs])) for k in keys
    }
    out["min_margin_s"] = min(r["min_margin_s"] for r in runs)
    out["repeats"] = len(runs)
    return out


class IntrospectionCheck(threading.Thread):
    """
    Alongside the load, ask the daemon for tokens and check each with the provider.

    The load generator checks the expiry the daemon states; this checks that
    the statement is true: the provider's introspection must call the token
    active, with an `exp` at least min_validity away and equal to what the
    daemon said.
    """

    def __init__(self, daemon: Daemon, provider: DevProvider, accounts: Sequence[str]) -> None:
        super().__init__(daemon=True)
        self.daemon_ = daemon
        self.provider = provider
        self.accounts = list(accounts)
        self.stop = threading.Event()
        self.checked = 0
        self.failures: list[str] = []

    def run(self) -> None:
        i = 0
        while not self.stop.wait(0.05):
            name = self.accounts[i % len(self.accounts)]
            i += 1
            reply = self.daemon_.request(
                {"v": 1, "op": "token", "account": name, "min_validity": -1.0, "timeout": 15.0}
            )
            now = time.time()
            info = self.provider.introspect(str(reply.get("token")))
            self.checked += 1
            exp = info.get("exp")
            if not info.get("active") or not isinstance(exp, int):
                self.failures.append(f"{name}: provider says inactive")
            elif exp + 1 - now < MIN_VALIDITY:  # exp is in whole seconds, rounded down
                self.failures.append(f"{name}: valid {exp - now:.1f} s < {MIN_VALIDITY:g} s")
            elif abs(exp - float(str(reply.get("expires_at")))) > 1:
                self.failures.append(f"{name}: daemon said {reply.get('expires_at')}, exp {exp}")


def gc_watch(
    install: Install,
    base: Path,
    binary: Path,
    names: Sequence[str],
    *,
    seconds: float,
    rate: float,
) -> dict[str, Any]:
    """
    One more open-loop run, against the daemon with its garbage collector watched.

    The same configuration and state as the judged runs (tokens valid, nothing to
    refresh), the daemon started through bench/gcwatch.py.
    """
    out = base / "gc.json"
    daemon = Daemon(
        install,
        base / "config.toml",
        base / "run" / "socket",
        base / "daemon-gc.log",
        env={"GCWATCH_OUT": str(out)},
        program=[str(install.python), "-I", str(HERE / "gcwatch.py")],
    )
    log(f"socket load: open-{int(rate)} once more, the daemon's collector watched")
    daemon.start()
    try:
        run_ = loadgen(binary, daemon, clients=100, seconds=seconds, rate=rate, accounts=names)
    finally:
        daemon.stop()
    figures: dict[str, Any] = json.loads(out.read_text())
    figures.update(
        seconds=seconds,
        max_us=run_["max_us"],
        p99_us=run_["p99_us"],
        others_cores=run_["others_cores"],
    )
    return figures


def run(
    install: Install,
    base: Path,
    *,
    seconds: float,
    repeats: int,
    churn_seconds: float,
    open_rate: float,
) -> dict[str, object]:
    """Measure; returns the figures for the report."""
    base.mkdir(parents=True, exist_ok=True)
    binary = build_loadgen(base)
    refserver = build(base, "refserver")
    names = account_names(ACCOUNTS)
    result: dict[str, object] = {"accounts": ACCOUNTS, "seconds": seconds}
    with DevProvider() as provider:
        steady = base / "steady"
        steady.mkdir()
        config = write_config(steady, provider, names)
        # Expired tokens: the daemon's first check fetches real ones.
        seed_state(steady, provider, names, expires_in=0)
        daemon = Daemon(install, config, steady / "run" / "socket", steady / "daemon.log")
        daemon.start()
        reference: RefServer | None = None
        try:
            wait_for_refreshes(daemon, len(names))
            # The reference writes what the daemon writes: a real answer, same size.
            answer = raw_answer(daemon.socket_path, token_request_line(names[0]))
            plan = [(f"closed-{c}", c, 0.0) for c in (1, 10, 100)]
            plan.append((f"open-{int(open_rate)}", 100, open_rate))
            reference = RefServer(
                refserver,
                base / "ref" / "socket",
                answer,
                max_seconds=repeats * len(plan) * 2 * (seconds + 10) + 60,
            )
            reference.start()
            servers: dict[str, Server] = {"daemon": daemon, "reference": reference}
            rounds: dict[str, list[dict[str, dict[str, Any]]]] = {key: [] for key, _, _ in plan}
            for repeat in range(repeats):
                # Alternate who goes first, so that neither always follows the other.
                order = ["daemon", "reference"] if repeat % 2 == 0 else ["reference", "daemon"]
                for key, clients, rate in plan:
                    log(f"socket load: {key} ({repeat + 1}/{repeats}), {' then '.join(order)}")
                    pair: dict[str, dict[str, Any]] = {}
                    for who in order:
                        pair[who] = loadgen(
                            binary,
                            servers[who],
                            clients=clients,
                            seconds=seconds,
                            rate=rate,
                            accounts=names,
                        )
                        pair[who]["loadavg"] = os.getloadavg()[0]
                    rounds[key].append(pair)
            result["answer_bytes"] = len(answer)
            result["runs"] = {
                key: summarize([p["daemon"] for p in pairs]) for key, pairs in rounds.items()
            }
            result["reference"] = {
                key: summarize([p["reference"] for p in pairs]) for key, pairs in rounds.items()
            }
            result["rounds"] = {
                key: [{who: _round_figures(run_) for who, run_ in p.items()} for p in pairs]
                for key, pairs in rounds.items()
            }
        finally:
            if reference is not None:
                reference.stop()
            daemon.stop()
        result["gc"] = gc_watch(install, steady, binary, names, seconds=seconds, rate=open_rate)

    # Refresh churn: tokens live 64 s and are handed out only while valid for 60 s,
    # so every account is refreshed every few seconds while clients keep asking.
    with DevProvider(access_token_lifetime=64) as provider:
        churn = base / "churn"
        churn.mkdir()
        config = write_config(
            churn,
            provider,
            names,
            daemon_keys='refresh_interval = "1s"\nrefresh_before = "62s"\nmin_validity = "60s"',
        )
        seed_state(churn, provider, names, expires_in=0)
        daemon = Daemon(install, config, churn / "run" / "socket", churn / "daemon.log")
        daemon.start()
        try:
            wait_for_refreshes(daemon, len(names))
            checker = IntrospectionCheck(daemon, provider, names)
            refreshes_before = provider.count(grant_type="refresh_token")
            log(f"socket load: refresh churn, 100 clients for {churn_seconds:g} s")
            checker.start()
            try:
                run_ = loadgen(
                    binary, daemon, clients=100, seconds=churn_seconds, rate=0.0, accounts=names
                )
            finally:
                checker.stop.set()
                checker.join()
            run_["refreshes"] = provider.count(grant_type="refresh_token") - refreshes_before
            run_["introspected"] = checker.checked
            run_["introspection_failures"] = len(checker.failures)
            result["churn"] = run_
            result["churn_failures"] = checker.failures[:5]
        finally:
            daemon.stop()
    return result
