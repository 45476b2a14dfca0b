"""
Benchmark 5, the proxy (issue #12): a login through the proxy against a direct XOAUTH2
login to the same Dovecot, a large FETCH and a large submission through the proxy
against direct, and the daemon's memory and CPU with many idle IMAP sessions.

Every round measures direct and through the proxy back to back, in alternating order;
the report judges the median of the rounds' ratios (bench/judge.py). Runs the
end-to-end suite's servers (tests/e2e/mailservers.py: the development provider,
Dovecot, an SMTP sink), with two changes for the bench only: Dovecot allows as many
connections per user and address as the idle sessions need
(mail_max_userip_connections; the e2e suite keeps Dovecot's 10), and the sink takes
messages larger than the submission (the e2e sink's SIZE is 10 MB).

    bench/.venv/bin/python bench/proxy.py [--rounds 5] [--fetch-mb 100] [--idle 1000] ...

writes the figures as JSON on stdout; `bench/run.py --only proxy` runs it within the bench.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import imaplib
import json
import os
import shutil
import smtplib
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from common import Install, cpu_seconds, log, memory

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from e2e.mailservers import (  # noqa: E402
    Dovecot,
    ProviderProcess,
    SmtpSink,
    free_port,
    missing_packages,
)

USER = "alice@example.com"
PASSWORD = "bench local password"  # noqa: S105 (the bench's own local password)
# The proxy admits at most 64 connections from one address (proxy/common.py,
# MAX_PER_SOURCE): the idle sessions come from several loopback addresses, as a LAN
# gateway's devices would.
PER_SOURCE = 60


def missing() -> str:
    """Why the proxy cannot be benchmarked here, or ''."""
    absent = [p for p in missing_packages() if p in ("dovecot-imapd", "dovecot-submissiond")]
    return f"missing Debian packages: {', '.join(absent)}" if absent else ""


class Stack:
    """The provider, the sink, Dovecot and a mailoauthd with a [proxy] table."""

    def __init__(self, install: Install, root: Path, cleanup: contextlib.ExitStack, *, idle: int):
        self.install = install
        root.mkdir(parents=True, exist_ok=True)
        # Dovecot reads the mail as an unprivileged user: the way down must be open.
        for directory in (root.parent, root):
            directory.chmod(0o755)
        self.provider = ProviderProcess(access_token_lifetime=3600)
        cleanup.callback(self.provider.stop)
        self.sink = SmtpSink(size_limit=1 << 30)
        self.sink.start()
        cleanup.callback(self.sink.stop)
        self.dovecot = Dovecot(
            root / "dovecot",
            introspection_url=self.provider.endpoints["introspection_endpoint"],
            relay_port=self.sink.port,
        )
        limit = idle + 100
        with self.dovecot.config.open("a") as config:
            config.write(
                f"# The bench's idle sessions: {idle} at once from one user.\n"
                f"default_process_limit = {limit}\n"
                f"default_client_limit = {4 * limit}\n"
                f"protocol imap {{\n  mail_max_userip_connections = {limit}\n}}\n"
            )
        self.dovecot.seed(USER, "seeded for the bench")  # the mailbox, as the e2e suite's
        cleanup.callback(self.dovecot.stop)
        self.dovecot.start()
        daemon_dir = root / "daemon"
        daemon_dir.mkdir()
        (daemon_dir / "client-secret").write_text("demo-secret\n")
        (daemon_dir / "work.proxy").write_text(PASSWORD + "\n")
        self.imap_port, self.smtp_port = free_port(), free_port()
        self.socket = daemon_dir / "run" / "socket"
        e = self.provider.endpoints
        d = self.dovecot
        config = daemon_dir / "config.toml"
        config.write_text(f"""\
[daemon]
state_dir = "{daemon_dir / "state"}"
socket = "{self.socket}"

[providers.dev]
client_id = "demo-client"
client_secret_file = "{daemon_dir / "client-secret"}"
token_endpoint = "{e["token_endpoint"]}"

[accounts.work]
provider = "dev"
username = "{USER}"
tls_ca_file = "{d.cert}"
proxy_password_file = "{daemon_dir / "work.proxy"}"
imap_server = "127.0.0.1:{d.imaps_port}"
imap_security = "tls"
smtp_server = "127.0.0.1:{d.submission_port}"
smtp_security = "starttls"

[proxy]
imap = "127.0.0.1:{self.imap_port}"
smtp = "127.0.0.1:{self.smtp_port}"
""")
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        self.log = (daemon_dir / "daemon.log").open("ab")
        cleanup.callback(self.log.close)
        self.daemon = subprocess.Popen(
            [str(install.mailoauthd), "--config", str(config)],
            stdout=self.log,
            stderr=self.log,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        cleanup.callback(self._stop)
        self._wait_ready()
        grant = self.provider.issue_refresh_token(USER)
        imported = self.helper("import", "work", stdin=grant + "\n")
        assert imported.returncode == 0, imported.stderr

    def helper(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.install.mailoauth), "--socket", str(self.socket), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.daemon.poll() is not None:
                raise RuntimeError(f"mailoauthd exited {self.daemon.returncode}")
            if self.socket.exists() and self.helper("status").returncode == 0:
                return
            time.sleep(0.05)
        raise RuntimeError("mailoauthd not ready in 30 s")

    def _stop(self) -> None:
        if self.daemon.poll() is None:
            self.daemon.terminate()
            try:
                self.daemon.wait(10)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()

    def token(self) -> str:
        run = self.helper("token", "work")
        assert run.returncode == 0, run.stderr
        return run.stdout.strip()

    def direct_imap(self, bearer: str = "") -> imaplib.IMAP4_SSL:
        context = ssl.create_default_context(cafile=str(self.dovecot.cert))
        client = imaplib.IMAP4_SSL("127.0.0.1", self.dovecot.imaps_port, ssl_context=context)
        xoauth2 = f"user={USER}\x01auth=Bearer {bearer or self.token()}\x01\x01".encode()
        client.authenticate("XOAUTH2", lambda _: xoauth2)
        return client

    def proxied_imap(self, source: str = "127.0.0.1") -> imaplib.IMAP4:
        port = self.imap_port

        class FromSource(imaplib.IMAP4):
            def _create_socket(self, timeout: float | None) -> socket.socket:
                return socket.create_connection(
                    (self.host, self.port), timeout, source_address=(source, 0)
                )

        client = FromSource("127.0.0.1", port, timeout=60)
        client.login("work", PASSWORD)
        return client

    def submit(self, message: bytes, *, proxy: bool) -> float:
        if proxy:
            s = smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=300)
            s.login("work", PASSWORD)
        else:
            s = smtplib.SMTP("127.0.0.1", self.dovecot.submission_port, timeout=300)
            s.starttls(context=ssl.create_default_context(cafile=str(self.dovecot.cert)))
            s.ehlo()
            xoauth2 = f"user={USER}\x01auth=Bearer {self.token()}\x01\x01".encode()
            code, _ = s.docmd("AUTH", "XOAUTH2 " + base64.b64encode(xoauth2).decode())
            assert code == 235, code
        seconds = timed(lambda: s.sendmail(USER, ["bob@example.org"], message))
        s.quit()
        self.sink.messages.clear()
        return seconds


def timed(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def message(subject: str, megabytes: float) -> bytes:
    lines = int(megabytes * 1e6) // 1000
    return f"Subject: {subject}\r\n\r\n".encode() + (b"x" * 998 + b"\r\n") * lines


@contextlib.contextmanager
def _sessions() -> Iterator[list[imaplib.IMAP4]]:
    opened: list[imaplib.IMAP4] = []
    try:
        yield opened
    finally:
        for c in opened:
            with contextlib.suppress(Exception):
                c.shutdown()


def run(
    install: Install,
    base: Path,
    *,
    rounds: int,
    logins: int,
    fetch_mb: float,
    submit_mb: float,
    idle: int,
    idle_seconds: float,
) -> dict[str, Any]:
    """The figures of benchmark 5 (the JSON that report.py renders)."""
    why = missing()
    if why:
        return {"skipped": why}
    with contextlib.ExitStack() as cleanup:
        stack = Stack(install, base, cleanup, idle=idle)
        log(f"proxy: Dovecot and mailoauthd up; {rounds} rounds")

        def login(proxy: bool) -> float:
            if proxy:
                return timed(lambda: stack.proxied_imap().logout())
            bearer = stack.token()  # what a mail program's command gets: not timed
            return timed(lambda: stack.direct_imap(bearer).logout())

        body = message("big", fetch_mb)
        c = stack.direct_imap()
        c.append("INBOX", None, None, body)
        c.select("INBOX", readonly=True)
        number = c.search(None, "SUBJECT", '"big"')[1][0].split()[-1]
        c.logout()
        mail = message("big submission", submit_mb)

        def fetch(proxy: bool) -> float:
            c = stack.proxied_imap() if proxy else stack.direct_imap()
            c.select("INBOX", readonly=True)
            seconds = timed(lambda: c.fetch(number, "(BODY.PEEK[])"))
            c.logout()
            return seconds

        login(False), login(True), fetch(False), fetch(True)  # warm up
        per_round: list[dict[str, Any]] = []
        for r in range(rounds):
            order = (False, True) if r % 2 == 0 else (True, False)
            figures: dict[str, Any] = {"direct": {}, "proxy": {}}
            for proxy in order:
                who = figures["proxy" if proxy else "direct"]
                who["login_ms"] = statistics.median(login(proxy) for _ in range(logins)) * 1000
            for proxy in order:
                who = figures["proxy" if proxy else "direct"]
                who["fetch_mb_s"] = len(body) / 1e6 / fetch(proxy)
            for proxy in order:
                who = figures["proxy" if proxy else "direct"]
                who["submit_mb_s"] = len(mail) / 1e6 / stack.submit(mail, proxy=proxy)
            per_round.append(figures)
            through, direct = figures["proxy"]["fetch_mb_s"], figures["direct"]["fetch_mb_s"]
            log(f"proxy: round {r + 1}/{rounds}: FETCH {through:.0f} vs {direct:.0f} MB/s")

        pid = stack.daemon.pid
        before = memory(pid)["VmRSS"]
        sources = [f"127.0.0.{2 + i // PER_SOURCE}" for i in range(idle)]

        def open_idle(source: str) -> imaplib.IMAP4:
            c = stack.proxied_imap(source)
            c.select("INBOX", readonly=True)
            c.send(b"i IDLE\r\n")
            assert c.readline().startswith(b"+"), "IDLE refused"
            return c

        with _sessions() as opened:
            started = time.monotonic()
            with ThreadPoolExecutor(8) as pool:
                opened += pool.map(open_idle, sources)
            opening_s = time.monotonic() - started
            after = memory(pid)["VmRSS"]
            cpu = cpu_seconds(pid)
            time.sleep(idle_seconds)
            idle_cpu = cpu_seconds(pid) - cpu
            # Every session still answers: IDLE ended, NOOP through the proxy.
            alive = 0
            for c in opened:
                with contextlib.suppress(Exception):
                    c.send(b"DONE\r\n")
                    if c.readline().startswith(b"i OK"):
                        alive += 1
        log(f"proxy: {idle} idle sessions: RSS +{(after - before) / 1e6:.1f} MB")
        return {
            "rounds": per_round,
            "fetch_bytes": len(body),
            "submit_bytes": len(mail),
            "logins_per_round": logins,
            "idle": {
                "sessions": idle,
                "sources": len(set(sources)),
                "opening_s": opening_s,
                "rss_before_bytes": before,
                "rss_after_bytes": after,
                "idle_seconds": idle_seconds,
                "cpu_s": idle_cpu,
                "alive": alive,
            },
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--logins", type=int, default=10)
    parser.add_argument("--fetch-mb", type=float, default=100)
    parser.add_argument("--submit-mb", type=float, default=25)
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--idle-seconds", type=float, default=10)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="mob-proxy-", dir="/tmp"))
    try:
        figures = run(
            Install(Path(sys.executable).parent),
            base / "proxy",
            rounds=args.rounds,
            logins=args.logins,
            fetch_mb=args.fetch_mb,
            submit_mb=args.submit_mb,
            idle=args.idle,
            idle_seconds=args.idle_seconds,
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
