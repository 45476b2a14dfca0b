"""
The end-to-end stack, shared by the whole e2e suite: the development provider, an SMTP
sink, Dovecot and `mailoauthd`, all real processes on 127.0.0.1, started once per session.

Where the Debian packages are missing, the suite is skipped with the list and the command
that installs them; in CI (CI=true) that is a failure instead: nothing may be skipped there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import USER, DaemonProcess, config_text, helper

from .mailservers import Dovecot, ProviderProcess, SmtpSink, missing_packages

ACCOUNT = "work"
# Tokens expire every few seconds in this suite, so that every client run comes soon
# after a refresh, and a rotation happens between any two runs a few seconds apart.
TOKEN_LIFETIME = 10
DAEMON_KEYS = 'refresh_interval = "1s"\nrefresh_spread = "0s"'
# Refresh 6 s into a token's 10; hand out only tokens valid 2 s more: long enough for a
# client to log in with it, short enough that the daemon never waits for the provider.
ACCOUNT_TIMING = 'refresh_before = "4s"\nmin_validity = "2s"'
# Microsoft's access tokens are 1.5 to 2.5 KB; the provider's default is 48 characters.
REALISTIC_TOKEN_LENGTH = 2000
SHORT_TOKEN_LENGTH = 48


def _require_packages() -> None:
    missing = missing_packages()
    if not missing:
        return
    message = (
        f"e2e: missing Debian packages: {', '.join(missing)}; install them with "
        f"'apt-get update && apt-get install -y {' '.join(missing)}' (or run .ci/run)"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(message + " -- in CI nothing may be skipped", pytrace=False)
    pytest.skip(message)


class Stack:
    """Everything a client test needs: servers, the daemon, and a way to give grants."""

    def __init__(self, root: Path, cleanup: contextlib.ExitStack) -> None:
        self.root = root
        self._cleanup = cleanup
        self._xoauth2_only: Dovecot | None = None
        self.provider = ProviderProcess(access_token_lifetime=TOKEN_LIFETIME)
        cleanup.callback(self.provider.stop)
        self.sink = SmtpSink()
        self.sink.start()
        cleanup.callback(self.sink.stop)
        self.dovecot = Dovecot(
            root / "dovecot",
            introspection_url=self.provider.endpoints["introspection_endpoint"],
            relay_port=self.sink.port,
        )
        self.seeded_subject = "seeded for the e2e suite"
        self.dovecot.seed(USER, self.seeded_subject)
        cleanup.callback(self.dovecot.stop)
        self.dovecot.start()
        self.token_file = root / "tokens" / f"{ACCOUNT}.token"
        self.token_file.parent.mkdir()
        keys = "\n".join(
            (
                ACCOUNT_TIMING,
                f'imap_server = "127.0.0.1:{self.dovecot.imaps_port}"',
                'imap_security = "tls"',
                f'smtp_server = "127.0.0.1:{self.dovecot.submission_port}"',
                'smtp_security = "starttls"',
                f'tls_ca_file = "{self.dovecot.cert}"',
                f'token_file = "{self.token_file}"',
            )
        )
        daemon_dir = root / "daemon"
        daemon_dir.mkdir()
        config_path = daemon_dir / "config.toml"
        config_path.write_text(
            config_text(daemon_dir, self.provider, daemon_keys=DAEMON_KEYS, account_keys=keys)  # type: ignore[arg-type]
        )
        self.socket = daemon_dir / "run" / "socket"
        self.daemon = DaemonProcess(config_path, self.socket, daemon_dir / "daemon.log")
        cleanup.callback(self.daemon.stop)
        self.daemon.wait_ready()

    def xoauth2_only(self) -> Dovecot:
        """A second Dovecot that offers XOAUTH2 alone, as Microsoft 365 does; started once."""
        if self._xoauth2_only is None:
            dovecot = Dovecot(
                self.root / "dovecot-xoauth2",
                introspection_url=self.provider.endpoints["introspection_endpoint"],
                relay_port=self.sink.port,
                mechanisms="xoauth2",
            )
            dovecot.seed(USER, self.seeded_subject)
            self._cleanup.callback(dovecot.stop)
            dovecot.start()
            self._xoauth2_only = dovecot
        return self._xoauth2_only

    def env(self, home: Path) -> dict[str, str]:
        """The environment a mail program runs in: `mailoauth` on PATH, the daemon's socket."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MAILOAUTHD_", "PYTEST"))}
        env.update(
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}",
            MAILOAUTHD_SOCKET=str(self.socket),
            HOME=str(home),
            # Temporary files (NeoMutt's drafts) go into the test's own directory, not /tmp.
            TMPDIR=str(home),
            TERM="xterm",
            LC_ALL="C.UTF-8",
        )
        return env

    def grant(self, token_length: int = SHORT_TOKEN_LENGTH) -> str:
        """A fresh sign-in, as a user makes one: `mailoauth import` of a new refresh token."""
        self.provider.set_options(access_token_length=token_length)
        refresh_token = self.provider.issue_refresh_token(USER)
        run = helper("import", ACCOUNT, socket=self.socket, stdin=refresh_token + "\n")
        assert run.returncode == 0, run.stderr
        return self.token()

    def token(self) -> str:
        run = helper("token", ACCOUNT, socket=self.socket)
        assert run.returncode == 0, run.stderr
        return run.stdout.strip()

    def revoke(self) -> str:
        """
        Revoke the grant at the provider, just after a refresh, so that the daemon still
        serves its last token for a few seconds; returns that token, now refused.
        """
        run = helper("refresh", ACCOUNT, socket=self.socket)
        assert run.returncode == 0, run.stderr
        token = self.token()
        self.provider.revoke_user(USER)
        assert not self.provider.active(token)
        assert self.token() == token, "the daemon no longer serves the revoked token"
        return token


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    """Provider, sink, Dovecot and mailoauthd, once for the whole e2e suite."""
    _require_packages()
    # Not pytest's tmp dirs: those are 0700, and Dovecot's mail processes run as nobody.
    root = Path(tempfile.mkdtemp(prefix="mailoauthd-e2e-"))
    root.chmod(0o755)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, root, ignore_errors=True)
        yield Stack(root, cleanup)


@pytest.fixture
def new_home(stack: Stack) -> Callable[[], Path]:
    """Makes fresh home directories for client runs, under the suite's root."""

    def make() -> Path:
        path = Path(tempfile.mkdtemp(prefix="home-", dir=stack.root))
        path.chmod(0o755)
        return path

    return make


def run_client(
    argv: list[str], *, env: dict[str, str], timeout: float = 20, **kw: object
) -> subprocess.CompletedProcess[str]:
    """Run a mail program, bounded: some never exit after a refused login (mbsync)."""
    try:
        return subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=timeout, check=False, **kw
        )  # type: ignore[call-overload, no-any-return]
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else ""
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        return subprocess.CompletedProcess(argv, -9, out, err + f"\n(killed after {timeout} s)")
