"""
Benchmark 2: token requests per second and latency over the daemon's socket, and
benchmark 4's first half: no client ever gets a token expiring within min_validity.

The load comes from bench/loadgen.c (compiled here with the machine's C
compiler): each simulated client connects, sends the helper's exact request
line, reads the answer and closes, as `mailoauth token` does. Its own CPU time
is reported next to the daemon's, to show which one was the bottleneck.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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

from mailoauthd.devprovider import DevProvider

HERE = Path(__file__).resolve().parent
ACCOUNTS = 10
MIN_VALIDITY = 60.0


def build_loadgen(out: Path) -> Path:
    """Compile loadgen.c; returns the binary."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler: install gcc (bench/setup.sh does)")
    binary = out / "loadgen"
    subprocess.run(
        [compiler, "-O2", "-Wall", "-o", str(binary), str(HERE / "loadgen.c"), "-lm"],
        check=True,
    )
    return binary


def loadgen(
    binary: Path,
    daemon: Daemon,
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
        try:
            wait_for_refreshes(daemon, len(names))
            plan = [(f"closed-{c}", c, 0.0) for c in (1, 10, 100)]
            plan.append((f"open-{int(open_rate)}", 100, open_rate))
            collected: dict[str, list[dict[str, float]]] = {key: [] for key, _, _ in plan}
            for repeat in range(repeats):
                for key, clients, rate in plan:
                    log(f"socket load: {key} ({repeat + 1}/{repeats})")
                    collected[key].append(
                        loadgen(
                            binary,
                            daemon,
                            clients=clients,
                            seconds=seconds,
                            rate=rate,
                            accounts=names,
                        )
                    )
            result["runs"] = {key: summarize(runs) for key, runs in collected.items()}
        finally:
            daemon.stop()

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
