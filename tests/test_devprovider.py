"""The development OAuth2 provider, exercised over real HTTP on 127.0.0.1."""

# Every "token" here is a test fixture or a protocol keyword, never a credential.
# ruff: noqa: S105, S106

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import parse_qs, quote_plus, urlsplit

import httpx
import pytest
import trio

from mailoauthd.flows import GrantType
from mailoauthd.testing import DevProvider

REDIRECT = "http://127.0.0.1:8765/callback"
DEMO = ("demo-client", "demo-secret")


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def provider(clock: FakeClock) -> Iterator[DevProvider]:
    with DevProvider(clock=clock) as started:
        yield started


@pytest.fixture
def http(provider: DevProvider) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=provider.url, timeout=5) as client:
        yield client


def token_request(
    http: httpx.Client, grant_type: str, client: tuple[str, str | None] = DEMO, **form: str
) -> httpx.Response:
    data = {"grant_type": grant_type, "client_id": client[0], **form}
    if client[1] is not None:
        data["client_secret"] = client[1]
    return http.post("/token", data=data)


def refresh(http: httpx.Client, token: str, **kw: Any) -> httpx.Response:
    return token_request(http, "refresh_token", refresh_token=token, **kw)


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def authorize(http: httpx.Client, **params: str) -> dict[str, str]:
    """Run /authorize and return the query of the redirect it answers with."""
    query = {"response_type": "code", "client_id": "demo-client", "redirect_uri": REDIRECT}
    response = http.get("/authorize", params={**query, **params})
    assert response.status_code == 302
    location = response.headers["Location"]
    assert location.startswith(REDIRECT + "?")
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


def jwt_part(token: str, index: int) -> dict[str, Any]:
    part = token.split(".")[index]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return decoded


class TestLifecycle:
    def test_url_is_unknown_before_start(self) -> None:
        """A provider on port 0 has no URL until it listens."""
        with pytest.raises(RuntimeError):
            _ = DevProvider().url

    def test_restart_keeps_port_and_state(self, provider: DevProvider) -> None:
        """After stop() and start() the provider is back on the same URL with its tokens."""
        url, token = provider.url, provider.issue_refresh_token("a@example.com")
        provider.stop()
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/.well-known/openid-configuration", timeout=2)
        provider.start()
        assert provider.url == url
        with httpx.Client(base_url=url, timeout=5) as http:
            assert refresh(http, token).status_code == 200

    def test_unknown_path_and_wrong_method(self, http: httpx.Client) -> None:
        """Unknown paths answer 404 JSON and known paths with the wrong method 405."""
        missing = http.get("/nope")
        assert missing.status_code == 404
        assert missing.json()["error"] == "not_found"
        wrong = http.get("/token")
        assert wrong.status_code == 405
        assert wrong.headers["Allow"] == "POST"

    def test_stderr_stays_clean(
        self, provider: DevProvider, http: httpx.Client, capfd: pytest.CaptureFixture[str]
    ) -> None:
        """Neither normal requests nor resets nor clients that give up write to stderr."""
        token = provider.issue_refresh_token("a@example.com")
        refresh(http, token)
        http.get("/nope")
        provider.add_fault("reset")
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            refresh(http, token)
        provider.add_fault("delay", seconds=5)  # stop() cuts it short
        with pytest.raises(httpx.ReadTimeout):
            http.post("/token", data={"grant_type": "refresh_token"}, timeout=0.05)
        provider.stop()
        assert capfd.readouterr().err == ""


class TestRefreshToken:
    def test_rotate_returns_new_token_and_keeps_old(
        self, provider: DevProvider, http: httpx.Client
    ) -> None:
        """Under "rotate" each refresh returns a new refresh token and the old one still works."""
        old = provider.issue_refresh_token("a@example.com", scopes=["mail", "openid"])
        body = refresh(http, old).json()
        assert body["token_type"] == "Bearer"
        assert body["expires_in"] == 3600
        assert body["scope"] == "mail openid"
        assert body["refresh_token"] != old
        assert refresh(http, old).status_code == 200
        assert set(provider.valid_refresh_tokens("a@example.com")) >= {old, body["refresh_token"]}

    def test_none_omits_refresh_token(self, provider: DevProvider, http: httpx.Client) -> None:
        """Under "none" the answer carries no refresh_token and the old one keeps working."""
        provider.set_options(refresh_token_rotation="none")
        token = provider.issue_refresh_token("a@example.com")
        assert "refresh_token" not in refresh(http, token).json()
        assert refresh(http, token).status_code == 200
        assert provider.valid_refresh_tokens("a@example.com") == [token]

    def test_strict_invalidates_old_token(self, provider: DevProvider, http: httpx.Client) -> None:
        """Under "strict" the old refresh token fails with invalid_grant right after a refresh."""
        provider.set_options(refresh_token_rotation="strict")
        old = provider.issue_refresh_token("a@example.com")
        new = refresh(http, old).json()["refresh_token"]
        replay = refresh(http, old)
        assert replay.status_code == 400
        assert replay.json()["error"] == "invalid_grant"
        assert provider.valid_refresh_tokens("a@example.com") == [new]

    def test_strict_reuse_interval(
        self, provider: DevProvider, http: httpx.Client, clock: FakeClock
    ) -> None:
        """A retired token works inside the reuse interval, from its first use, and not after."""
        provider.set_options(refresh_token_rotation="strict", refresh_token_reuse_interval=30)
        old = provider.issue_refresh_token("a@example.com")
        lost = refresh(http, old).json()["refresh_token"]  # as if the answer never arrived
        assert provider.refresh_token_status(old) == "reusable"
        clock.advance(20)
        again = refresh(http, old).json()["refresh_token"]
        assert {provider.refresh_token_status(t) for t in (lost, again)} == {"valid"}
        assert provider.valid_refresh_tokens("a@example.com") == [lost, again]
        clock.advance(10)  # 30 s after the first use, however often it was reused
        assert provider.refresh_token_status(old) == "invalid"
        assert refresh(http, old).json()["error"] == "invalid_grant"
        assert [(r.used, r.issued) for r in provider.rotations] == [(old, lost), (old, again)]

    def test_revoking_a_retired_token_revokes_its_grant(
        self, provider: DevProvider, http: httpx.Client
    ) -> None:
        """RFC 7009 revocation of a token in its reuse interval takes the grant with it."""
        provider.set_options(refresh_token_rotation="strict", refresh_token_reuse_interval=30)
        old = provider.issue_refresh_token("a@example.com")
        new = refresh(http, old).json()["refresh_token"]
        provider.revoke_token(old)
        assert provider.refresh_token_status(new) == "invalid"

    def test_client_secret_basic(self, provider: DevProvider, http: httpx.Client) -> None:
        """Credentials in an Authorization: Basic header authenticate the client too."""
        token = provider.issue_refresh_token("a@example.com")
        data = {"grant_type": "refresh_token", "refresh_token": token}
        assert http.post("/token", data=data, auth=DEMO).status_code == 200
        assert provider.requests[-1].client_id == "demo-client"

    @pytest.mark.parametrize("encode", [False, True])
    def test_basic_with_special_characters(self, clock: FakeClock, encode: bool) -> None:
        """Basic credentials work both form-encoded (RFC 6749 §2.3.1) and raw, as clients differ."""
        client_id, secret = "odd client", "s+e:c%2F"
        if encode:
            client_id, secret = quote_plus(client_id), quote_plus(secret)
        header = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
        with DevProvider(clients={"odd client": "s+e:c%2F"}, clock=clock) as provider:
            token = provider.issue_refresh_token("a@example.com", client_id="odd client")
            data = {"grant_type": "refresh_token", "refresh_token": token}
            headers = {"Authorization": f"Basic {header}"}
            response = httpx.post(provider.url + "/token", data=data, headers=headers)
        assert response.status_code == 200
        assert provider.requests[-1].client_id == "odd client"

    def test_public_client_sends_only_its_id(
        self, provider: DevProvider, http: httpx.Client
    ) -> None:
        """A public client authenticates with client_id alone."""
        token = provider.issue_refresh_token("a@example.com", client_id="public-client")
        assert refresh(http, token, client=("public-client", None)).status_code == 200

    @pytest.mark.parametrize(
        "client", [("demo-client", "wrong"), ("demo-client", None), ("nobody", "x")]
    )
    def test_bad_client_is_invalid_client(
        self, provider: DevProvider, http: httpx.Client, client: tuple[str, str | None]
    ) -> None:
        """A wrong secret, a missing secret or an unknown client answer 401 invalid_client."""
        response = refresh(http, provider.issue_refresh_token("a@example.com"), client=client)
        assert response.status_code == 401
        assert response.json()["error"] == "invalid_client"

    def test_token_of_another_client(self, provider: DevProvider, http: httpx.Client) -> None:
        """A refresh token issued to one client is invalid_grant for another."""
        token = provider.issue_refresh_token("a@example.com", client_id="public-client")
        assert refresh(http, token).json()["error"] == "invalid_grant"

    def test_scope_must_be_a_subset(self, provider: DevProvider, http: httpx.Client) -> None:
        """A narrower scope is granted as asked; a wider one is invalid_scope."""
        token = provider.issue_refresh_token("a@example.com", scopes="mail openid")
        assert refresh(http, token, scope="mail").json()["scope"] == "mail"
        assert refresh(http, token, scope="mail admin").json()["error"] == "invalid_scope"

    def test_unknown_grant_type(self, http: httpx.Client) -> None:
        """A grant type the provider does not know is unsupported_grant_type."""
        assert token_request(http, "password").json()["error"] == "unsupported_grant_type"

    @pytest.mark.parametrize("length", [16, 2000])
    def test_access_token_length(
        self, provider: DevProvider, http: httpx.Client, length: int
    ) -> None:
        """Access tokens are as long as asked, from short to Microsoft-sized."""
        provider.set_options(access_token_length=length)
        body = refresh(http, provider.issue_refresh_token("a@example.com")).json()
        assert len(body["access_token"]) == length

    def test_bad_options_are_refused(self, provider: DevProvider) -> None:
        """Unknown options and bad values raise instead of being ignored."""
        with pytest.raises(TypeError):
            provider.set_options(lifetime=5)
        with pytest.raises(ValueError, match="rotation"):
            provider.set_options(refresh_token_rotation="sometimes")

    async def test_concurrent_strict_refreshes_rotate_once(self, provider: DevProvider) -> None:
        """Ten simultaneous refreshes of one strict token: exactly one wins."""
        provider.set_options(refresh_token_rotation="strict")
        token = provider.issue_refresh_token("a@example.com")
        statuses: list[int] = []
        data = {"grant_type": "refresh_token", "refresh_token": token}
        async with httpx.AsyncClient(base_url=provider.url, timeout=5, auth=DEMO) as http:

            async def one() -> None:
                statuses.append((await http.post("/token", data=data)).status_code)

            async with trio.open_nursery() as nursery:
                for _ in range(10):
                    nursery.start_soon(one)
        assert sorted(statuses) == [200] + [400] * 9
        assert len(provider.valid_refresh_tokens("a@example.com")) == 1


class TestClientCredentials:
    def test_confidential_client_gets_access_token(
        self, provider: DevProvider, http: httpx.Client
    ) -> None:
        """client_credentials yields an access token, no refresh token, for client:<id>."""
        body = token_request(http, "client_credentials").json()
        assert "refresh_token" not in body
        assert provider.introspect(body["access_token"])["sub"] == "client:demo-client"

    def test_public_client_is_refused(self, http: httpx.Client) -> None:
        """A public client has no credentials to grant on."""
        response = token_request(http, "client_credentials", client=("public-client", None))
        assert response.json()["error"] == "unauthorized_client"


class TestRevocationAndIntrospection:
    def test_introspection_of_active_token(
        self, provider: DevProvider, http: httpx.Client, clock: FakeClock
    ) -> None:
        """The introspection endpoint describes a live access token as RFC 7662 says."""
        body = refresh(http, provider.issue_refresh_token("a@example.com")).json()
        info = http.post("/introspect", data={"token": body["access_token"]}).json()
        assert info == {
            "active": True,
            "sub": "a@example.com",
            "username": "a@example.com",
            "email": "a@example.com",
            "scope": "mail",
            "client_id": "demo-client",
            "iat": int(clock.now),
            "exp": int(clock.now) + 3600,
            "token_type": "Bearer",
        }
        assert http.post("/introspect", data={"token": "bogus"}).json() == {"active": False}

    def test_revoke_user(self, provider: DevProvider, http: httpx.Client) -> None:
        """After revoke_user the refresh token is invalid_grant and access tokens are inactive."""
        token = provider.issue_refresh_token("a@example.com")
        other = provider.issue_refresh_token("b@example.com")
        access = refresh(http, token).json()["access_token"]
        provider.revoke_user("a@example.com")
        assert refresh(http, token).json()["error"] == "invalid_grant"
        assert provider.introspect(access) == {"active": False}
        assert provider.valid_refresh_tokens("a@example.com") == []
        assert refresh(http, other).status_code == 200

    def test_revoke_endpoint(self, provider: DevProvider, http: httpx.Client) -> None:
        """Revoking a refresh token also revokes its access tokens; unknown tokens are 200."""
        token = provider.issue_refresh_token("a@example.com")
        access = refresh(http, token).json()["access_token"]
        assert http.post("/revoke", data={"token": "unknown"}).status_code == 200
        assert provider.introspect(access)["active"] is True
        revoked = http.post("/revoke", data={"token": token, "token_type_hint": "refresh_token"})
        assert revoked.status_code == 200
        assert provider.introspect(access) == {"active": False}
        assert refresh(http, token).json()["error"] == "invalid_grant"

    def test_revoke_access_token_only(self, provider: DevProvider, http: httpx.Client) -> None:
        """Revoking an access token leaves the refresh token working."""
        token = provider.issue_refresh_token("a@example.com")
        access = refresh(http, token).json()["access_token"]
        provider.revoke_token(access)
        assert provider.introspect(access) == {"active": False}
        assert refresh(http, token).status_code == 200

    def test_expiry_follows_the_clock(
        self, provider: DevProvider, http: httpx.Client, clock: FakeClock
    ) -> None:
        """An access token is active until its lifetime has passed on the injected clock."""
        provider.set_options(access_token_lifetime=60)
        body = refresh(http, provider.issue_refresh_token("a@example.com")).json()
        assert body["expires_in"] == 60
        clock.advance(59.5)
        assert provider.introspect(body["access_token"])["active"] is True
        clock.advance(0.5)
        assert provider.introspect(body["access_token"]) == {"active": False}


class TestFaults:
    def test_status_with_retry_after(self, provider: DevProvider, http: httpx.Client) -> None:
        """A status fault answers once with its status, body and headers; then service resumes."""
        token = provider.issue_refresh_token("a@example.com")
        provider.add_fault("status", status=429, headers={"Retry-After": "30"})
        busy = refresh(http, token)
        assert busy.status_code == 429
        assert busy.headers["Retry-After"] == "30"
        assert busy.json() == {"error": "temporarily_unavailable"}
        assert refresh(http, token).status_code == 200

    def test_faults_queue_in_order(self, provider: DevProvider, http: httpx.Client) -> None:
        """Faults apply in the order added, each `count` times, and are recorded."""
        token = provider.issue_refresh_token("a@example.com")
        provider.add_fault("status", status=500, count=2)
        provider.add_fault("status", status=400, error="invalid_grant")
        statuses = [refresh(http, token).status_code for _ in range(4)]
        assert statuses == [500, 500, 400, 200]
        assert [r.fault for r in provider.requests] == ["status", "status", "status", None]
        assert provider.count(grant_type="refresh_token") == 4

    def test_faults_stay_on_their_path(self, provider: DevProvider, http: httpx.Client) -> None:
        """A fault on /introspect leaves /token alone."""
        provider.add_fault("status", path="/introspect", status=503)
        token = provider.issue_refresh_token("a@example.com")
        assert refresh(http, token).status_code == 200
        assert http.post("/introspect", data={"token": "x"}).status_code == 503

    @pytest.mark.parametrize(
        ("kind", "params"),
        [
            ("status", {"status": 400, "error": "invalid_grant"}),
            ("status", {"status": 502, "body": "Bad Gateway"}),
            ("html", {}),
            ("malformed", {}),
            ("no_access_token", {}),
        ],
    )
    def test_fault_does_not_consume_refresh_token(
        self, provider: DevProvider, http: httpx.Client, kind: str, params: dict[str, Any]
    ) -> None:
        """A faulted request leaves even a strict refresh token unused."""
        provider.set_options(refresh_token_rotation="strict")
        token = provider.issue_refresh_token("a@example.com")
        provider.add_fault(kind, **params)
        refresh(http, token)
        assert provider.valid_refresh_tokens("a@example.com") == [token]
        assert refresh(http, token).status_code == 200

    def test_html(self, provider: DevProvider, http: httpx.Client) -> None:
        """The html fault is an HTML error page, status 500 unless told otherwise."""
        provider.add_fault("html")
        provider.add_fault("html", status=502)
        page = token_request(http, "refresh_token")
        assert page.status_code == 500
        assert page.headers["Content-Type"].startswith("text/html")
        assert "<html>" in page.text
        assert token_request(http, "refresh_token").status_code == 502

    def test_malformed(self, provider: DevProvider, http: httpx.Client) -> None:
        """The malformed fault is a 200 JSON answer cut short."""
        provider.add_fault("malformed")
        response = token_request(http, "refresh_token")
        assert response.status_code == 200
        assert response.headers["Content-Type"] == "application/json"
        with pytest.raises(json.JSONDecodeError):
            response.json()

    def test_no_access_token(self, provider: DevProvider, http: httpx.Client) -> None:
        """The no_access_token fault is a token answer missing its access_token."""
        provider.add_fault("no_access_token")
        body = token_request(http, "refresh_token").json()
        assert body["token_type"] == "Bearer"
        assert "access_token" not in body

    def test_reset(self, provider: DevProvider, http: httpx.Client) -> None:
        """The reset fault drops the connection without an answer, recorded as status 0."""
        provider.add_fault("reset")
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            token_request(http, "refresh_token")
        assert provider.requests[-1].status == 0
        assert provider.requests[-1].fault == "reset"

    def test_hang_until_stop(self, provider: DevProvider, http: httpx.Client) -> None:
        """The hang fault never answers, and stop() does not wait for it."""
        provider.add_fault("hang")
        with pytest.raises(httpx.ReadTimeout):
            http.post("/token", data={"grant_type": "refresh_token"}, timeout=0.1)
        assert provider.requests[-1].fault == "hang"
        started = time.monotonic()
        provider.stop()
        assert time.monotonic() - started < 0.5

    def test_short_hang_closes_without_answer(
        self, provider: DevProvider, http: httpx.Client
    ) -> None:
        """A hang of a few milliseconds ends with the connection closed, not an answer."""
        provider.add_fault("hang", seconds=0.05)
        with pytest.raises(httpx.RemoteProtocolError):
            token_request(http, "refresh_token")

    def test_delay_then_normal_answer(self, provider: DevProvider, http: httpx.Client) -> None:
        """The delay fault waits, then processes the grant and answers normally."""
        token = provider.issue_refresh_token("a@example.com")
        provider.add_fault("delay", seconds=0.1)
        started = time.monotonic()
        response = refresh(http, token)
        assert time.monotonic() - started >= 0.1
        assert response.status_code == 200
        assert provider.requests[-1].fault == "delay"

    def test_delay_processes_grant_for_a_client_that_gave_up(
        self, provider: DevProvider, http: httpx.Client
    ) -> None:
        """A client that times out during a delay still has its strict token rotated away."""
        provider.set_options(refresh_token_rotation="strict")
        token = provider.issue_refresh_token("a@example.com")
        provider.add_fault("delay", seconds=0.3)
        data = {"grant_type": "refresh_token", "refresh_token": token}
        with pytest.raises(httpx.ReadTimeout):
            http.post("/token", data=data, auth=DEMO, timeout=0.05)
        deadline = time.monotonic() + 2
        while provider.count() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert provider.requests[-1].status == 200
        assert refresh(http, token).json()["error"] == "invalid_grant"
        assert len(provider.valid_refresh_tokens("a@example.com")) == 1

    def test_clear_faults(self, provider: DevProvider, http: httpx.Client) -> None:
        """clear_faults drops every pending fault."""
        provider.add_fault("status", count=5)
        provider.clear_faults()
        assert token_request(http, "client_credentials").status_code == 200

    @pytest.mark.parametrize(
        ("kind", "kw"),
        [
            ("explode", {}),
            ("hang", {"second": 1}),
            ("status", {"status": 999}),
            ("status", {"count": 0}),
            ("status", {"path": "/admin/fault"}),
        ],
    )
    def test_bad_faults_are_refused(
        self, provider: DevProvider, kind: str, kw: dict[str, Any]
    ) -> None:
        """Unknown kinds, misspelt parameters and impossible values raise ValueError."""
        with pytest.raises(ValueError, match=r"fault|count|status|path"):
            provider.add_fault(kind, **kw)


class TestAuthorizationCode:
    def exchange(self, http: httpx.Client, code: str, **form: str) -> httpx.Response:
        data = {"redirect_uri": REDIRECT, **form}
        return token_request(http, "authorization_code", DEMO, code=code, **data)

    def test_pkce_happy_path(self, provider: DevProvider, http: httpx.Client) -> None:
        """A code from /authorize with S256 PKCE exchanges for tokens of the login_hint user."""
        verifier, challenge = pkce()
        query = authorize(
            http,
            state="xyz",
            scope="mail",
            code_challenge=challenge,
            code_challenge_method="S256",
            login_hint="a@example.com",
        )
        assert query["state"] == "xyz"
        body = self.exchange(http, query["code"], code_verifier=verifier).json()
        assert "id_token" not in body
        assert provider.introspect(body["access_token"])["username"] == "a@example.com"
        assert refresh(http, body["refresh_token"]).status_code == 200

    def test_default_user(self, provider: DevProvider, http: httpx.Client) -> None:
        """Without login_hint the demo user authorizes."""
        body = self.exchange(http, authorize(http)["code"]).json()
        assert provider.introspect(body["access_token"])["sub"] == "demo@example.com"

    def test_id_token_carries_nonce(self, provider: DevProvider, http: httpx.Client) -> None:
        """With scope openid the answer has an unsigned id_token with the nonce."""
        query = authorize(http, scope="openid mail", nonce="n-123", login_hint="a@example.com")
        id_token = self.exchange(http, query["code"]).json()["id_token"]
        assert id_token.endswith(".")
        assert jwt_part(id_token, 0) == {"alg": "none", "typ": "JWT"}
        claims = jwt_part(id_token, 1)
        assert claims["nonce"] == "n-123"
        assert claims["aud"] == "demo-client"
        assert claims["email"] == claims["sub"] == "a@example.com"
        assert claims["iss"] == provider.url
        assert claims["exp"] > claims["iat"]

    def test_replayed_code_revokes_its_tokens(
        self, provider: DevProvider, http: httpx.Client
    ) -> None:
        """Using a code twice fails and revokes the tokens the first use issued."""
        code = authorize(http)["code"]
        first = self.exchange(http, code).json()
        assert self.exchange(http, code).json()["error"] == "invalid_grant"
        assert provider.introspect(first["access_token"]) == {"active": False}
        assert refresh(http, first["refresh_token"]).json()["error"] == "invalid_grant"

    @pytest.mark.parametrize("verifier", ["wrong-verifier-" + "x" * 40, None])
    def test_bad_verifier(self, http: httpx.Client, verifier: str | None) -> None:
        """A wrong or missing PKCE verifier is invalid_grant."""
        _, challenge = pkce()
        code = authorize(http, code_challenge=challenge, code_challenge_method="S256")["code"]
        form = {} if verifier is None else {"code_verifier": verifier}
        assert self.exchange(http, code, **form).json()["error"] == "invalid_grant"

    def test_redirect_uri_must_match(self, http: httpx.Client) -> None:
        """The token request must repeat the authorization's redirect_uri."""
        code = authorize(http)["code"]
        other = self.exchange(http, code, redirect_uri="http://127.0.0.1:1/other")
        assert other.json()["error"] == "invalid_grant"

    def test_expired_code(self, http: httpx.Client, clock: FakeClock) -> None:
        """A code not exchanged within ten minutes is invalid_grant."""
        code = authorize(http)["code"]
        clock.advance(601)
        assert self.exchange(http, code).json()["error"] == "invalid_grant"

    def test_plain_pkce_is_refused(self, provider: DevProvider, http: httpx.Client) -> None:
        """PKCE method plain is not supported and is redirected back as invalid_request."""
        query = authorize(http, code_challenge="abc", code_challenge_method="plain", state="s")
        assert query == {
            "error": "invalid_request",
            "error_description": "PKCE supports S256 only",
            "state": "s",
            "iss": provider.url,
        }

    def test_denied_authorization(self, provider: DevProvider, http: httpx.Client) -> None:
        """After deny_next_authorization one /authorize redirects back with access_denied."""
        provider.deny_next_authorization()
        denied = authorize(http, state="s")
        assert denied == {"error": "access_denied", "state": "s", "iss": provider.url}
        assert "code" in authorize(http)

    def test_response_issuer_and_identity(self, provider: DevProvider, http: httpx.Client) -> None:
        """Answers name the issuer (RFC 9207) unless told otherwise; sign_in_next_as picks the
        user; ID token claims may be changed or removed."""
        assert http.get("/.well-known/openid-configuration").json()[
            "authorization_response_iss_parameter_supported"
        ]
        provider.set_response_issuer("https://elsewhere.example")
        assert authorize(http)["iss"] == "https://elsewhere.example"
        provider.set_response_issuer(None)
        assert "iss" not in authorize(http)
        provider.sign_in_next_as("bob@example.com")
        provider.set_id_token_claims(aud="another", email=None)
        code = authorize(http, scope="openid mail")["code"]
        claims = jwt_part(self.exchange(http, code).json()["id_token"], 1)
        assert claims["sub"] == "bob@example.com"
        assert claims["aud"] == "another"
        assert "email" not in claims

    @pytest.mark.parametrize(
        "params",
        [
            {"client_id": "demo-client", "redirect_uri": "https://evil.example/cb"},
            {"client_id": "demo-client", "redirect_uri": "http://127.0.0.2:80/cb"},
            {"client_id": "demo-client"},
            {"client_id": "nobody", "redirect_uri": REDIRECT},
        ],
    )
    def test_no_redirect_to_strangers(self, http: httpx.Client, params: dict[str, str]) -> None:
        """A non-loopback or missing redirect_uri, or an unknown client, get a 400 page."""
        response = http.get("/authorize", params={"response_type": "code", **params})
        assert response.status_code == 400
        assert "Location" not in response.headers
        assert response.headers["Content-Type"].startswith("text/html")


class TestDeviceFlow:
    def start_flow(self, http: httpx.Client) -> dict[str, Any]:
        response = http.post("/device_authorization", data={"client_id": "public-client"})
        assert response.status_code == 200
        body: dict[str, Any] = response.json()
        return body

    def poll(self, http: httpx.Client, device_code: str) -> httpx.Response:
        client = ("public-client", None)
        return token_request(http, GrantType.DEVICE_CODE, client=client, device_code=device_code)

    def test_pending_slow_down_approved(
        self, provider: DevProvider, http: httpx.Client, clock: FakeClock
    ) -> None:
        """Polls are pending, too-fast polls slow_down (+5 s), and approval yields tokens once."""
        flow = self.start_flow(http)
        assert re.fullmatch(r"[A-Z]{4}-[A-Z]{4}", flow["user_code"])
        assert flow["verification_uri"] == provider.url + "/device"
        assert flow["verification_uri_complete"].endswith(flow["user_code"])
        assert (flow["expires_in"], flow["interval"]) == (600, 5)
        code = flow["device_code"]
        assert self.poll(http, code).json()["error"] == "authorization_pending"
        clock.advance(1)
        assert self.poll(http, code).json()["error"] == "slow_down"
        clock.advance(6)  # the interval is now 10 s
        assert self.poll(http, code).json()["error"] == "slow_down"
        clock.advance(15)
        assert self.poll(http, code).json()["error"] == "authorization_pending"
        provider.approve_device(flow["user_code"].lower(), "a@example.com")
        body = self.poll(http, code).json()
        assert provider.introspect(body["access_token"])["username"] == "a@example.com"
        assert refresh(http, body["refresh_token"], client=("public-client", None)).is_success
        assert self.poll(http, code).json()["error"] == "invalid_grant"

    def test_denied(self, provider: DevProvider, http: httpx.Client) -> None:
        """A denied device authorization polls as access_denied."""
        flow = self.start_flow(http)
        provider.deny_device(flow["user_code"])
        assert self.poll(http, flow["device_code"]).json()["error"] == "access_denied"

    def test_expired(self, provider: DevProvider, http: httpx.Client, clock: FakeClock) -> None:
        """After expires_in the device code is expired_token and can no longer be approved."""
        provider.set_options(device_expires_in=30, device_interval=0)
        flow = self.start_flow(http)
        assert flow["expires_in"] == 30
        clock.advance(30)
        assert self.poll(http, flow["device_code"]).json()["error"] == "expired_token"
        with pytest.raises(ValueError, match="no longer pending"):
            provider.approve_device(flow["user_code"], "a@example.com")

    def test_human_page_approves(self, provider: DevProvider, http: httpx.Client) -> None:
        """Opening verification_uri_complete with a user approves the device."""
        flow = self.start_flow(http)
        page = http.get(flow["verification_uri_complete"] + "&user=h%40example.com")
        assert page.status_code == 200
        assert "Approved" in page.text
        body = self.poll(http, flow["device_code"]).json()
        assert provider.introspect(body["access_token"])["sub"] == "h@example.com"
        assert http.get("/device", params={"user_code": "BBBB-BBBB"}).status_code == 400

    def test_unknown_user_code(self, provider: DevProvider) -> None:
        """approve_device on a code nobody asked for raises KeyError."""
        with pytest.raises(KeyError):
            provider.approve_device("ZZZZ-ZZZZ", "a@example.com")


class TestDiscovery:
    def test_both_documents(self, provider: DevProvider, http: httpx.Client) -> None:
        """Both well-known paths serve the same document naming every endpoint."""
        oidc = http.get("/.well-known/openid-configuration").json()
        assert http.get("/.well-known/oauth-authorization-server").json() == oidc
        assert oidc["issuer"] == provider.url
        assert {k: oidc[k] for k in provider.endpoints} == provider.endpoints
        assert oidc["code_challenge_methods_supported"] == ["S256"]
        assert GrantType.DEVICE_CODE in oidc["grant_types_supported"]


class TestAdminHTTP:
    def test_issue_fault_requests_options(self, provider: DevProvider, http: httpx.Client) -> None:
        """The /admin endpoints drive the provider like the Python API, and are not recorded."""
        issued = http.post("/admin/issue", json={"user": "a@example.com", "scopes": ["mail"]})
        token = issued.json()["refresh_token"]
        assert provider.valid_refresh_tokens("a@example.com") == [token]
        assert http.post("/admin/fault", json={"kind": "status", "status": 503}).json() == {}
        assert refresh(http, token).status_code == 503
        http.post("/admin/fault", json={"kind": "status", "count": 3})
        assert http.post("/admin/clear-faults").status_code == 200
        options = http.post("/admin/options", json={"refresh_token_rotation": "none"}).json()
        assert options["refresh_token_rotation"] == "none"
        assert "refresh_token" not in refresh(http, token).json()
        records = http.get("/admin/requests").json()
        assert [(r["path"], r["status"], r["fault"]) for r in records] == [
            ("/token", 503, "status"),
            ("/token", 200, None),
        ]
        assert records[0]["grant_type"] == "refresh_token"
        assert records[0]["client_id"] == "demo-client"

    def test_revoke(self, provider: DevProvider, http: httpx.Client) -> None:
        """/admin/revoke takes a user or a token."""
        first = provider.issue_refresh_token("a@example.com")
        second = provider.issue_refresh_token("b@example.com")
        assert http.post("/admin/revoke", json={"token": first}).status_code == 200
        assert http.post("/admin/revoke", json={"user": "b@example.com"}).status_code == 200
        assert refresh(http, first).json()["error"] == "invalid_grant"
        assert refresh(http, second).json()["error"] == "invalid_grant"

    def test_approve_device(self, provider: DevProvider, http: httpx.Client) -> None:
        """/admin/approve-device approves like the human page."""
        flow = http.post("/device_authorization", data={"client_id": "public-client"}).json()
        body = {"user_code": flow["user_code"], "user": "a@example.com"}
        assert http.post("/admin/approve-device", json=body).status_code == 200
        form = {"device_code": flow["device_code"]}
        poll = token_request(http, GrantType.DEVICE_CODE, client=("public-client", None), **form)
        assert provider.introspect(poll.json()["access_token"])["sub"] == "a@example.com"

    @pytest.mark.parametrize(
        ("path", "body"),
        [
            ("/admin/issue", {}),
            ("/admin/fault", {"kind": "explode"}),
            ("/admin/options", {"nope": 1}),
            ("/admin/revoke", {}),
            ("/admin/approve-device", {"user_code": "ZZZZ-ZZZZ"}),
        ],
    )
    def test_bad_requests(self, http: httpx.Client, path: str, body: dict[str, Any]) -> None:
        """Bad admin requests answer 400 with a description, never a dropped connection."""
        response = http.post(path, json=body)
        assert response.status_code == 400
        assert response.json()["error"] == "invalid_request"

    def test_invalid_json(self, http: httpx.Client) -> None:
        """A body that is not a JSON object is a 400."""
        response = http.post("/admin/issue", content=b"[1, 2")
        assert response.status_code == 400


class TestRecords:
    def test_records_use_the_clock(
        self, provider: DevProvider, http: httpx.Client, clock: FakeClock
    ) -> None:
        """Each record carries the injected clock's time, method, path, grant type and client."""
        token_request(http, "client_credentials")
        clock.advance(10)
        http.get("/.well-known/openid-configuration")
        first, second = provider.requests
        assert (first.time, first.method, first.path) == (clock.now - 10, "POST", "/token")
        assert (first.grant_type, first.client_id, first.status) == (
            "client_credentials",
            "demo-client",
            200,
        )
        assert (second.time, second.method, second.grant_type) == (clock.now, "GET", None)
        assert provider.count(path="/.well-known/openid-configuration") == 1


class TestObservation:
    def test_received_and_wait_for(self, provider: DevProvider, http: httpx.Client) -> None:
        """A delayed request counts as received at once; wait_for wakes on arrival and record."""
        token = provider.issue_refresh_token("a@example.com")
        provider.add_fault("delay", seconds=0.3)
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(refresh, http, token)
            assert provider.wait_for(lambda: provider.received == 1, timeout=5)
            assert provider.requests == []  # arrived, not yet answered
            assert provider.wait_for(lambda: len(provider.requests) == 1, timeout=5)
            assert answer.result().status_code == 200
        assert not provider.wait_for(lambda: provider.received == 2, timeout=0.05)

    def test_issued_secrets(self, provider: DevProvider, http: httpx.Client) -> None:
        """Every token, code and verifier the provider handed out or saw is listed."""
        verifier, challenge = pkce()
        query = authorize(http, code_challenge=challenge, code_challenge_method="S256")
        data = {"redirect_uri": REDIRECT, "code": query["code"], "code_verifier": verifier}
        body = token_request(http, "authorization_code", **data).json()
        flow = http.post("/device_authorization", data={"client_id": "public-client"}).json()
        issued = provider.issued_secrets()
        wanted = [body["access_token"], body["refresh_token"], query["code"], verifier]
        assert set(wanted + [flow["device_code"], "demo-secret"]) <= set(issued)


@pytest.mark.integration
class TestCommandLine:
    def test_subprocess(self) -> None:
        """The command line prints one JSON line once listening, serves, and exits 0 on SIGTERM."""
        argv = [sys.executable, "-m", "mailoauthd.testing", "--port", "0", "--rotation", "none"]
        with subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ) as proc:
            try:
                assert proc.stdout is not None
                assert proc.stderr is not None
                ready, _, _ = select.select([proc.stdout], [], [], 10)
                assert ready, "the provider printed nothing"
                info = json.loads(proc.stdout.readline())
                assert info["token_endpoint"] == info["url"] + "/token"
                assert info["issuer"] == info["url"]
                with httpx.Client(base_url=info["url"], timeout=5) as http:
                    issued = http.post("/admin/issue", json={"user": "a@example.com"})
                    body = refresh(http, issued.json()["refresh_token"]).json()
                    assert "refresh_token" not in body
            finally:
                proc.terminate()
            assert proc.wait(timeout=5) == 0
            assert proc.stderr.read() == ""
