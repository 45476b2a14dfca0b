"""
Real servers for the end-to-end suite, all on 127.0.0.1: the development provider as a
subprocess, Dovecot 2.3 (IMAP + submission, oauth2 passdb) in a temp dir, and an SMTP sink.
"""

# ruff: noqa: S310  (urlopen of the development provider's own http://127.0.0.1 URLs)

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Every program the suite runs, and the Debian package that has it.
PROGRAMS = {
    "dovecot": "dovecot-imapd",
    "/usr/lib/dovecot/submission": "dovecot-submissiond",
    "/usr/lib/dovecot/pop3": "dovecot-pop3d",
    "fetchmail": "fetchmail",
    "/usr/sbin/postmap": "postfix",
    "msmtp": "msmtp",
    "mbsync": "isync",
    "neomutt": "neomutt",
    "offlineimap": "offlineimap3",
    "getmail": "getmail6",
    "curl": "curl",
    "openssl": "openssl",
}
SASL_XOAUTH2 = "libsasl2-modules-kdexoauth2"  # mbsync's XOAUTH2, a Cyrus SASL plugin


def missing_packages() -> list[str]:
    """The Debian packages the suite needs that are not installed here."""
    missing = [
        package
        for program, package in PROGRAMS.items()
        if not (os.path.exists(program) if program.startswith("/") else shutil.which(program))
    ]
    if not list(Path("/usr/lib").glob("*/sasl2/libkdexoauth2.so*")):
        missing.append(SASL_XOAUTH2)
    return sorted(set(missing))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.02)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {seconds} s")


class ProviderProcess:
    """`python -m mailoauthd.testing` as a subprocess, driven through /admin/... over HTTP."""

    def __init__(self, *, access_token_lifetime: float) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mailoauthd.testing",
                "--port",
                "0",
                "--access-token-lifetime",
                str(access_token_lifetime),
            ],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"devprovider exited {self.proc.wait()}")
        info = json.loads(line)
        self.url: str = info.pop("url")
        self.endpoints: dict[str, str] = info

    def _post(self, path: str, body: object) -> Any:
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"null")

    def issue_refresh_token(self, user: str) -> str:
        return str(self._post("/admin/issue", {"user": user})["refresh_token"])

    def revoke_user(self, user: str) -> None:
        self._post("/admin/revoke", {"user": user})

    def set_options(self, **options: object) -> None:
        self._post("/admin/options", options)

    def introspections(self) -> int:
        """How many times a server asked whether a token is valid."""
        with urllib.request.urlopen(self.url + "/admin/requests", timeout=10) as response:
            return sum(1 for r in json.loads(response.read()) if r["path"] == "/introspect")

    def active(self, token: str) -> bool:
        """What the provider tells a server about `token` (RFC 7662)."""
        data = f"token={token}".encode()
        with urllib.request.urlopen(self.url + "/introspect", data=data, timeout=10) as response:
            return bool(json.loads(response.read())["active"])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@dataclass
class Received:
    mail_from: str
    rcpt_to: list[str]
    data: bytes


@dataclass
class SmtpSink:
    """A throwaway SMTP server on 127.0.0.1 that keeps what Dovecot relays to it."""

    messages: list[Received] = field(default_factory=list)
    port: int = 0
    # What EHLO advertises (SIZE), and Dovecot's submission passes on to its clients.
    size_limit: int = 10485760

    def start(self) -> None:
        sink = self

        class Handler(socketserver.StreamRequestHandler):
            timeout = 30

            def reply(self, line: str) -> None:
                self.wfile.write(line.encode() + b"\r\n")
                self.wfile.flush()

            def handle(self) -> None:
                self.reply("220 sink.localhost ESMTP e2e sink")
                mail_from, rcpts = "", list[str]()
                while line := self.rfile.readline(65536):
                    verb = line[:4].upper()
                    if verb in (b"EHLO", b"HELO", b"LHLO"):
                        self.reply(
                            f"250-sink.localhost\r\n250-8BITMIME\r\n250 SIZE {sink.size_limit}"
                        )
                    elif verb == b"MAIL":
                        mail_from, rcpts = line.decode().split(":", 1)[1].strip(), []
                        self.reply("250 2.1.0 Ok")
                    elif verb == b"RCPT":
                        rcpts.append(line.decode().split(":", 1)[1].strip())
                        self.reply("250 2.1.5 Ok")
                    elif verb == b"DATA":
                        self.reply("354 End data with <CR><LF>.<CR><LF>")
                        body = bytearray()  # bytes += would copy the message per line
                        while (chunk := self.rfile.readline(1 << 20)) not in (b".\r\n", b""):
                            body += chunk[1:] if chunk.startswith(b"..") else chunk
                        sink.messages.append(Received(mail_from, rcpts, bytes(body)))
                        self.reply("250 2.0.0 Ok: queued")
                    elif verb == b"QUIT":
                        self.reply("221 2.0.0 Bye")
                        return
                    elif verb in (b"RSET", b"NOOP"):
                        self.reply("250 2.0.0 Ok")
                    else:
                        self.reply("502 5.5.2 Command not recognized")

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def subjects(self) -> list[str]:
        found = []
        for message in self.messages:
            for line in message.data.decode(errors="replace").splitlines():
                if line.lower().startswith("subject:"):
                    found.append(line.split(":", 1)[1].strip())
        return found


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost; clients trust it as their CA."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
            "-subj", "/CN=localhost",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    return cert, key


class Dovecot:
    """Dovecot 2.3 with its own config in `root`: IMAPS, IMAP+STARTTLS, submission, oauth2."""

    def __init__(
        self,
        root: Path,
        *,
        introspection_url: str,
        relay_port: int,
        mechanisms: str = "xoauth2 oauthbearer",
    ) -> None:
        self.root = root
        root.mkdir(mode=0o755)
        self.imaps_port, self.imap_port, self.submission_port = (
            free_port(),
            free_port(),
            free_port(),
        )
        self.pop3_port = free_port()
        self.cert, key = make_certificate(root)
        self.log = root / "dovecot.log"
        self.homes = root / "home"
        self.homes.mkdir()
        # Mail is kept by an unprivileged user: Dovecot refuses uid 0 for mail access.
        self.mail_user = "nobody" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        me = pwd.getpwnam(self.mail_user)
        self.uid, self.gid = me.pw_uid, me.pw_gid
        unprivileged = ""
        if os.geteuid() != 0:
            # A developer's own Dovecot: every process runs as them.
            unprivileged = (
                f"default_internal_user = {self.mail_user}\n"
                f"default_login_user = {self.mail_user}\n"
                f"default_internal_group = {me.pw_gid}\n"
            )
        oauth2 = root / "dovecot-oauth2.conf.ext"
        oauth2.write_text(
            "introspection_mode = post\n"
            f"introspection_url = {introspection_url}\n"
            "username_attribute = username\n"
            "active_attribute = active\n"
            "active_value = true\n"
        )
        self.config = root / "dovecot.conf"
        self.config.write_text(f"""\
base_dir = {root}/run
state_dir = {root}/state
instance_name = mailoauthd-e2e-{self.imaps_port}
log_path = {self.log}
{unprivileged}protocols = imap submission pop3
listen = 127.0.0.1
hostname = localhost
ssl = yes
ssl_cert = <{self.cert}
ssl_key = <{key}
auth_mechanisms = {mechanisms}
auth_verbose = yes
# Refusals answer at once: the suite checks many of them.
auth_failure_delay = 0
mail_location = maildir:~/Maildir
first_valid_uid = {self.uid}
passdb {{
  driver = oauth2
  mechanisms = {mechanisms}
  args = {oauth2}
}}
userdb {{
  driver = static
  args = uid={self.uid} gid={self.gid} home={self.homes}/%u
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {self.imaps_port}
    ssl = yes
  }}
}}
service submission-login {{
  inet_listener submission {{
    address = 127.0.0.1
    port = {self.submission_port}
  }}
}}
service anvil {{
  chroot =
}}
service imap-login {{
  chroot =
}}
service submission-login {{
  chroot =
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {self.pop3_port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
  chroot =
}}
submission_relay_host = 127.0.0.1
submission_relay_port = {relay_port}
submission_relay_trusted = yes
""")
        for name in ("run", "state"):
            (root / name).mkdir()
        self.proc: subprocess.Popen[bytes] | None = None

    def seed(self, user: str, subject: str) -> None:
        """Put one message in `user`'s INBOX."""
        maildir = self.homes / user / "Maildir"
        for sub in ("cur", "new", "tmp"):
            (maildir / sub).mkdir(parents=True, exist_ok=True)
        (maildir / "new" / f"{time.time_ns()}.seed.localhost").write_text(
            f"From: seeder@example.net\nTo: {user}\nSubject: {subject}\n"
            "Message-ID: <seed@example.net>\n\nA message for the end-to-end suite.\n"
        )
        for path in [self.homes, *self.homes.rglob("*")]:
            os.chown(path, self.uid, self.gid)

    def start(self) -> None:
        with (self.root / "dovecot.stderr").open("wb") as stderr:
            self.proc = subprocess.Popen(
                ["dovecot", "-F", "-c", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        for port in (self.imaps_port, self.imap_port, self.submission_port, self.pop3_port):
            try:
                wait_for_port(port)
            except AssertionError:
                raise AssertionError(f"Dovecot did not start: {self.log_text()}") from None

    def log_text(self) -> str:
        text = ""
        for path in (self.root / "dovecot.stderr", self.log):
            if path.exists():
                text += path.read_text(errors="replace")
        return text

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
