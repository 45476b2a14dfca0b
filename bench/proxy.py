"""
The proxy's costs (docs/proxy.md, "Performance"): a login through the proxy against a
direct XOAUTH2 login to the same Dovecot, a large FETCH and a large submission through
the proxy against direct, and the daemon's memory and CPU with many idle sessions.

Runs the end-to-end suite's stack (tests/e2e: the development provider, Dovecot, an SMTP
sink) and a mailoauthd with a [proxy] table; needs the same Debian packages, and root
(Dovecot). Prints Markdown; figures depend on the machine, so it says which.

    .venv/bin/python bench/proxy.py [--logins 30] [--fetch-mb 100] [--submit-mb 9] [--idle 9]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import imaplib
import os
import platform
import shutil
import smtplib
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import USER, DaemonProcess, config_text, helper  # noqa: E402
from e2e.conftest import ACCOUNT_TIMING, DAEMON_KEYS, Stack  # noqa: E402
from e2e.mailservers import free_port  # noqa: E402

PASSWORD = "bench local password"  # noqa: S105 (the bench's own local password)


@contextlib.contextmanager
def proxy_daemon(stack: Stack) -> Iterator[tuple[DaemonProcess, Path, int, int]]:
    root = Path(tempfile.mkdtemp(prefix="proxy-bench-", dir=stack.root))
    (root / "work.proxy").write_text(PASSWORD + "\n")
    d = stack.dovecot
    imap, smtp = free_port(), free_port()
    keys = "\n".join(
        (
            ACCOUNT_TIMING,
            f'tls_ca_file = "{d.cert}"',
            'proxy_password_file = "work.proxy"',
            f'imap_server = "127.0.0.1:{d.imaps_port}"',
            'imap_security = "tls"',
            f'smtp_server = "127.0.0.1:{d.submission_port}"',
            'smtp_security = "starttls"',
        )
    )
    text = config_text(root, stack.provider, daemon_keys=DAEMON_KEYS, account_keys=keys)  # type: ignore[arg-type]
    text += f'\n[proxy]\nimap = "127.0.0.1:{imap}"\nsmtp = "127.0.0.1:{smtp}"\n'
    (root / "config.toml").write_text(text)
    socket_path = root / "run" / "socket"
    daemon = DaemonProcess(root / "config.toml", socket_path, root / "daemon.log")
    try:
        daemon.wait_ready()
        token = stack.provider.issue_refresh_token(USER)
        assert helper("import", "work", socket=socket_path, stdin=token + "\n").returncode == 0
        yield daemon, socket_path, imap, smtp
    finally:
        daemon.stop()


def token(socket_path: Path) -> str:
    run = helper("token", "work", socket=socket_path)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


def direct_imap(stack: Stack, socket_path: Path, bearer: str = "") -> imaplib.IMAP4_SSL:
    context = ssl.create_default_context(cafile=str(stack.dovecot.cert))
    client = imaplib.IMAP4_SSL("127.0.0.1", stack.dovecot.imaps_port, ssl_context=context)
    xoauth2 = f"user={USER}\x01auth=Bearer {bearer or token(socket_path)}\x01\x01".encode()
    client.authenticate("XOAUTH2", lambda _: xoauth2)
    return client


def proxied_imap(port: int) -> imaplib.IMAP4:
    client = imaplib.IMAP4("127.0.0.1", port)
    client.login("work", PASSWORD)
    return client


def timed(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logins", type=int, default=30)
    parser.add_argument("--fetch-mb", type=int, default=100)
    # The e2e sink advertises SIZE 10485760, and Dovecot passes that limit on.
    parser.add_argument("--submit-mb", type=int, default=9)
    # The e2e Dovecot allows 10 connections per user and address (mail_max_userip_connections).
    parser.add_argument("--idle", type=int, default=9)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mailoauthd-bench-proxy-"))
    root.chmod(0o755)
    lines = [f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"]
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, root, ignore_errors=True)
        stack = Stack(root, cleanup)
        daemon, socket_path, imap_port, smtp_port = cleanup.enter_context(proxy_daemon(stack))
        pid = daemon.proc.pid

        def login_direct() -> float:
            bearer = token(socket_path)  # what the mail program's command gets: not timed
            return timed(lambda: direct_imap(stack, socket_path, bearer).logout())

        def login_proxied() -> float:
            return timed(lambda: proxied_imap(imap_port).logout())

        login_direct(), login_proxied()  # warm up
        direct = statistics.median(login_direct() for _ in range(args.logins))
        proxied = statistics.median(login_proxied() for _ in range(args.logins))
        lines.append(
            f"| login, median of {args.logins} | direct XOAUTH2 (TLS) {direct * 1000:.1f} ms | "
            f"through the proxy {proxied * 1000:.1f} ms | ratio {proxied / direct:.2f} |"
            " (the direct login without getting the token)"
        )

        body = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * (
            args.fetch_mb * 1024 * 1024 // 1000
        )
        client = direct_imap(stack, socket_path)
        client.append("INBOX", None, None, body)
        client.select("INBOX", readonly=True)
        number = client.search(None, "SUBJECT", '"big"')[1][0].split()[-1]
        client.logout()

        def fetch(make: Callable[[], imaplib.IMAP4]) -> float:
            c = make()
            c.select("INBOX", readonly=True)
            seconds = timed(lambda: c.fetch(number, "(BODY.PEEK[])"))
            c.logout()
            return seconds

        direct = min(fetch(lambda: direct_imap(stack, socket_path)) for _ in range(3))
        proxied = min(fetch(lambda: proxied_imap(imap_port)) for _ in range(3))
        size = len(body) / 1e6
        lines.append(
            f"| FETCH of {size:.0f} MB, best of 3 | direct {size / direct:.0f} MB/s | "
            f"through the proxy {size / proxied:.0f} MB/s | ratio {direct / proxied:.2f} |"
        )

        message = b"Subject: big submission\r\n\r\n" + (b"y" * 998 + b"\r\n") * (
            args.submit_mb * 1024 * 1024 // 1000
        )

        def submit(proxy: bool) -> float:
            if proxy:
                s = smtplib.SMTP("127.0.0.1", smtp_port, timeout=300)
                s.login("work", PASSWORD)
            else:
                s = smtplib.SMTP("127.0.0.1", stack.dovecot.submission_port, timeout=300)
                s.starttls(context=ssl.create_default_context(cafile=str(stack.dovecot.cert)))
                s.ehlo()
                xoauth2 = f"user={USER}\x01auth=Bearer {token(socket_path)}\x01\x01".encode()
                code, _ = s.docmd("AUTH", "XOAUTH2 " + base64.b64encode(xoauth2).decode())
                assert code == 235, code
            seconds = timed(lambda: s.sendmail(USER, ["bob@example.org"], message))
            s.quit()
            return seconds

        direct = min(submit(False) for _ in range(2))
        proxied = min(submit(True) for _ in range(2))
        size = len(message) / 1e6
        lines.append(
            f"| submission of {size:.0f} MB, best of 2 | direct {size / direct:.0f} MB/s | "
            f"through the proxy {size / proxied:.0f} MB/s | ratio {direct / proxied:.2f} |"
        )
        stack.sink.messages.clear()

        before_rss, sessions = rss_kib(pid), []
        for _ in range(args.idle):
            c = proxied_imap(imap_port)
            c.select("INBOX", readonly=True)
            c.send(b"i IDLE\r\n")
            c.readline()
            sessions.append(c)
        after_rss = rss_kib(pid)
        cpu = cpu_seconds(pid)
        time.sleep(10)
        idle_cpu = cpu_seconds(pid) - cpu
        grown = after_rss - before_rss
        lines.append(
            f"| {args.idle} idle IMAP sessions (IDLE) | daemon RSS +{grown} KiB "
            f"({grown / args.idle:.0f} KiB each), {after_rss // 1024} MiB in all | "
            f"CPU over 10 s idle {idle_cpu:.2f} s | |"
        )
        for c in sessions:
            with contextlib.suppress(Exception):
                c.shutdown()
        subprocess.run(["sync"], check=False)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
