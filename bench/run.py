"""
`make bench`: measure the helper, the socket and many accounts; write docs/performance.md.

    bench/.venv/bin/python bench/run.py [--out docs/performance.md] [--smoke] [--only proxy|fleet]

Runs the programs of the installation whose interpreter runs this script
(bench/setup.sh makes bench/.venv, a non-editable install, as users get).
`--smoke` runs every part with tiny counts, for the test suite: it checks that
the bench works, and its figures mean nothing. `--only PART` runs one part and
puts its figures into the last run's (the --json file), which the report then
shows with that part's own date and revision. `--only fleet` runs
bench/fleet.py (3 daemons on a 3-member etcd cluster, 10,000 accounts; 5 in
--smoke) and replaces the report's fleet section; a full run keeps the
section that is there.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import helper_latency
import proxy
import report
import scale
import socket_load
from common import Install, OtherWork, installed_versions, load, log, machine, program_version

ROOT = Path(__file__).resolve().parent.parent


def git_revision() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()

    revision = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "mailoauthd", "bin")
    return revision + (" with uncommitted changes" if dirty else "")


def run_proxy(install: Install, base: Path, sizes: dict[str, Any]) -> dict[str, Any]:
    figures = proxy.run(
        install,
        base / "proxy",
        rounds=int(sizes["proxy_rounds"]),
        logins=int(sizes["proxy_logins"]),
        fetch_mb=float(sizes["fetch_mb"]),
        submit_mb=float(sizes["submit_mb"]),
        idle=int(sizes["idle_sessions"]),
        idle_seconds=float(sizes["proxy_idle_seconds"]),
    )
    keys = ("proxy_rounds", "proxy_logins", "fetch_mb", "submit_mb", "idle_sessions")
    figures["sizes"] = {k: sizes[k] for k in (*keys, "proxy_idle_seconds")}
    return figures


def fleet_bench() -> Any:
    """bench/fleet.py, loaded by its path (proxy.py puts tests/, with its package fleet, first)."""
    spec = importlib.util.spec_from_file_location("fleet_bench", Path(__file__).parent / "fleet.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def keep_fleet(rendered: str, out: Path) -> str:
    """The report with the fleet section of `out` kept (`--only fleet` writes it)."""
    before = out.read_text() if out.is_file() else ""
    start, end = before.find("<!-- fleet -->"), before.find("<!-- /fleet -->")
    if start < 0 or end < 0:
        return rendered
    return rendered.rstrip("\n") + "\n\n" + before[start : end + len("<!-- /fleet -->")] + "\n"


def only(part: str, args: argparse.Namespace, sizes: dict[str, Any]) -> int:
    """One part into the last run's figures; the report says when and on what it ran."""
    results = json.loads(args.json.read_text())
    install = Install(Path(sys.executable).parent)
    base = Path(tempfile.mkdtemp(prefix="mob-", dir="/tmp"))
    started = time.monotonic()
    try:
        others = OtherWork()
        results[part] = run_proxy(install, base, sizes)
        results["others_cores"][part] = others.cores()
        results["load_during"][part] = load()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    results.setdefault("parts", {})[part] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "revision": git_revision(),
        "minutes": (time.monotonic() - started) / 60,
        "smoke": args.smoke,
        "load_before": machine()["load"],
        "load_after": load(),
    }
    args.json.write_text(json.dumps(results, indent=1))
    args.out.write_text(report.render(results))
    log(f"wrote {args.out} with the {part} part of {results['parts'][part]['date']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "performance.md")
    parser.add_argument(
        "--json",
        type=Path,
        default=ROOT / "bench" / ".venv" / "figures.json",
        help="also write the raw figures here (default: bench/.venv/figures.json)",
    )
    parser.add_argument(
        "--render", type=Path, metavar="JSON", help="only write the report from a run's figures"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny counts: does the bench run?")
    parser.add_argument("--no-mutt", action="store_true", help="skip mutt_oauth2.py")
    parser.add_argument(
        "--only",
        choices=["proxy", "fleet"],
        help="run this part only, into the figures of the last run (--json)",
    )
    args = parser.parse_args(argv)
    # Stopped from outside: unwind, so that every daemon started is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    if args.only == "fleet":
        counts = ["--accounts", "5", "--calls", "5"] if args.smoke else []
        return fleet_bench().main([*counts, "--out", str(args.out)])
    if args.render:
        args.out.write_text(report.render(json.loads(args.render.read_text())))
        return 0
    if args.only and not args.json.is_file():
        parser.error(f"--only needs the figures of a full run in {args.json}")
    install = Install(Path(sys.executable).parent)
    with_mutt = (
        not args.no_mutt
        and helper_latency.find_mutt_oauth2() is not None
        and shutil.which("gpg") is not None
    )
    if args.smoke:
        sizes = {
            "rounds": 3,
            "warmup": 1,
            "seconds": 0.3,
            "repeats": 2,
            "churn_seconds": 1.0,
            "open_rate": 1000.0,
            "counts": [10, 20],
            "scale_repeats": 1,
            "idle_seconds": 0.5,
            "load_rate": 200.0,
            "min_load_seconds": 1.0,
            "proxy_rounds": 2,
            "proxy_logins": 2,
            "fetch_mb": 1.0,
            "submit_mb": 1.0,
            "idle_sessions": 10,
            "proxy_idle_seconds": 0.5,
        }
    else:
        sizes = {
            "rounds": 200,
            "warmup": 10,
            "seconds": 3.0,
            "repeats": 5,
            "churn_seconds": 20.0,
            "open_rate": 10000.0,
            "counts": [100, 1000, 10000],
            "scale_repeats": 3,
            "idle_seconds": 5.0,
            "load_rate": 2000.0,
            "min_load_seconds": 5.0,
            "proxy_rounds": 5,
            "proxy_logins": 10,
            "fetch_mb": 100.0,
            "submit_mb": 25.0,
            "idle_sessions": 1000,
            "proxy_idle_seconds": 10.0,
        }
    if args.only:
        return only(args.only, args, sizes)
    started = time.monotonic()
    results: dict[str, object] = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "revision": git_revision(),
        "versions": {
            **installed_versions(install),
            "gpg": program_version(["gpg", "--version"]),
            "cc": program_version(["cc", "--version"], r"\d+\.\d+(\.\d+)?"),
        },
        "smoke": args.smoke,
        "sizes": sizes,
    }
    busy: dict[str, float] = {}
    results["others_cores"] = busy
    # The 1-minute load average as each part ends: how busy the machine was meanwhile.
    load_during: dict[str, str] = {}
    results["load_during"] = load_during
    base = Path(tempfile.mkdtemp(prefix="mob-", dir="/tmp"))  # short: socket paths max 107
    try:
        log(f"working in {base}")
        others = OtherWork()
        results["helper"] = helper_latency.run(
            install,
            base / "helper",
            rounds=int(sizes["rounds"]),
            warmup=int(sizes["warmup"]),
            with_mutt=with_mutt,
        )
        busy["helper"] = others.cores()
        load_during["helper"] = load()
        others = OtherWork()
        results["socket"] = socket_load.run(
            install,
            base / "socket",
            seconds=float(sizes["seconds"]),
            repeats=int(sizes["repeats"]),
            churn_seconds=float(sizes["churn_seconds"]),
            open_rate=float(sizes["open_rate"]),
        )
        busy["socket"] = others.cores()
        load_during["socket"] = load()
        others = OtherWork()
        results["scale"] = scale.run(
            install,
            base / "scale",
            counts=list(sizes["counts"]),  # type: ignore[call-overload]
            repeats=int(sizes["scale_repeats"]),
            idle_seconds=float(sizes["idle_seconds"]),
            load_rate=float(sizes["load_rate"]),
            loadgen_binary=base / "socket" / "loadgen",
            min_load_seconds=float(sizes["min_load_seconds"]),
        )
        busy["scale"] = others.cores()
        load_during["scale"] = load()
        others = OtherWork()
        results["proxy"] = run_proxy(install, base, sizes)
        busy["proxy"] = others.cores()
        load_during["proxy"] = load()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    results["load_after"] = load()
    results["minutes"] = (time.monotonic() - started) / 60
    if args.json.parent.is_dir():
        args.json.write_text(json.dumps(results, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(keep_fleet(report.render(results), args.out))
    log(f"wrote {args.out} in {results['minutes']:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
