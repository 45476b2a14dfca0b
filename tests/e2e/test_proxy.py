"""
The proxy (mailoauthd/proxy) with real programs: Python's imaplib/poplib/smtplib, msmtp,
Debian's fetchmail and Postfix, against the suite's OAuth-only Dovecot. The daemon here
is a second `mailoauthd` with a [proxy] table, sharing the suite's provider and Dovecot.
"""

from __future__ import annotations

import base64
import imaplib
import json
import poplib
import smtplib
import ssl
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import USER, DaemonProcess, config_text, helper

from .conftest import ACCOUNT_TIMING, DAEMON_KEYS, REALISTIC_TOKEN_LENGTH, Stack
from .mailservers import free_port, make_certificate

pytestmark = pytest.mark.slow

PASSWORD = "local proxy password"  # noqa: S105 (the test's local password)
RECIPIENT = "bob@example.org"


@dataclass
class Proxied:
    stack: Stack
    root: Path
    daemon: DaemonProcess
    socket: Path
    imap: int
    pop3: int
    smtp: int
    lan_imap: int
    socketmap: Path
    cert: Path
    dead_port: int

    def grant(self, account: str = "work", token_length: int = 48) -> None:
        """A fresh grant for `account` (a refresh token of the suite's user)."""
        self.stack.provider.set_options(access_token_length=token_length)
        refresh_token = self.stack.provider.issue_refresh_token(USER)
        run = helper("import", account, socket=self.socket, stdin=refresh_token + "\n")
        assert run.returncode == 0, run.stderr

    def token(self, account: str = "work") -> str:
        run = helper("token", account, socket=self.socket)
        assert run.returncode == 0, run.stderr
        return run.stdout.strip()

    def status(self) -> dict[str, object]:
        run = helper("status", "--json", socket=self.socket)
        assert run.returncode == 0, run.stderr
        return json.loads(run.stdout)  # type: ignore[no-any-return]

    def events(self, event: str) -> list[dict[str, object]]:
        return [e for e in self.daemon.events() if e.get("event") == event]


@pytest.fixture(scope="module")
def proxied(stack: Stack) -> Iterator[Proxied]:
    """A mailoauthd with IMAP, POP3 and SMTP listeners and a socketmap, and a grant."""
    root = stack.root / f"proxy-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    root.chmod(0o755)
    cert, key = make_certificate(root)
    (root / "work.proxy").write_text(PASSWORD + "\n")
    d = stack.dovecot
    imap, pop3, smtp, lan_imap, dead = (free_port() for _ in range(5))
    common = "\n".join(
        (
            ACCOUNT_TIMING,
            f'tls_ca_file = "{d.cert}"',
            'proxy_password_file = "work.proxy"',
        )
    )
    servers = "\n".join(
        (
            f'imap_server = "127.0.0.1:{d.imaps_port}"',
            'imap_security = "tls"',
            f'smtp_server = "127.0.0.1:{d.submission_port}"',
            'smtp_security = "starttls"',
            f'pop3_server = "127.0.0.1:{d.pop3_port}"',
            'pop3_security = "starttls"',
        )
    )
    text = config_text(
        root,
        stack.provider,  # type: ignore[arg-type]
        daemon_keys=DAEMON_KEYS,
        account_keys=common
        + "\n"
        + servers
        + f'\nsocketmap_keys = ["[127.0.0.1]:{smtp}", "smtp.example.net"]',
    )
    # An upstream that is down, and one that refuses the token (a user name other than
    # the one the grant is for, as with a mailbox whose IMAP access is disabled).
    text += f"""
[accounts.down]
provider = "dev"
username = "down@example.com"
{common}
imap_server = "127.0.0.1:{dead}"
smtp_server = "127.0.0.1:{dead}"
pop3_server = "127.0.0.1:{dead}"

[accounts.refused]
provider = "dev"
username = "nobody-here@example.com"
{common}
{servers}

[proxy]
imap = "127.0.0.1:{imap}"
pop3 = "127.0.0.1:{pop3}"
smtp = "127.0.0.1:{smtp}"
socketmap = "{root / "run" / "socketmap"}"
tls_certificate_file = "{cert}"
tls_key_file = "{key}"
"""
    config_path = root / "config.toml"
    config_path.write_text(text)
    socket_path = root / "run" / "socket"
    daemon = DaemonProcess(config_path, socket_path, root / "daemon.log")
    try:
        daemon.wait_ready()
        proxied = Proxied(
            stack, root, daemon, socket_path, imap, pop3, smtp, lan_imap,
            root / "run" / "socketmap", cert, dead,
        )  # fmt: skip
        for account in ("work", "down", "refused"):
            proxied.grant(account)
        yield proxied
    finally:
        daemon.stop()


def fresh(proxied: Proxied) -> None:
    """After a test that broke the grant: a new one."""
    proxied.grant()


# --- the clients -----------------------------------------------------------------------


def test_imaplib_login_fetches_the_seeded_message(proxied: Proxied) -> None:
    """imaplib's LOGIN with the account's name and local password reads the mailbox."""
    with imaplib.IMAP4("127.0.0.1", proxied.imap, timeout=20) as client:
        assert "AUTH=PLAIN" in client.capabilities
        client.login("work", PASSWORD)
        client.select("INBOX", readonly=True)
        _, found = client.search(None, "SUBJECT", f'"{proxied.stack.seeded_subject}"')
        assert found[0].split(), "the seeded message is not there"
        _, data = client.fetch(found[0].split()[0], "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert proxied.stack.seeded_subject.encode() in data[0][1]  # type: ignore[index]
    rows = {r["account"]: r for r in proxied.status()["accounts"]}  # type: ignore[attr-defined]
    assert rows["work"]["proxy_sessions_total"] >= 1


def test_imap_authenticate_plain_with_the_username(proxied: Proxied) -> None:
    """AUTHENTICATE PLAIN (SASL-IR) with the mailbox address as user name."""
    with imaplib.IMAP4("127.0.0.1", proxied.imap, timeout=20) as client:
        client.authenticate("PLAIN", lambda _: f"\0{USER}\0{PASSWORD}".encode())
        assert client.select("INBOX", readonly=True)[0] == "OK"


def test_imap_starttls_with_a_realistic_token(proxied: Proxied) -> None:
    """STARTTLS to the proxy; a 2,000-character token goes upstream all the same."""
    proxied.grant(token_length=REALISTIC_TOKEN_LENGTH)
    try:
        context = ssl.create_default_context(cafile=str(proxied.cert))
        with imaplib.IMAP4("127.0.0.1", proxied.imap, timeout=20) as client:
            client.starttls(context)
            client.login("work", PASSWORD)
            assert client.select("INBOX", readonly=True)[0] == "OK"
    finally:
        fresh(proxied)


def test_smtplib_sends_through_the_proxy(proxied: Proxied) -> None:
    """smtplib's AUTH (PLAIN, then LOGIN) and a message that reaches the sink."""
    for mechanism in ("PLAIN", "LOGIN"):
        subject = f"smtplib {mechanism} {uuid.uuid4()}"
        with smtplib.SMTP("127.0.0.1", proxied.smtp, timeout=20) as client:
            client.ehlo("client.example")
            client.user, client.password = "work", PASSWORD
            code, _ = client.auth(mechanism, getattr(client, f"auth_{mechanism.lower()}"))
            assert code == 235
            client.sendmail(USER, [RECIPIENT], f"Subject: {subject}\r\n\r\nbody\r\n")
        _wait_for_sink(proxied, subject)


def test_smtp_long_token_goes_on_a_continuation_line(proxied: Proxied) -> None:
    """Dovecot submission refuses AUTH lines over 1,026 bytes: a 2 KB token still works."""
    proxied.grant(token_length=REALISTIC_TOKEN_LENGTH)
    try:
        subject = f"long token {uuid.uuid4()}"
        with smtplib.SMTP("127.0.0.1", proxied.smtp, timeout=20) as client:
            client.login("work", PASSWORD)
            client.sendmail(USER, [RECIPIENT], f"Subject: {subject}\r\n\r\nbody\r\n")
        _wait_for_sink(proxied, subject)
    finally:
        fresh(proxied)


def test_poplib_user_pass_and_auth_plain(proxied: Proxied) -> None:
    """USER/PASS, and AUTH PLAIN after STLS, list and read the mailbox."""
    client = poplib.POP3("127.0.0.1", proxied.pop3, timeout=20)
    try:
        client.user("work")
        client.pass_(PASSWORD)
        count, _ = client.stat()
        assert count >= 1
        assert any(
            proxied.stack.seeded_subject.encode() in line
            for number in range(1, count + 1)
            for line in client.top(number, 0)[1]
        )
    finally:
        client.quit()
    client = poplib.POP3("127.0.0.1", proxied.pop3, timeout=20)
    try:
        client.stls(ssl.create_default_context(cafile=str(proxied.cert)))
        response = base64.b64encode(f"\0work\0{PASSWORD}".encode()).decode()
        assert client._shortcmd(f"AUTH PLAIN {response}").startswith(b"+OK")  # type: ignore[attr-defined]
        assert client.stat()[0] >= 1
    finally:
        client.quit()


def _wait_for_sink(proxied: Proxied, subject: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while subject not in proxied.stack.sink.subjects():
        assert time.monotonic() < deadline, f"{subject!r} did not reach the sink"
        time.sleep(0.05)
