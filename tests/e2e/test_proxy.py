"""
The proxy (mailoauthd/proxy) with real programs: Python's imaplib/poplib/smtplib, msmtp,
Debian's fetchmail and Postfix, against the suite's OAuth-only Dovecot. The daemon here
is a second `mailoauthd` with a [proxy] table, sharing the suite's provider and Dovecot.
"""

from __future__ import annotations

import base64
import contextlib
import imaplib
import json
import os
import poplib
import smtplib
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import USER, DaemonProcess, config_text, helper
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import ACCOUNT_TIMING, DAEMON_KEYS, REALISTIC_TOKEN_LENGTH, Stack, run_client
from .mailservers import free_port, make_certificate
from .postfix import Postfix
from .recipes import adapt, recipe

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
    # The account whose token is refused uses the suite's second Dovecot: Dovecot slows
    # down every login from an address after a failed one (2 s, 4 s, ... 15 s).
    servers, refusing = (
        "\n".join(
            (
                f'imap_server = "127.0.0.1:{dovecot.imaps_port}"',
                'imap_security = "tls"',
                f'smtp_server = "127.0.0.1:{dovecot.submission_port}"',
                'smtp_security = "starttls"',
                f'pop3_server = "127.0.0.1:{dovecot.pop3_port}"',
                'pop3_security = "starttls"',
            )
        )
        for dovecot in (d, stack.xoauth2_only())
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
{common.replace(str(d.cert), str(stack.xoauth2_only().cert))}
{refusing}

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


def test_msmtp_auth_plain_with_starttls(proxied: Proxied, tmp_path: Path) -> None:
    """msmtp with `auth plain` and the local password, STARTTLS to the proxy."""
    subject = f"msmtp via proxy {uuid.uuid4()}"
    rc = tmp_path / "msmtprc"
    rc.write_text(
        "defaults\ntls on\ntls_starttls on\n"
        f"tls_trust_file {proxied.cert}\n\naccount work\nhost 127.0.0.1\n"
        f"port {proxied.smtp}\nauth plain\nuser work\nfrom {USER}\n"
        f"password {PASSWORD}\n"
    )
    rc.chmod(0o600)
    run = run_client(
        ["msmtp", "-C", str(rc), "-a", "work", RECIPIENT],
        env=proxied.stack.env(tmp_path),
        input=f"From: {USER}\nTo: {RECIPIENT}\nSubject: {subject}\n\nbody\n",
    )
    assert run.returncode == 0, run.stderr
    _wait_for_sink(proxied, subject)


def _seeded_file(proxied: Proxied) -> bytes:
    """The seeded message as Dovecot keeps it."""
    maildir = proxied.stack.dovecot.homes / USER / "Maildir"
    for path in [*maildir.glob("cur/*"), *maildir.glob("new/*")]:
        if ".seed." in path.name:
            return path.read_bytes()
    raise AssertionError("the seeded message is gone")


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
def test_fetchmail_retrieves_through_the_proxy(
    proxied: Proxied, tmp_path: Path, protocol: str
) -> None:
    """Debian's fetchmail 6.4 with the recipe: the seeded message, through the MDA, intact."""
    out = tmp_path / "delivered"
    out.mkdir()
    port = proxied.imap if protocol == "imap" else proxied.pop3
    rc = adapt(
        recipe("proxy-fetchmail", f"fetchmailrc-{protocol}"),
        (f"service {1143 if protocol == 'imap' else 1110}", f"service {port}"),
        ('"the local proxy password"', f'"{PASSWORD}"'),
        # The test's certificate names localhost; fetchmail does not check IP addresses.
        ('"/etc/mailoauthd/proxy.crt"', f'"{proxied.cert}" sslcommonname "localhost"')
        if protocol == "pop3"
        else ("", ""),
        ('mda "/usr/bin/procmail -d %T"', f"mda \"/bin/sh -c 'cat > {out}/$$$$'\"\n    fetchall"),
    )
    path = tmp_path / "fetchmailrc"
    path.write_text(rc)
    path.chmod(0o600)
    run = run_client(
        [
            "fetchmail",
            "--nodetach",
            "--invisible",
            "-v",
            "-f",
            str(path),
            "-i",
            str(tmp_path / "ids"),
        ],
        env=proxied.stack.env(tmp_path),
        timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    if protocol == "pop3":
        assert "STARTTLS" in run.stdout + run.stderr or "STLS" in run.stdout + run.stderr
    seeded = _seeded_file(proxied)
    delivered = [p.read_bytes() for p in out.iterdir()]
    assert seeded in delivered, (seeded, delivered)


def _wait_for_sink(proxied: Proxied, subject: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while subject not in proxied.stack.sink.subjects():
        assert time.monotonic() < deadline, f"{subject!r} did not reach the sink"
        time.sleep(0.05)


# --- failures speak each protocol, and the next good login works -------------------------


def imap_login(proxied: Proxied, user: str = "work", password: str = PASSWORD) -> str:
    """'OK', or the proxy's answer to the login."""
    with imaplib.IMAP4("127.0.0.1", proxied.imap, timeout=30) as client:
        try:
            client.login(user, password)
        except imaplib.IMAP4.error as exc:
            return str(exc)
        assert client.select("INBOX", readonly=True)[0] == "OK"
        return "OK"


def pop3_login(proxied: Proxied, user: str = "work", password: str = PASSWORD) -> str:
    client = poplib.POP3("127.0.0.1", proxied.pop3, timeout=30)
    try:
        client.user(user)
        client.pass_(password)
        client.stat()
        return "OK"
    except poplib.error_proto as exc:
        return str(exc.args[0].decode() if isinstance(exc.args[0], bytes) else exc)
    finally:
        client.close()


def smtp_login(proxied: Proxied, user: str = "work", password: str = PASSWORD) -> str:
    with smtplib.SMTP("127.0.0.1", proxied.smtp, timeout=30) as client:
        client.ehlo("client.example")
        client.user, client.password = user, password
        try:
            code, _ = client.auth("PLAIN", client.auth_plain)
        except smtplib.SMTPAuthenticationError as exc:
            return f"{exc.smtp_code} {exc.smtp_error.decode()}"
        return "OK" if code == 235 else str(code)


LOGINS = {"imap": imap_login, "pop3": pop3_login, "smtp": smtp_login}


def test_wrong_password_is_refused_locally_with_a_growing_delay(proxied: Proxied) -> None:
    """No upstream login, no provider call; the delay grows; a good login still works."""
    before = proxied.stack.provider.introspections()
    started = time.monotonic()
    assert "[AUTHENTICATIONFAILED]" in imap_login(proxied, password="wrong")
    first = time.monotonic() - started
    assert pop3_login(proxied, password="wrong").startswith("-ERR [AUTH]")
    started = time.monotonic()
    assert smtp_login(proxied, password="wrong").startswith("535 5.7.8")
    third = time.monotonic() - started
    assert third > first + 0.5, (first, third)
    assert proxied.stack.provider.introspections() == before, "the upstream was asked"
    refused = proxied.events("proxy.login_refused")
    assert len(refused) >= 3
    assert "wrong" not in proxied.daemon.log()
    for protocol, login in LOGINS.items():
        assert login(proxied) == "OK", protocol


def test_revoked_grant(proxied: Proxied) -> None:
    """A grant that needs a sign-in: each protocol's answer says what to run."""
    proxied.stack.provider.revoke_user(USER)
    try:
        run = helper("refresh", "work", socket=proxied.socket)
        assert run.returncode != 0
        # The last access token is served until it expires (as `mailoauth token` does).
        deadline = time.monotonic() + 20
        while helper("token", "work", socket=proxied.socket).returncode != 4:
            assert time.monotonic() < deadline, "the daemon never said: needs authorization"
            time.sleep(0.2)
        imap = imap_login(proxied)
        assert "[AUTHENTICATIONFAILED]" in imap
        assert "run 'mailoauth authorize work'" in imap
        pop3 = pop3_login(proxied)
        assert pop3.startswith("-ERR [AUTH]")
        assert "run 'mailoauth authorize work'" in pop3
        smtp = smtp_login(proxied)
        assert smtp.startswith("535 5.7.8")
        assert "run 'mailoauth authorize work'" in smtp
    finally:
        for account in ("work", "down", "refused"):
            proxied.grant(account)
    for protocol, login in LOGINS.items():
        assert login(proxied) == "OK", protocol


def test_unreachable_upstream(proxied: Proxied) -> None:
    """Nothing listens where the account's servers are: a temporary failure, said so."""
    assert "[UNAVAILABLE]" in imap_login(proxied, "down")
    assert pop3_login(proxied, "down").startswith("-ERR [SYS/TEMP]")
    assert smtp_login(proxied, "down").startswith("454 4.7.0")
    for protocol, login in LOGINS.items():
        assert login(proxied) == "OK", protocol


def test_upstream_refuses_the_token(proxied: Proxied) -> None:
    """The server's own refusal is passed on, with a hint."""
    imap = imap_login(proxied, "refused")
    assert "[AUTHENTICATIONFAILED]" in imap
    assert "mail server refused a current token" in imap
    pop3 = pop3_login(proxied, "refused")
    assert pop3.startswith("-ERR [AUTH]")
    smtp = smtp_login(proxied, "refused")
    assert smtp.startswith("535 ")
    assert "mail server refused a current token" in smtp
    assert proxied.events("proxy.upstream_refused")
    for protocol, login in LOGINS.items():
        assert login(proxied) == "OK", protocol


def test_idle_sees_a_new_message(proxied: Proxied) -> None:
    """IMAP IDLE through the proxy: a message delivered meanwhile is announced."""
    with imaplib.IMAP4("127.0.0.1", proxied.imap, timeout=30) as client:
        client.login("work", PASSWORD)
        client.select("INBOX")
        client.send(b"i1 IDLE\r\n")
        assert client.readline().startswith(b"+")
        proxied.stack.dovecot.seed(USER, f"during IDLE {uuid.uuid4()}")
        line = client.readline()
        assert line.startswith(b"* "), line
        assert b"EXISTS" in line, line
        client.send(b"DONE\r\n")
        while not (line := client.readline()).startswith(b"i1 "):
            pass
        assert line.startswith(b"i1 OK"), line


def test_status_shows_listeners_and_sessions(proxied: Proxied) -> None:
    """`mailoauth status`: listeners, and each account's proxied sessions."""
    imap_login(proxied)
    status = proxied.status()
    assert status["listeners"] == {
        "imap": f"127.0.0.1:{proxied.imap}",
        "pop3": f"127.0.0.1:{proxied.pop3}",
        "smtp": f"127.0.0.1:{proxied.smtp}",
        "socketmap": str(proxied.socketmap),
    }
    rows = {r["account"]: r for r in status["accounts"]}  # type: ignore[attr-defined]
    assert rows["work"]["proxy_sessions_total"] >= 1
    assert rows["work"]["proxy_sessions_open"] == 0
    text = helper("status", socket=proxied.socket)
    assert f"imap 127.0.0.1:{proxied.imap}" in text.stdout
    assert "work: proxied sessions" in text.stdout


# --- Postfix: the SMTP proxy and the socketmap --------------------------------------------


@pytest.fixture(scope="module")
def postfix(proxied: Proxied) -> Iterator[Postfix]:
    """Postfix relaying through the SMTP proxy, with the local password (recipe)."""
    passwords = proxied.root / "sasl_passwd"
    passwords.write_text(f"[127.0.0.1]:{proxied.smtp} work:{PASSWORD}\n")
    passwords.chmod(0o600)
    main = adapt(
        recipe("proxy-postfix", "main.cf-smtp-proxy"),
        ("[127.0.0.1]:1587", f"[127.0.0.1]:{proxied.smtp}"),
        ("hash:/etc/postfix/sasl_passwd", f"texthash:{passwords}"),
    )
    main += f"proxy_read_maps = proxy:socketmap:unix:{proxied.socketmap}:sasl\n"
    instance = Postfix(proxied.root / "postfix", main=main)
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()


def test_postfix_relays_through_the_smtp_proxy(proxied: Proxied, postfix: Postfix) -> None:
    """Debian's Postfix, AUTH PLAIN with the local password, to Dovecot, to the sink."""
    subject = f"postfix relay {uuid.uuid4()}"
    with smtplib.SMTP("127.0.0.1", postfix.port, timeout=20) as client:
        body = f"From: {USER}\r\nSubject: {subject}\r\n\r\nbody\r\n"
        client.sendmail(USER, [RECIPIENT], body)
    try:
        _wait_for_sink(proxied, subject, seconds=30)
    except AssertionError:
        raise AssertionError(postfix.log()) from None


def postmap(
    postfix: Postfix, key: str, table: str, *, prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Postfix's own lookup client, with the test's Postfix configuration."""
    return subprocess.run(
        [*prefix, "/usr/sbin/postmap", "-c", str(postfix.root), "-q", key, table],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize("via", ["socketmap", "proxy:socketmap"])
@pytest.mark.parametrize("key", [USER, "smtp.example.net", "[127.0.0.1]:{smtp}"])
def test_postmap_gets_a_token(proxied: Proxied, postfix: Postfix, key: str, via: str) -> None:
    """By sender, host name and next hop: `user:TOKEN`, directly and through proxymap."""
    table = f"{via}:unix:{proxied.socketmap}:sasl"
    run = postmap(postfix, key.format(smtp=proxied.smtp), table)
    assert run.returncode == 0, run.stderr
    user, _, token = run.stdout.strip().partition(":")
    assert user == USER
    assert proxied.stack.provider.active(token)


def test_postmap_unknown_key_and_refused_uid(proxied: Proxied, postfix: Postfix) -> None:
    """NOTFOUND for a key nobody has; nothing for a uid the daemon does not serve."""
    table = f"socketmap:unix:{proxied.socketmap}:sasl"
    run = postmap(postfix, "stranger@example.org", table)
    assert (run.returncode, run.stdout) == (1, ""), run.stderr
    # Open the socket's directory, so that only the peer-credential check stands between.
    directory = proxied.socketmap.parent
    mode = directory.stat().st_mode & 0o777
    directory.chmod(0o755)
    proxied.socketmap.chmod(0o666)
    try:
        nobody = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
        run = postmap(postfix, USER, table, prefix=nobody)
    finally:
        directory.chmod(mode)
    assert run.stdout == ""
    assert run.returncode == 1, run.stderr
    assert proxied.events("socketmap.refused")


# --- hostile clients -------------------------------------------------------------------------

VERBS = {
    "imap": ["a LOGIN", "a AUTHENTICATE PLAIN", "a AUTHENTICATE", "a CAPABILITY", "a NOOP",
             "a ID", "a SELECT", "a STARTTLS", "a LOGIN {5}", "a LOGIN {99999}", "*", ""],
    "pop3": ["USER", "PASS", "AUTH PLAIN", "AUTH", "CAPA", "STLS", "RETR 1", "NOOP", ""],
    "smtp": ["EHLO", "HELO", "AUTH PLAIN", "AUTH LOGIN", "AUTH XOAUTH2", "MAIL FROM:<a@b>",
             "STARTTLS", "BDAT 10 LAST", "RSET", ""],
}  # fmt: skip
words = st.text(st.characters(blacklist_characters="\r\n"), max_size=40)
lines = st.one_of(
    words,
    st.binary(max_size=60).map(lambda b: b.decode("latin-1").replace("\n", " ")),
    st.just("x" * 9000),  # over the line limit
)


def command_lines(protocol: str) -> st.SearchStrategy[list[str]]:
    command = st.builds(lambda v, a: f"{v} {a}".strip(), st.sampled_from(VERBS[protocol]), lines)
    return st.lists(command, max_size=12)


@pytest.mark.parametrize("protocol", ["imap", "pop3", "smtp"])
def test_hostile_commands_before_login(proxied: Proxied, protocol: str) -> None:
    """Random command sequences before the login: no crash, the daemon serves on."""
    port = {"imap": proxied.imap, "pop3": proxied.pop3, "smtp": proxied.smtp}[protocol]
    counter = iter(range(1, 1_000_000))

    @settings(
        max_examples=40,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(command_lines(protocol))
    def drive(commands: list[str]) -> None:
        # A source address of its own for each example: wrong passwords slow down
        # their own address only (127.0.0.0/8 is all loopback).
        n = next(counter)
        source = f"127.{100 + n // 65536 % 100}.{n // 256 % 256}.{n % 256 or 1}"
        with socket.create_connection(("127.0.0.1", port), 10, (source, 0)) as conn:
            conn.settimeout(10)
            # The proxy may hang up early (an over-long line): then sending fails.
            with contextlib.suppress(OSError):
                conn.sendall("".join(f"{c}\r\n" for c in commands).encode("utf-8", "replace"))
                conn.shutdown(socket.SHUT_WR)
            received = b""
            with contextlib.suppress(OSError):
                while chunk := conn.recv(65536):
                    received += chunk
                    assert len(received) < 1_000_000
        assert received, "no greeting"
        assert proxied.daemon.proc.poll() is None, proxied.daemon.log()

    fds = _open_files(proxied)
    drive()
    # No leak: every connection's socket is closed again (a little slack for the
    # daemon's own sockets to the provider, which come and go).
    deadline = time.monotonic() + 10
    while _open_files(proxied) > fds + 5:
        assert time.monotonic() < deadline, (fds, _open_files(proxied))
        time.sleep(0.1)
    failed = [line for line in proxied.daemon.log().splitlines() if "connection_failed" in line]
    assert not failed, failed[:1]
    assert LOGINS[protocol](proxied) == "OK"
    assert proxied.token()


def _open_files(proxied: Proxied) -> int:
    return len(os.listdir(f"/proc/{proxied.daemon.proc.pid}/fd"))


def test_connections_are_capped_per_source(proxied: Proxied) -> None:
    """One address gets at most 64 connections at once; others are still served."""
    from mailoauthd.proxy.common import MAX_PER_SOURCE

    with contextlib.ExitStack() as held:
        for _ in range(MAX_PER_SOURCE):
            conn = held.enter_context(
                socket.create_connection(("127.0.0.1", proxied.imap), 10, ("127.9.9.9", 0))
            )
            assert conn.recv(1000).startswith(b"* OK")
        extra = held.enter_context(
            socket.create_connection(("127.0.0.1", proxied.imap), 10, ("127.9.9.9", 0))
        )
        extra.settimeout(10)
        assert extra.recv(1000).startswith(b"* BYE [UNAVAILABLE]")
        assert imap_login(proxied) == "OK"


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.binary(max_size=300), max_size=6))
def test_hostile_socketmap_requests(proxied: Proxied, chunks: list[bytes]) -> None:
    """Random bytes on the socketmap: answered or hung up on; the daemon serves on."""
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(10)
        conn.connect(str(proxied.socketmap))
        with contextlib.suppress(OSError):
            for chunk in chunks:
                conn.sendall(chunk)
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(65536):
                pass
    assert proxied.daemon.proc.poll() is None


def test_socketmap_still_answers_after_hostile_requests(proxied: Proxied) -> None:
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(10)
        conn.connect(str(proxied.socketmap))
        request = f"sasl {USER}".encode()
        conn.sendall(b"%d:%s," % (len(request), request))
        assert conn.recv(65536).split(b":", 1)[1].startswith(f"OK {USER}:".encode())
    assert not proxied.events("socketmap.connection_failed")


def test_reload_reads_new_passwords(proxied: Proxied) -> None:
    """`mailoauth reload` re-reads proxy_password_file: the new one works, the old not."""
    path = proxied.root / "work.proxy"
    path.write_text("a new local password\n")
    try:
        assert helper("reload", socket=proxied.socket).returncode == 0
        assert imap_login(proxied, password="a new local password") == "OK"
        assert "[AUTHENTICATIONFAILED]" in imap_login(proxied)
    finally:
        path.write_text(PASSWORD + "\n")
        assert helper("reload", socket=proxied.socket).returncode == 0
    assert imap_login(proxied) == "OK"
