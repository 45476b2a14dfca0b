"""
`mailoauth authorize --test PROFILE` (issue 15): the real helper signs in with a profile
at the development provider for no account, reports what came back with the warnings
that apply, revokes it and stores nothing.
"""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import httpx
import pytest
from conftest import MAILOAUTH, config_text
from test_authorize import finish, read_until, sign_in_keys

from mailoauthd.testing import DEFAULT_USER, DevProvider


def write_config(tmp: Path, provider: DevProvider, scopes: str) -> Path:
    path = tmp / "config.toml"
    text = config_text(
        tmp, provider, accounts=(), provider_keys=sign_in_keys(provider, f"scopes = {scopes}\n")
    )
    path.write_text(text)
    return path


def trial(path: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(MAILOAUTH), "authorize", "--test", "dev", "--config", str(path), "--no-browser"]
        + list(args),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def sign_in(path: Path, pages: list[str] | None = None) -> tuple[int, str, str]:
    """The trial, with the test's browser following the address it prints."""
    proc = trial(path)
    seen: list[str] = []
    url = read_until(proc, "/authorize?", seen).strip()
    page = httpx.get(url, follow_redirects=True, timeout=20)
    if pages is not None:
        pages.append(page.text)
    return finish(proc, seen)


def jwt(claims: dict[str, object]) -> str:
    part = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"eyJhbGciOiJub25lIn0.{part}.sig"


@pytest.mark.integration  # ,  # `mailoauth authorize --test`
@pytest.mark.slow
class TestTrialSignIn:
    def test_a_working_profile(self, tmp_path: Path, provider: DevProvider) -> None:
        """What came back is reported, then revoked; nothing stored, no token shown."""
        pages: list[str] = []
        status, out, err = sign_in(write_config(tmp_path, provider, '["openid", "mail"]'), pages)
        assert status == 0, out + err
        assert "The trial sign-in with the profile <b>dev</b> worked." in pages[0]
        assert "To sign in to [providers.dev] (trial)" in out
        assert "token type: Bearer; the access token lives 3600 s" in out
        assert "refresh token: yes" in out
        assert "scopes asked for: openid mail" in out
        assert "scopes granted: openid mail" in out
        assert f"signed in as: email {DEFAULT_USER}" in out
        assert "access token: opaque" in out
        assert "Revoked it at the provider (RFC 7009). The tokens are forgotten" in out
        assert "The profile works" in out
        assert " ! " not in out
        assert provider.count(path="/revoke") == 1
        assert provider.valid_refresh_tokens(DEFAULT_USER) == []
        assert not (tmp_path / "state").exists()
        assert [s for s in provider.issued_secrets() if s in out + err] == []

    def test_no_refresh_token(self, tmp_path: Path, provider: DevProvider) -> None:
        """An answer without a refresh token: the offline-access warning; exit 1."""
        body = {"access_token": "A" * 40, "token_type": "Bearer", "expires_in": 600}
        provider.add_fault("status", status=200, body=json.dumps({**body, "scope": "mail"}))
        status, out, _ = sign_in(write_config(tmp_path, provider, '["mail"]'))
        assert status == 1
        assert "refresh token: NO" in out
        assert "! no refresh token" in out
        assert "add 'offline_access' to scopes" in out
        assert "access_type=offline" in out
        assert "1 warning: fix the profile first." in out
        assert provider.count(path="/revoke") == 1  # the access token, then
        assert "A" * 40 not in out

    def test_no_mail_scope(self, tmp_path: Path, provider: DevProvider) -> None:
        """Granted scopes without the mail scope: the warning says what to add."""
        status, out, _ = sign_in(write_config(tmp_path, provider, '["openid"]'))
        assert status == 1
        assert "scopes granted: openid" in out
        assert "! no mail scope was granted" in out
        assert not (tmp_path / "state").exists()

    def test_graph_audience(self, tmp_path: Path, provider: DevProvider) -> None:
        """A Microsoft Graph token is named as the one the mail servers refuse."""
        token = jwt({"aud": "https://graph.microsoft.com", "scp": "Mail.Read User.Read"})
        body = {"access_token": token, "token_type": "Bearer", "expires_in": 3600}
        body |= {"refresh_token": "R" * 40, "scope": "Mail.Read User.Read"}
        provider.add_fault("status", status=200, body=json.dumps(body))
        status, out, _ = sign_in(write_config(tmp_path, provider, '["Mail.Read"]'))
        assert status == 1
        assert "access token: a JWT for audience https://graph.microsoft.com" in out
        assert "permissions Mail.Read User.Read" in out
        assert "! the access token is for Microsoft Graph" in out
        assert "https://outlook.office.com/IMAP.AccessAsUser.All" in out
        assert token not in out

    def test_usage(self, tmp_path: Path, provider: DevProvider) -> None:
        """An account or --test, not both nor neither; an unknown profile is named."""
        path = write_config(tmp_path, provider, '["mail"]')
        both = subprocess.run(
            [str(MAILOAUTH), "authorize", "work", "--test", "dev", "--config", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert both.returncode == 2
        unknown = subprocess.run(
            [str(MAILOAUTH), "authorize", "--test", "nope", "--config", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert unknown.returncode == 1
        assert "there is no [providers.nope]" in unknown.stderr
        assert "defined: dev" in unknown.stderr
