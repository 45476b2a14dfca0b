"""`mailoauth test` against the suite's Dovecot: a good token logs in, a revoked one does not."""

from __future__ import annotations

import pytest
from conftest import helper

from .conftest import ACCOUNT, REALISTIC_TOKEN_LENGTH, Stack

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("mechanism", ["xoauth2", "oauthbearer"])
def test_logs_in_to_imap_and_smtp(stack: Stack, mechanism: str) -> None:
    """With a 2 KB token both logins succeed, each step shows the server's answer, no token."""
    stack.grant(REALISTIC_TOKEN_LENGTH)
    run = helper("test", ACCOUNT, "--mechanism", mechanism, socket=stack.socket)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"got a token of {REALISTIC_TOKEN_LENGTH} characters" in run.stdout
    assert f"AUTHENTICATE {mechanism.upper()} as alice@example.com" in run.stdout
    assert "authenticated: OK Logged in" in run.stdout
    # 2 KB does not fit on Dovecot's AUTH line: it goes after the 334 prompt.
    assert "(then the response after 334)" in run.stdout
    assert "authenticated: 235 2.7.0 Logged in." in run.stdout
    assert f"IMAP and SMTP login with {mechanism.upper()} succeeded" in run.stdout
    assert stack.token() not in run.stdout + run.stderr


def test_a_rejected_token_fails_with_the_servers_answer(stack: Stack) -> None:
    """After revocation both logins fail: exit 1, the server's refusal and a hint on stderr."""
    stack.grant()
    stack.revoke()
    run = helper("test", ACCOUNT, socket=stack.socket)
    assert run.returncode == 1, run.stdout + run.stderr
    assert 'server says why: {"status":"401"' in run.stdout
    assert "rejected: [AUTHENTICATIONFAILED] Authentication failed." in run.stdout
    assert "rejected: 535 5.7.8 Authentication failed." in run.stdout
    assert run.stderr.startswith(
        f"mailoauth: {ACCOUNT}: IMAP 127.0.0.1:{stack.dovecot.imaps_port} (TLS): "
        "the server rejected the token: [AUTHENTICATIONFAILED] Authentication failed. (check "
    )
    assert len(run.stderr.splitlines()) == 1


def test_one_protocol_only(stack: Stack) -> None:
    """--only smtp checks submission alone."""
    stack.grant()
    run = helper("test", ACCOUNT, "--only", "smtp", socket=stack.socket)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "IMAP" not in run.stdout
    assert "SMTP login with XOAUTH2 succeeded" in run.stdout
