"""
Benchmark 3: many accounts against the development provider, and benchmark 4's
second half: tokens handed out while every account is being refreshed.

For each account count the daemon starts on state files whose access tokens
are due (valid for 5 more minutes, inside refresh_before), so its first check
refreshes every account. Measured: start to READY=1, resident memory, the
full refresh (time, CPU of the daemon and of the provider), bytes written per
refresh, and the CPU of a check that finds nothing due.

Beside each, a same-run reference for the work that cannot be avoided
(`reference`): a fresh interpreter of the same install that parses the config
and every state file with a bare `tomllib` loop stands for READY=1, and a bare
loop that compares every account's expiry with the clock stands for a check
that finds nothing due. The report judges the daemon by its overhead over them.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from common import (
    Daemon,
    Install,
    account_names,
    cpu_seconds,
    io_counters,
    log,
    median,
    memory,
    seed_state,
    self_cpu,
    timestamp,
    write_config,
)
from socket_load import loadgen

from mailoauthd import config as config_module
from mailoauthd.storage import state
from mailoauthd.testing import DevProvider

# A check every second, so that a few seconds of idling show many checks;
# refreshes not spread out, so that the time measures work, not waiting.
DAEMON_KEYS = 'refresh_interval = "1s"\nrefresh_spread = "0s"\nlog_level = "info"'
CHECK_INTERVAL = 1.0
DUE_IN = 300.0  # seconds left on the seeded tokens: due, but still served
MIN_VALIDITY = 60.0
PAIRED = ("ready_s", "ref_ready_s", "idle_check_cpu_ms", "ref_check_cpu_ms")


# The reference: read and parse what the daemon must read and parse before
# READY=1, then (after saying so on stdout) time the least a check that finds
# nothing due must do: for every account, how long its token has left against
# refresh_before, and the earliest moment it must be looked at again.
REFERENCE_SCRIPT = """
import sys, time, tomllib, os, json
from datetime import datetime, timedelta, timezone
config_path, state_dir, loops = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(config_path, "rb") as f:
    config = tomllib.load(f)
expiries = []
for name in config["accounts"]:
    with open(os.path.join(state_dir, name + ".toml"), "rb") as f:
        st = tomllib.load(f)
    expiries.append(st["expires_at"])  # a TOML datetime
sys.stdout.write("parsed\\n")
sys.stdout.flush()
before, minimum = timedelta(minutes=10), timedelta(seconds=60)
spent = []
for _ in range(loops):
    t0 = time.thread_time_ns()
    # The seeded tokens are due; an hour back none is, as in the daemon's idle checks.
    now = datetime.now(timezone.utc) - timedelta(hours=1)
    due, last_call = [], None
    for expires_at in expiries:
        if expires_at - now <= before:
            due.append(expires_at)
            continue
        latest = expires_at - minimum
        if latest > now and (last_call is None or latest < last_call):
            last_call = latest
    spent.append(time.thread_time_ns() - t0)
spent.sort()
print(json.dumps({"check_cpu_ms": spent[len(spent) // 2] / 1e6, "accounts": len(expiries)}))
"""


def reference(install: Install, config_path: Path, state_dir: Path) -> dict[str, float]:
    """
    The same-run reference: a bare Python loop doing the work READY=1 and a check must do.

    Returns:
        ready_s: spawn to having parsed the config and every state file (wall);
        check_cpu_ms: CPU of one pass comparing every expiry with the clock (median).
    """
    started = time.perf_counter()
    with subprocess.Popen(
        [str(install.python), "-I", "-c", REFERENCE_SCRIPT, str(config_path), str(state_dir), "21"],
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        ready = time.perf_counter() - started
        rest = proc.stdout.read()
    if proc.returncode != 0 or first != "parsed\n":
        raise RuntimeError("the scale reference failed")
    figures = json.loads(rest)
    return {
        "ready_s": ready,
        "check_cpu_ms": float(figures["check_cpu_ms"]),
        "accounts": float(figures["accounts"]),
    }


def main_thread_cpu_ns(pid: int) -> int:
    """CPU time of the daemon's main thread (the trio loop), in ns (/proc schedstat)."""
    return int(Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()[0])


def startup_parts(
    install: Install, config_path: Path, names: list[str], runs: int
) -> dict[str, float]:
    """What READY=1 waits for, timed piece by piece in this process and in a fresh one."""
    started = time.perf_counter()
    cfg = config_module.load(config_path)
    parsed = time.perf_counter()
    store = state.TokenStore(cfg.daemon.state_dir or config_path.parent / "state")
    for name in names:
        store.load(name)
    loaded = time.perf_counter()
    imports = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(
            [str(install.python), "-c", "import mailoauthd.cli, mailoauthd.daemon"], check=True
        )
        imports.append(time.perf_counter() - t0)
    return {
        "config_s": parsed - started,
        "state_load_s": loaded - parsed,
        "interpreter_and_imports_s": median(imports),
    }


def wait_refreshed(daemon: Daemon, count: int, timeout: float) -> tuple[float, float]:
    """Wait for `count` token.refreshed events; returns (READY time, last refresh time)."""
    ready_at = last = float("nan")
    seen = 0
    deadline = time.monotonic() + timeout
    while seen < count:
        if time.monotonic() > deadline or (daemon.proc and daemon.proc.poll() is not None):
            raise RuntimeError(f"{seen} of {count} refreshed in time:\n{daemon.log_tail()}")
        for event in daemon.new_events():
            kind = event.get("event")
            if kind == "daemon.ready":
                ready_at = timestamp(event)
            elif kind == "token.refreshed":
                seen += 1
                last = timestamp(event)
            elif kind in ("token.refresh_failed", "state.write_failed"):
                raise RuntimeError(f"refresh failed: {event}")
        time.sleep(0.02)
    return ready_at, last


def verify_store(directory: Path, names: list[str]) -> int:
    """How many accounts do not have a fresh token on disk after the full refresh."""
    store = state.TokenStore(directory)
    now = time.time()
    stale = 0
    for name in names:
        st = store.load(name)
        fresh = (
            st is not None
            and st.access_token is not None
            and not st.access_token.reveal().startswith("bench-stale-")
            and st.expires_at is not None
            and st.expires_at.timestamp() - now > 3000
        )
        stale += not fresh
    return stale


def run_one(
    install: Install,
    base: Path,
    count: int,
    *,
    idle_seconds: float,
    timeout: float,
    load: tuple[Path, float, float] | None = None,
) -> dict[str, float]:
    """
    One daemon with `count` accounts: start, full refresh, idle checks.

    Args:
        load: (load generator, requests/s, seconds): clients asking for tokens
            of every account while the refresh runs.
    """
    base.mkdir(parents=True)
    names = account_names(count)
    out: dict[str, float] = {"accounts": count}
    with DevProvider() as provider:
        config_path = write_config(base, provider, names, daemon_keys=DAEMON_KEYS)
        seed_state(base, provider, names, expires_in=DUE_IN)
        if load is None:
            out.update(startup_parts(install, config_path, names, 1 if count < 100 else 3))
            # Just before the daemon, on the same files, equally warm in the page cache.
            ref = reference(install, config_path, base / "state")
            out["ref_ready_s"] = ref["ready_s"]
            out["ref_check_cpu_ms"] = ref["check_cpu_ms"]
        daemon = Daemon(install, config_path, base / "run" / "socket", base / "daemon.log")
        provider_cpu = self_cpu()
        daemon.start(timeout=timeout)
        try:
            out["ready_s"] = daemon.ready_seconds
            out["rss_ready_mb"] = memory(daemon.pid)["VmRSS"] / 2**20
            cpu0, io0 = cpu_seconds(daemon.pid), io_counters(daemon.pid)
            log0 = daemon.log_path.stat().st_size
            provider_cpu = self_cpu()
            loaded: dict[str, float] | None = None
            if load is not None:
                binary, rate, seconds = load
                loaded = loadgen(
                    binary, daemon, clients=100, seconds=seconds, rate=rate, accounts=names
                )
            ready_at, last = wait_refreshed(daemon, count, timeout)
            out["refresh_s"] = last - ready_at
            out["refresh_per_s"] = count / out["refresh_s"]
            out["daemon_cpu_s"] = cpu_seconds(daemon.pid) - cpu0
            out["provider_cpu_s"] = self_cpu() - provider_cpu
            io1 = io_counters(daemon.pid)
            log_bytes = daemon.log_path.stat().st_size - log0
            out["state_bytes_per_refresh"] = (io1["wchar"] - io0["wchar"] - log_bytes) / count
            out["storage_bytes_per_refresh"] = (io1["write_bytes"] - io0["write_bytes"]) / count
            out["log_bytes_per_refresh"] = log_bytes / count
            sizes = [os.path.getsize(base / "state" / f"{n}.toml") for n in names]
            out["state_file_bytes"] = sum(sizes) / len(sizes)
            if loaded is not None:
                out.update(
                    {f"load_{k}": v for k, v in loaded.items() if isinstance(v, float | int)}
                )
                worst = [round(us / 1000, 1) for us in loaded["max_us_by_second"]]
                out["load_worst_by_second_ms"] = worst  # type: ignore[assignment]
            else:
                time.sleep(min(2 * CHECK_INTERVAL, idle_seconds))  # refresh threads wind down
                cpu_ns = main_thread_cpu_ns(daemon.pid)
                time.sleep(idle_seconds)
                spent = main_thread_cpu_ns(daemon.pid) - cpu_ns
                out["idle_check_cpu_ms"] = spent / 1e6 / (idle_seconds / CHECK_INTERVAL)
            mem = memory(daemon.pid)
            out["rss_mb"] = mem["VmRSS"] / 2**20
            out["rss_peak_mb"] = mem["VmHWM"] / 2**20
        finally:
            daemon.stop()
        out["stale_after"] = verify_store(base / "state", names)
    return out


def run(
    install: Install,
    base: Path,
    *,
    counts: list[int],
    repeats: int,
    idle_seconds: float,
    load_rate: float,
    loadgen_binary: Path,
    min_load_seconds: float = 5.0,
    timeout: float = 600.0,
) -> dict[str, object]:
    """
    Measure each account count `repeats` times (medians), then the largest once
    more with clients asking for tokens throughout.
    """
    fields = config_module.DaemonSettings.__dataclass_fields__
    result: dict[str, object] = {
        "counts": counts,
        "repeats": repeats,
        "idle_seconds": idle_seconds,
        "concurrency": fields["max_concurrent_refreshes"].default,
    }
    runs: dict[int, list[dict[str, float]]] = {count: [] for count in counts}
    for repeat in range(repeats):
        for count in counts:
            log(f"scale: {count} accounts ({repeat + 1}/{repeats})")
            runs[count].append(
                run_one(
                    install,
                    base / f"n{count}-{repeat}",
                    count,
                    idle_seconds=idle_seconds,
                    timeout=timeout,
                )
            )
    rows = []
    for count in counts:
        keys = runs[count][0].keys()
        row = {key: median([r[key] for r in runs[count]]) for key in keys}
        row["stale_after"] = sum(r["stale_after"] for r in runs[count])
        rows.append(row)
    result["rows"] = rows
    # Each run beside its own reference, for the report to judge round by round.
    result["pairs"] = [[{key: r[key] for key in PAIRED} for r in runs[count]] for count in counts]
    largest = counts[-1]
    seconds = max(min_load_seconds, 1.5 * rows[-1]["refresh_s"])
    log(f"scale: {largest} accounts again, with {load_rate:g} token requests/s throughout")
    result["under_load"] = run_one(
        install,
        base / f"n{largest}-load",
        largest,
        idle_seconds=idle_seconds,
        timeout=timeout,
        load=(loadgen_binary, load_rate, seconds),
    )
    return result
