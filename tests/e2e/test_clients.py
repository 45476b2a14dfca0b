"""
Real mail programs, configured as docs/clients/ says, against the suite's Dovecot: each logs
in with the daemon's token, and fails once the grant is revoked at the provider.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import USER

from .conftest import REALISTIC_TOKEN_LENGTH, SHORT_TOKEN_LENGTH, Stack, run_client
from .mailservers import Dovecot
from .recipes import DOC_USER, adapt, recipe

pytestmark = pytest.mark.slow

RECIPIENT = "bob@example.org"
Run = subprocess.CompletedProcess[str]


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def message(home: Path, subject: str) -> Path:
    return write(
        home / "message.eml",
        f"From: {USER}\nTo: {RECIPIENT}\nSubject: {subject}\n\nSent by the e2e suite.\n",
    )


def fetched(maildir: Path, subject: str) -> bool:
    """Whether a message with `subject` is anywhere under `maildir`."""
    return any(
        f"Subject: {subject}" in path.read_text(errors="replace")
        for path in maildir.rglob("*")
        if path.is_file() and path.parent.name in ("cur", "new")
    )


# --- one function per client and direction: configure from the docs, run, say what it did --


def msmtp(stack: Stack, home: Path, mechanism: str, subject: str) -> Run:
    d = stack.dovecot
    rc = adapt(
        recipe("msmtp", "msmtprc"),
        ("host smtp.office365.com", "host 127.0.0.1"),
        ("port 587", f"port {d.submission_port}"),
        (DOC_USER, USER),
        ("auth xoauth2", f"auth {mechanism}"),
        ("tls_starttls on", f"tls_starttls on\ntls_trust_file {d.cert}"),
    )
    config = write(home / ".msmtprc", rc)
    with message(home, subject).open() as body:
        return run_client(
            ["msmtp", "-C", str(config), "-a", "work", RECIPIENT], env=stack.env(home), stdin=body
        )


def mbsync(stack: Stack, home: Path, mechanism: str, subject: str) -> Run:
    d = stack.dovecot
    rc = adapt(
        recipe("mbsync", "mbsyncrc"),
        # The certificate names localhost; mbsync does not check IP addresses.
        ("Host outlook.office365.com", "Host localhost"),
        ("Port 993", f"Port {d.imaps_port}\nCertificateFile {d.cert}"),
        (DOC_USER, USER),
        ("AuthMechs XOAUTH2", f"AuthMechs {mechanism.upper()}"),
    )
    (home / "Mail" / "work").mkdir(parents=True)
    config = write(home / ".mbsyncrc", rc)
    # Bounded short: after a refused login mbsync never exits.
    return run_client(["mbsync", "-c", str(config), "work"], env=stack.env(home), timeout=8)


def neomutt_rc(stack: Stack, home: Path, mechanism: str) -> Path:
    d = stack.dovecot
    rc = adapt(
        recipe("neomutt", "neomuttrc"),
        ("outlook.office365.com:993", f"127.0.0.1:{d.imaps_port}"),
        ("smtp.office365.com:587", f"127.0.0.1:{d.submission_port}"),
        ("alice%40contoso.com", USER.replace("@", "%40")),
        (DOC_USER, USER),
        ('"xoauth2"', f'"{mechanism}"'),
        append=f'set certificate_file = "{d.cert}"\nset wait_key = no\n',
    )
    return write(home / "neomuttrc", rc)


def neomutt_read(stack: Stack, home: Path, mechanism: str, subject: str) -> Run:
    rc = neomutt_rc(stack, home, mechanism)
    out = home / "read.txt"
    push = f'push "<pipe-message>cat > {out}<enter><quit>"'
    # A failed login flushes the pushed keys: quit after a second without input instead.
    quit_when_idle = ["-e", "set timeout = 1", "-e", "timeout-hook 'exec quit'"]
    # NeoMutt needs a terminal: give it a pseudo-terminal, with nothing to type.
    spawn = "import pty, sys; sys.exit(pty.spawn(sys.argv[1:]) >> 8)"
    argv = [sys.executable, "-c", spawn, "neomutt", "-n", "-F", str(rc), *quit_when_idle]
    argv += ["-e", push]
    return run_client(argv, env=stack.env(home), stdin=subprocess.DEVNULL)


def neomutt_send(stack: Stack, home: Path, mechanism: str, subject: str) -> Run:
    rc = neomutt_rc(stack, home, mechanism)
    with message(home, subject).open() as body:
        return run_client(
            ["neomutt", "-n", "-F", str(rc), "-s", subject, RECIPIENT],
            env=stack.env(home),
            stdin=body,
        )


def offlineimap(stack: Stack, home: Path, mechanism: str, subject: str) -> Run:
    d = stack.dovecot
    write(home / ".offlineimap.py", recipe("offlineimap", "offlineimap.py"))
    rc = adapt(
        recipe("offlineimap", "offlineimaprc"),
        ("remotehost = outlook.office365.com", "remotehost = localhost"),
        ("remoteport = 993", f"remoteport = {d.imaps_port}"),
        ("sslcacertfile = OS-DEFAULT", f"sslcacertfile = {d.cert}"),
        (DOC_USER, USER),
    )
    config = write(home / ".offlineimaprc", rc)
    return run_client(
        ["offlineimap", "-c", str(config), "-o", "-u", "basic"], env=stack.env(home), timeout=30
    )


def getmail(stack: Stack, home: Path, mechanism: str, subject: str) -> Run:
    d = stack.dovecot
    maildir = home / "Mail" / "work"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    also = ""
    if os.geteuid() == 0:
        # getmail refuses to deliver as root; CI runs as root.
        also = f"user = {d.mail_user}\n"
        for path in [maildir, *maildir.iterdir()]:
            os.chown(path, d.uid, d.gid)
    rc = adapt(
        recipe("getmail", "getmailrc"),
        ("server = outlook.office365.com", "server = localhost"),
        ("port = 993", f"port = {d.imaps_port}\nca_certs = {d.cert}"),
        (DOC_USER, USER),
        ("path = ~/Mail/work/", f"path = ~/Mail/work/\n{also}"),
        ("read_all = false", "read_all = true"),
    )
    config = write(home / "getmailrc", rc)
    state = home / "getmail"
    state.mkdir()
    return run_client(
        ["getmail", "--getmaildir", str(state), "--rcfile", str(config)],
        env=stack.env(home),
        timeout=30,
    )


def curl_target(stack: Stack, mechanism: str) -> Dovecot:
    # curl picks OAUTHBEARER whenever it is offered: XOAUTH2 needs a server without it.
    return stack.xoauth2_only() if mechanism == "xoauth2" else stack.dovecot


def curl_fetch(stack: Stack, home: Path, mechanism: str, subject: str) -> Run:
    d = curl_target(stack, mechanism)
    script = adapt(
        recipe("curl", "curl-imap"),
        ("--config -", f"--config - --cacert {d.cert}"),
        (DOC_USER, USER),
        ("imaps://outlook.office365.com/", f"imaps://127.0.0.1:{d.imaps_port}/"),
    )
    run = run_client(["bash", "-c", script], env=stack.env(home))
    write(home / "curl-out.txt", run.stdout)
    return run


def curl_send(stack: Stack, home: Path, mechanism: str, subject: str) -> Run:
    d = curl_target(stack, mechanism)
    message(home, subject)
    script = adapt(
        recipe("curl", "curl-smtp"),
        ("--config -", f"--config - --cacert {d.cert}"),
        (DOC_USER, USER),
        (RECIPIENT, RECIPIENT),
        ("smtp://smtp.office365.com:587", f"smtp://127.0.0.1:{d.submission_port}"),
    )
    return run_client(["bash", "-c", script], env=stack.env(home), cwd=home)


# --- what counts as success --------------------------------------------------------------


def sent(stack: Stack, home: Path, subject: str) -> bool:
    return subject in stack.sink.subjects()


def read_mailbox(stack: Stack, home: Path, subject: str) -> bool:
    return fetched(home / "Mail", stack.seeded_subject)


def read_file(name: str) -> Callable[[Stack, Path, str], bool]:
    def check(stack: Stack, home: Path, subject: str) -> bool:
        path = home / name
        return path.exists() and f"Subject: {stack.seeded_subject}" in path.read_text()

    return check


@dataclass(frozen=True)
class Case:
    client: str
    mechanism: str
    token_length: int
    run: Callable[[Stack, Path, str, str], Run]
    succeeded: Callable[[Stack, Path, str], bool]

    @property
    def id(self) -> str:
        length = "2KB" if self.token_length == REALISTIC_TOKEN_LENGTH else "short"
        return f"{self.client}-{self.mechanism}-{length}"


LONG, SHORT = REALISTIC_TOKEN_LENGTH, SHORT_TOKEN_LENGTH
CASES = [
    Case("msmtp", "xoauth2", LONG, msmtp, sent),
    # msmtp sends OAUTHBEARER's token on the AUTH line: Dovecot's limit, not msmtp's.
    Case("msmtp", "oauthbearer", SHORT, msmtp, sent),
    Case("mbsync", "xoauth2", LONG, mbsync, read_mailbox),
    Case("neomutt-imap", "xoauth2", LONG, neomutt_read, read_file("read.txt")),
    # NeoMutt's own limit: OAUTHBEARER tokens up to about 510 characters.
    Case("neomutt-imap", "oauthbearer", SHORT, neomutt_read, read_file("read.txt")),
    # NeoMutt sends SMTP tokens on the AUTH line: Dovecot's limit for XOAUTH2.
    Case("neomutt-smtp", "xoauth2", SHORT, neomutt_send, sent),
    Case("neomutt-smtp", "oauthbearer", SHORT, neomutt_send, sent),
    Case("offlineimap", "xoauth2", LONG, offlineimap, read_mailbox),
    Case("getmail", "xoauth2", LONG, getmail, read_mailbox),
    Case("curl-imap", "oauthbearer", LONG, curl_fetch, read_file("curl-out.txt")),
    Case("curl-imap", "xoauth2", LONG, curl_fetch, read_file("curl-out.txt")),
    Case("curl-smtp", "oauthbearer", LONG, curl_send, sent),
    Case("curl-smtp", "xoauth2", LONG, curl_send, sent),
]


def explain(stack: Stack, run: Run) -> str:
    tail = stack.dovecot.log_text().splitlines()[-8:]
    return f"exit {run.returncode}\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}\n" + "\n".join(tail)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_client_logs_in_and_is_refused_after_revocation(
    stack: Stack, new_home: Callable[[], Path], case: Case
) -> None:
    """The documented recipe works with the daemon's token and fails once the grant is revoked."""
    stack.grant(case.token_length)
    home, subject = new_home(), f"{case.id} with a good token {time.time_ns()}"
    run = case.run(stack, home, case.mechanism, subject)
    assert case.succeeded(stack, home, subject), explain(stack, run)

    asked = stack.provider.introspections()
    stack.revoke()
    home, subject = new_home(), f"{case.id} with a revoked token {time.time_ns()}"
    run = case.run(stack, home, case.mechanism, subject)
    assert not case.succeeded(stack, home, subject), explain(stack, run)
    # Dovecot asked the provider about the token the client presented, and was told no.
    assert stack.provider.introspections() > asked, explain(stack, run)


def test_a_run_after_a_refresh_presents_the_new_token(
    stack: Stack, new_home: Callable[[], Path]
) -> None:
    """Across a refresh, IMAP and SMTP clients get the new token and log in with it."""
    first = stack.grant(REALISTIC_TOKEN_LENGTH)
    home = new_home()
    run = mbsync(stack, home, "xoauth2", "")
    assert read_mailbox(stack, home, ""), explain(stack, run)
    run = msmtp(stack, home, "xoauth2", subject := f"before a refresh {time.time_ns()}")
    assert sent(stack, home, subject), explain(stack, run)
    # The token expires within seconds; the daemon refreshes ahead of that.
    deadline = time.monotonic() + 20
    while stack.token() == first or stack.provider.active(first):
        assert time.monotonic() < deadline, "no refresh within 20 s"
        time.sleep(0.2)
    home = new_home()
    run = mbsync(stack, home, "xoauth2", "")
    assert read_mailbox(stack, home, ""), explain(stack, run)
    run = msmtp(stack, home, "xoauth2", subject := f"after a refresh {time.time_ns()}")
    assert sent(stack, home, subject), explain(stack, run)


def test_token_file_follows_refreshes_and_logs_in(
    stack: Stack, new_home: Callable[[], Path]
) -> None:
    """The token_file holds the served token (0600), logs in to IMAP, and follows refreshes."""
    stack.grant(REALISTIC_TOKEN_LENGTH)

    def fetch_with_file() -> bool:
        home = new_home()
        script = (
            f'printf \'oauth2-bearer = "%s"\\n\' "$(cat {shlex.quote(str(stack.token_file))})" | '
            f"curl -sS --config - --cacert {stack.dovecot.cert} --user {USER}: "
            f"'imaps://127.0.0.1:{stack.dovecot.imaps_port}/INBOX;UID=1'"
        )
        run = run_client(["bash", "-c", script], env=stack.env(home))
        return f"Subject: {stack.seeded_subject}" in run.stdout

    def on_file() -> str:
        return stack.token_file.read_text().strip()

    assert stack.token_file.stat().st_mode & 0o777 == 0o600
    first = on_file()
    assert first == stack.token()
    assert len(first) == REALISTIC_TOKEN_LENGTH
    assert fetch_with_file()
    deadline = time.monotonic() + 20
    while on_file() == first:
        assert time.monotonic() < deadline, "the token file was not replaced within 20 s"
        time.sleep(0.2)
    assert fetch_with_file()
    revoked = stack.revoke()
    assert on_file() == revoked
    assert not fetch_with_file()
