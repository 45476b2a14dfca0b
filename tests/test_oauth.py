"""
Tests for mailoauthd.provider.oauth: building grant requests, classifying responses, and
`send`.
"""

from __future__ import annotations

import base64
import dataclasses
import email.utils
import json
from collections.abc import AsyncIterator, Awaitable, Iterable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs

import httpx
import pytest
import trio

from mailoauthd.errors import (
    GrantError,
    Misconfigured,
    ReauthorizationRequired,
    TransientGrantError,
)
from mailoauthd.presets import MICROSOFT_EXPLANATIONS
from mailoauthd.provider import oauth, provider_http
from mailoauthd.provider.oauth import Client, explain, parse_token_response
from mailoauthd.secret import Secret

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
TOKEN_ENDPOINT = "https://login.example.test/oauth2/token"  # noqa: S105 - a URL
REVOCATION_ENDPOINT = "https://login.example.test/oauth2/revoke"
CLIENT_ID = "demo-client"
CLIENT_SECRET = "cs-5e8d21-do-not-print"  # noqa: S105 - a recognisable test value
REFRESH = "rt-91ab07-do-not-print"
ACCOUNT = "work"

POST_CLIENT = Client(
    token_endpoint=TOKEN_ENDPOINT, client_id=CLIENT_ID, client_secret=Secret(CLIENT_SECRET)
)
BASIC_CLIENT = dataclasses.replace(POST_CLIENT, auth_method="client_secret_basic")
PUBLIC_CLIENT = Client(token_endpoint=TOKEN_ENDPOINT, client_id=CLIENT_ID)


# --- the fake provider -------------------------------------------------------


def token_reply(**fields: object) -> httpx.Response:
    """A 200 token response; a field given as None is left out."""
    body: dict[str, object] = {
        "access_token": "at-new",
        "token_type": "Bearer",
        "expires_in": 3600,
        "refresh_token": "rt-next",
        "scope": "IMAP.AccessAsUser.All offline_access",
    }
    body.update(fields)
    return httpx.Response(200, json={k: v for k, v in body.items() if v is not None})


def error_reply(
    error: str, description: str = "", status: int = 400, headers: dict[str, str] | None = None
) -> httpx.Response:
    """An RFC 6749 §5.2 error response."""
    body = {"error": error, "error_description": description} if description else {"error": error}
    return httpx.Response(status, json=body, headers=headers)


def html_reply(status: int, headers: dict[str, str] | None = None) -> httpx.Response:
    """The HTML error page a proxy or load balancer answers with."""
    return httpx.Response(
        status,
        content=b"<html><body><h1>Something went wrong</h1></body></html>",
        headers={"Content-Type": "text/html; charset=utf-8", **(headers or {})},
    )


class FakeProvider:
    """A scripted token endpoint: records every request and replays its replies in order."""

    def __init__(self, replies: Iterable[httpx.Response]) -> None:
        self.replies = list(replies)
        self.requests: list[httpx.Request] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        reply = self.replies.pop(0)
        # A fresh copy, so that one scripted reply can serve several tests.
        return httpx.Response(reply.status_code, headers=reply.headers, content=reply.content)

    def form(self, index: int = -1) -> dict[str, str]:
        """The urlencoded body of a recorded request, one value per field."""
        body = self.requests[index].content.decode("ascii")
        fields = parse_qs(body, keep_blank_values=True, strict_parsing=True)
        assert all(1 == len(values) for values in fields.values())
        return {key: values[0] for key, values in fields.items()}

    @asynccontextmanager
    async def client(self) -> AsyncIterator[httpx.AsyncClient]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(self.handle)) as http:
            yield http


async def exchange(provider: FakeProvider, request: httpx.Request) -> oauth.TokenSet:
    """Send a request to the fake provider and parse what it answers."""
    async with provider.client() as http:
        with trio.fail_after(5):
            response = await provider_http.send(http, request)
    return parse_token_response(response, now=T0, account=ACCOUNT)


async def sent(request: httpx.Request) -> FakeProvider:
    """The provider after it received `request` (and answered with tokens)."""
    provider = FakeProvider([token_reply()])
    await exchange(provider, request)
    return provider


def parse(response: httpx.Response) -> oauth.TokenSet:
    """Parse a token endpoint answer for account `work`, arriving at T0."""
    return parse_token_response(response, now=T0, account=ACCOUNT)


def basic(user: str, password: str) -> str:
    """The Authorization header value of HTTP Basic authentication."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# --- building requests --------------------------------------------------------


class TestRefreshRequest:
    async def test_client_secret_post(self) -> None:
        """A refresh posts the grant, the token, the scopes and both client credentials."""
        request = oauth.refresh_request(POST_CLIENT, Secret(REFRESH), ("IMAP", "offline_access"))
        provider = await sent(request)
        seen = provider.requests[0]
        assert ("POST", TOKEN_ENDPOINT) == (seen.method, str(seen.url))
        assert "application/x-www-form-urlencoded" == seen.headers["Content-Type"]
        assert "application/json" == seen.headers["Accept"]
        assert "Authorization" not in seen.headers
        assert {
            "grant_type": "refresh_token",
            "refresh_token": REFRESH,
            "scope": "IMAP offline_access",
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
        } == provider.form()

    @pytest.mark.parametrize("scopes", [None, ()])
    async def test_no_scopes_sends_no_scope(self, scopes: tuple[str, ...] | None) -> None:
        """Without scopes to ask for, the request keeps what was granted (no scope field)."""
        provider = await sent(oauth.refresh_request(POST_CLIENT, Secret(REFRESH), scopes))
        assert "scope" not in provider.form()

    async def test_client_secret_basic(self) -> None:
        """client_secret_basic sends the credentials in an Authorization header, not the body."""
        provider = await sent(oauth.refresh_request(BASIC_CLIENT, Secret(REFRESH), ("IMAP",)))
        seen = provider.requests[0]
        assert basic(CLIENT_ID, CLIENT_SECRET) == seen.headers["Authorization"]
        assert CLIENT_SECRET.encode() not in seen.content
        assert {"grant_type": "refresh_token", "refresh_token": REFRESH, "scope": "IMAP"} == (
            provider.form()
        )

    @pytest.mark.parametrize("auth_method", ["client_secret_post", "client_secret_basic"])
    async def test_public_client(self, auth_method: str) -> None:
        """A client without a secret sends its client_id in the body and nothing else."""
        client = dataclasses.replace(PUBLIC_CLIENT, auth_method=auth_method)
        provider = await sent(oauth.refresh_request(client, Secret(REFRESH)))
        assert "Authorization" not in provider.requests[0].headers
        assert {
            "grant_type": "refresh_token",
            "refresh_token": REFRESH,
            "client_id": CLIENT_ID,
        } == (provider.form())


class TestClientCredentialsRequest:
    async def test_client_secret_post(self) -> None:
        """A client_credentials grant posts the grant, the scopes and both client credentials."""
        scopes = ("https://outlook.office365.com/.default", "extra")
        provider = await sent(oauth.client_credentials_request(POST_CLIENT, scopes))
        assert {
            "grant_type": "client_credentials",
            "scope": "https://outlook.office365.com/.default extra",
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
        } == provider.form()
        assert TOKEN_ENDPOINT == str(provider.requests[0].url)

    async def test_client_secret_basic(self) -> None:
        """With client_secret_basic the secret goes only into the Authorization header."""
        provider = await sent(oauth.client_credentials_request(BASIC_CLIENT, ("s",)))
        assert basic(CLIENT_ID, CLIENT_SECRET) == provider.requests[0].headers["Authorization"]
        assert {"grant_type": "client_credentials", "scope": "s"} == provider.form()


class TestRevocationRequest:
    async def test_client_secret_post(self) -> None:
        """Revocation posts the token to the revocation endpoint with the client's credentials."""
        request = oauth.revocation_request(POST_CLIENT, REVOCATION_ENDPOINT, Secret(REFRESH))
        provider = await sent(request)
        assert ("POST", REVOCATION_ENDPOINT) == (
            provider.requests[0].method,
            str(provider.requests[0].url),
        )
        assert {"token": REFRESH, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET} == (
            provider.form()
        )

    async def test_client_secret_basic(self) -> None:
        """Revocation with client_secret_basic authenticates in the header."""
        request = oauth.revocation_request(BASIC_CLIENT, REVOCATION_ENDPOINT, Secret(REFRESH))
        provider = await sent(request)
        assert basic(CLIENT_ID, CLIENT_SECRET) == provider.requests[0].headers["Authorization"]
        assert {"token": REFRESH} == provider.form()


class TestRevocationHint:
    async def test_token_type_hint(self) -> None:
        """A revocation can say which kind of token it carries (RFC 7009 token_type_hint)."""
        request = oauth.revocation_request(
            POST_CLIENT, REVOCATION_ENDPOINT, Secret(REFRESH), "refresh_token"
        )
        provider = await sent(request)
        assert "refresh_token" == provider.form()["token_type_hint"]


class TestSignInRequests:
    async def test_authorization_code(self) -> None:
        """The code exchange posts the code, the exact redirect URI and the PKCE verifier."""
        request = oauth.authorization_code_request(
            PUBLIC_CLIENT, Secret("code-123"), "http://127.0.0.1:8765/", Secret("verifier-456")
        )
        provider = await sent(request)
        assert TOKEN_ENDPOINT == str(provider.requests[0].url)
        assert {
            "grant_type": "authorization_code",
            "code": "code-123",
            "redirect_uri": "http://127.0.0.1:8765/",
            "code_verifier": "verifier-456",
            "client_id": CLIENT_ID,
        } == provider.form()

    async def test_device_authorization(self) -> None:
        """A device authorization posts the scopes to the device endpoint."""
        endpoint = "https://login.example.test/oauth2/devicecode"
        provider = await sent(
            oauth.device_authorization_request(PUBLIC_CLIENT, endpoint, ("a", "b"))
        )
        assert endpoint == str(provider.requests[0].url)
        assert {"scope": "a b", "client_id": CLIENT_ID} == provider.form()

    async def test_device_token_poll(self) -> None:
        """A device poll posts the device_code grant to the token endpoint."""
        provider = await sent(oauth.device_token_request(BASIC_CLIENT, Secret("dev-789")))
        assert basic(CLIENT_ID, CLIENT_SECRET) == provider.requests[0].headers["Authorization"]
        assert {
            "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
            "device_code": "dev-789",
        } == provider.form()

    def test_rejected_code_names_its_subject(self) -> None:
        """A rejection names what was rejected, so a refused sign-in is not called a refresh."""
        with pytest.raises(ReauthorizationRequired) as info:
            parse_token_response(
                error_reply("invalid_grant", "code expired"),
                now=T0,
                account=ACCOUNT,
                subject="the authorization code",
            )
        assert "rejected the authorization code" in info.value.message


class TestExchange:
    async def test_scripted_refreshes(self) -> None:
        """Tokens come back from a refresh, and a later rejection is a ReauthorizationRequired."""
        provider = FakeProvider([token_reply(), error_reply("invalid_grant", "revoked")])
        request = oauth.refresh_request(POST_CLIENT, Secret(REFRESH))
        tokens = await exchange(provider, request)
        assert Secret("at-new") == tokens.access_token
        with pytest.raises(ReauthorizationRequired):
            await exchange(provider, oauth.refresh_request(POST_CLIENT, Secret("rt-next")))
        assert [REFRESH, "rt-next"] == [provider.form(i)["refresh_token"] for i in (0, 1)]


# --- parsing responses ---------------------------------------------------------


class TestParseSuccess:
    def test_good_response(self) -> None:
        """A full answer gives the token, expiry now + expires_in, the refresh token and scopes."""
        tokens = parse(token_reply())
        assert Secret("at-new") == tokens.access_token
        assert "Bearer" == tokens.token_type
        assert T0 + timedelta(seconds=3600) == tokens.expires_at
        assert Secret("rt-next") == tokens.refresh_token
        assert ("IMAP.AccessAsUser.All", "offline_access") == tokens.scopes

    def test_refresh_token_and_scope_are_optional(self) -> None:
        """Without refresh_token and scope the answer is still good; both come back as None."""
        tokens = parse(token_reply(refresh_token=None, scope=None))
        assert (None, None) == (tokens.refresh_token, tokens.scopes)

    def test_expires_in_as_a_string(self) -> None:
        """An expires_in sent as a string of digits is understood."""
        assert T0 + timedelta(seconds=3600) == parse(token_reply(expires_in="3600")).expires_at

    def test_expires_in_missing(self) -> None:
        """Without expires_in the token is taken to last the default hour."""
        tokens = parse(token_reply(expires_in=None))
        assert T0 + timedelta(seconds=oauth.DEFAULT_EXPIRES_IN) == tokens.expires_at

    @pytest.mark.parametrize("token_type", ["bearer", "BEARER", None])
    def test_token_type_bearer_in_any_case(self, token_type: str | None) -> None:
        """token_type bearer is accepted in any case, and a missing one means Bearer."""
        assert "Bearer" == parse(token_reply(token_type=token_type)).token_type


CLASSIFICATION = [
    # 200s that carry no usable token: the provider is misbehaving, try again later.
    pytest.param(token_reply(access_token=None), TransientGrantError, id="200-no-access-token"),
    pytest.param(token_reply(access_token=""), TransientGrantError, id="200-empty-access-token"),
    pytest.param(html_reply(200), TransientGrantError, id="200-html"),
    pytest.param(
        httpx.Response(200, content=b'{"access_token": "at", ', headers={"Content-Type": "json"}),
        TransientGrantError,
        id="200-malformed-json",
    ),
    pytest.param(httpx.Response(200, json=["at-new"]), TransientGrantError, id="200-json-list"),
    pytest.param(token_reply(expires_in=-60), TransientGrantError, id="expires-in-negative"),
    pytest.param(token_reply(expires_in=0), TransientGrantError, id="expires-in-zero"),
    pytest.param(token_reply(expires_in="soon"), TransientGrantError, id="expires-in-word"),
    pytest.param(token_reply(expires_in=True), TransientGrantError, id="expires-in-bool"),
    pytest.param(
        token_reply(token_type="mac"),  # noqa: S106 - a token type, not a secret
        Misconfigured,
        id="token-type-mac",
    ),
    # RFC 6749 §5.2 errors.
    pytest.param(error_reply("invalid_grant"), ReauthorizationRequired, id="invalid_grant"),
    pytest.param(
        error_reply("interaction_required"), ReauthorizationRequired, id="interaction_required"
    ),
    pytest.param(error_reply("consent_required"), ReauthorizationRequired, id="consent_required"),
    pytest.param(error_reply("invalid_client", status=401), Misconfigured, id="invalid_client"),
    pytest.param(error_reply("unauthorized_client"), Misconfigured, id="unauthorized_client"),
    pytest.param(error_reply("invalid_scope"), Misconfigured, id="invalid_scope"),
    pytest.param(error_reply("unsupported_grant_type"), Misconfigured, id="unsupported_grant"),
    pytest.param(
        error_reply("temporarily_unavailable"), TransientGrantError, id="temporarily_unavailable"
    ),
    # RFC 6749 §5.2: every error code is final but temporarily_unavailable (issue #10).
    pytest.param(error_reply("brand_new_error"), ReauthorizationRequired, id="unknown-error-code"),
    pytest.param(
        httpx.Response(200, json={"error": "invalid_code"}),
        ReauthorizationRequired,
        id="200-unknown-error-code",
    ),
    pytest.param(error_reply("invalid_request"), Misconfigured, id="invalid_request"),
    pytest.param(error_reply("invalid_resource"), Misconfigured, id="invalid_resource"),
    pytest.param(
        error_reply("invalid_grant", "AADSTS9001023: The grant type is not supported over two"),
        Misconfigured,
        id="aadsts9001023",
    ),
    pytest.param(
        error_reply("invalid_grant", "AADSTS50196: The server terminated an operation"),
        TransientGrantError,
        id="aadsts50196-throttle",
    ),
    # Server trouble, whatever the body says.
    *(
        pytest.param(error_reply("server_error", status=s), TransientGrantError, id=f"{s}-json")
        for s in (500, 502, 503)
    ),
    *(pytest.param(html_reply(s), TransientGrantError, id=f"{s}-html") for s in (500, 502, 503)),
    pytest.param(
        error_reply("invalid_grant", status=503), TransientGrantError, id="503-invalid-grant"
    ),
    pytest.param(error_reply("slow_down", status=429), TransientGrantError, id="429-json"),
    pytest.param(html_reply(429), TransientGrantError, id="429-html"),
    # A 4xx without an OAuth error: retried once, then the grant is taken as dead.
    pytest.param(html_reply(404), oauth.BareRefusal, id="404-html"),
    pytest.param(html_reply(401), oauth.BareRefusal, id="401-html"),
    pytest.param(httpx.Response(401), oauth.BareRefusal, id="401-empty"),
    pytest.param(httpx.Response(400), oauth.BareRefusal, id="400-empty"),
    pytest.param(html_reply(403), oauth.BareRefusal, id="403-html"),
    pytest.param(httpx.Response(408), TransientGrantError, id="408-empty"),
]


class TestParseClassification:
    @pytest.mark.parametrize(("response", "expected"), CLASSIFICATION)
    def test_classification(self, response: httpx.Response, expected: type[GrantError]) -> None:
        """Each kind of answer raises exactly the error class that tells the daemon what to do."""
        with pytest.raises(GrantError) as info:
            parse(response)
        assert expected is type(info.value)
        assert "\n" not in str(info.value)

    @pytest.mark.parametrize(
        "error",
        ["invalid_grant", "invalid_client", "server_error", "brand_new_error"],
    )
    def test_oauth_error_is_kept(self, error: str) -> None:
        """The provider's error code travels on the exception for logs and status."""
        with pytest.raises(GrantError) as info:
            parse(error_reply(error, "something"))
        assert error == info.value.oauth_error
        assert error in info.value.message

    def test_invalid_grant_hint_names_the_command(self) -> None:
        """A rejected refresh token tells the user to run `mailoauth authorize <account>`."""
        with pytest.raises(ReauthorizationRequired) as info:
            parse(error_reply("invalid_grant", "Bad Request"))
        assert "mailoauth authorize work" in info.value.hint
        assert "needs-auth" == info.value.code
        assert 4 == info.value.exit_code

    def test_error_answered_with_200_is_still_an_error(self) -> None:
        """A provider that answers an OAuth error with HTTP 200 is classified by its error code."""
        with pytest.raises(ReauthorizationRequired):
            parse(error_reply("invalid_grant", "revoked", status=200))

    def test_long_description_stays_one_short_line(self) -> None:
        """A huge multi-line error_description is cut to one line of bounded length."""
        with pytest.raises(GrantError) as info:
            parse(error_reply("invalid_request", "line\r\n" * 500))
        assert "\n" not in info.value.message
        assert len(info.value.message) < oauth.MAX_DESCRIPTION + 100


class TestRetryAfter:
    @pytest.mark.parametrize(
        "response",
        [
            error_reply("slow_down", status=429, headers={"Retry-After": "30"}),
            html_reply(429, headers={"Retry-After": "30"}),
            html_reply(503, headers={"Retry-After": " 30 "}),
        ],
        ids=["429-json", "429-html", "503-html"],
    )
    def test_seconds(self, response: httpx.Response) -> None:
        """Retry-After in seconds becomes retry_after on the transient error."""
        with pytest.raises(TransientGrantError) as info:
            parse(response)
        assert 30.0 == info.value.retry_after

    @pytest.mark.parametrize(
        ("when", "expected"), [(T0 + timedelta(seconds=90), 90.0), (T0 - timedelta(hours=1), 0.0)]
    )
    def test_http_date(self, when: datetime, expected: float) -> None:
        """Retry-After as an HTTP date is the time from now until then, never negative."""
        header = email.utils.format_datetime(when, usegmt=True)
        with pytest.raises(TransientGrantError) as info:
            parse(error_reply("slow_down", status=429, headers={"Retry-After": header}))
        assert expected == info.value.retry_after

    @pytest.mark.parametrize("header", [None, "", "soon", "-5", "1.5"])
    def test_unusable_header_is_ignored(self, header: str | None) -> None:
        """A missing or unreadable Retry-After leaves retry_after unset."""
        headers = {} if header is None else {"Retry-After": header}
        with pytest.raises(TransientGrantError) as info:
            parse(html_reply(429, headers=headers))
        assert info.value.retry_after is None

    def test_unicode_digit_header_is_ignored(self) -> None:
        """A Retry-After of a non-ASCII 'digit' (latin-1 byte 0xB2) is ignored, not a crash."""
        response = httpx.Response(
            503, headers=[(b"Retry-After", b"\xb2")], content=b"<html></html>"
        )
        with pytest.raises(TransientGrantError) as info:
            parse(response)
        assert info.value.retry_after is None


class TestUnusableExpiry:
    @pytest.mark.parametrize(
        "expires_in", ["²", 10**12, 1e300], ids=["superscript", "1e12", "1e300"]
    )
    def test_is_a_grant_error(self, expires_in: object) -> None:
        """An expires_in that cannot become an expiry time is a GrantError, never a crash."""
        try:
            tokens = parse(token_reply(expires_in=expires_in))
        except GrantError:
            return
        assert tokens.expires_at > T0


# --- explanations ------------------------------------------------------------


class TestExplain:
    @pytest.mark.parametrize(("code", "words"), sorted(MICROSOFT_EXPLANATIONS.items()))
    def test_aadsts_codes(self, code: str, words: tuple[str, str]) -> None:
        """Each known AADSTS code gives its own message and hint, with the account filled in."""
        description = f"AADSTS{code}: Something went wrong. Trace ID: 0f3e Timestamp: 2026-11-01"
        message, hint = explain("invalid_grant", description, "home")
        assert f"AADSTS{code}: {words[0]}" == message
        assert words[1].format(account="home") == hint
        assert "{" not in hint
        if "{account}" in words[1]:
            assert "mailoauth authorize home" in hint

    @pytest.mark.parametrize(
        "code",
        sorted(
            long
            for long in MICROSOFT_EXPLANATIONS
            if any(long != short and long.startswith(short) for short in MICROSOFT_EXPLANATIONS)
        ),
    )
    def test_longer_code_is_not_mistaken_for_a_prefix(self, code: str) -> None:
        """A code such as AADSTS700082 is explained as itself, not as its prefix AADSTS70008."""
        message, _ = explain("invalid_grant", f"AADSTS{code}: Something went wrong", "w")
        assert f"AADSTS{code}: {MICROSOFT_EXPLANATIONS[code][0]}" == message

    def test_unknown_aadsts_code(self) -> None:
        """An AADSTS code we have no words for is passed on as the provider said it."""
        assert ("invalid_grant: AADSTS1: odd", None) == explain(
            "invalid_grant", "AADSTS1: odd", "w"
        )

    def test_google_testing_app_limit(self) -> None:
        """Google's 'expired or revoked' mentions the 7-day limit of apps in testing,
        and only for a profile marked so (issue #10)."""
        message, hint = explain(
            "invalid_grant", "Token has been expired or revoked.", "home", testing=True
        )
        assert "7 days" in message
        assert hint is not None
        assert "mailoauth authorize home" in hint
        assert "7-day" in hint

    @pytest.mark.parametrize(
        ("description", "expected"), [("", "invalid_scope"), ("bad", "invalid_scope: bad")]
    )
    def test_plain_errors(self, description: str, expected: str) -> None:
        """Other errors read as code and description, with no special hint."""
        assert (expected, None) == explain("invalid_scope", description, "w")

    def test_aadsts_in_a_response(self) -> None:
        """A token response carrying AADSTS70008 raises with its explanation and hint."""
        with pytest.raises(ReauthorizationRequired) as info:
            parse(error_reply("invalid_grant", "AADSTS70008: The provided grant has expired."))
        assert "AADSTS70008: the refresh token has expired or was revoked" in info.value.message
        assert "run 'mailoauth authorize work' to sign in again" == info.value.hint

    def test_aadsts_misconfiguration_in_a_response(self) -> None:
        """A wrong client secret (AADSTS7000215) is Misconfigured with the secret-checking hint."""
        with pytest.raises(Misconfigured) as info:
            parse(error_reply("invalid_client", "AADSTS7000215: Invalid client secret provided."))
        assert MICROSOFT_EXPLANATIONS["7000215"][1] == info.value.hint

    def test_google_in_a_response(self) -> None:
        """Google's revoked-token answer is ReauthorizationRequired naming the 7-day limit."""
        with pytest.raises(ReauthorizationRequired) as info:
            parse(error_reply("invalid_grant", "Token has been expired or revoked."))
        assert "testing" not in str(info.value)
        assert "mailoauth authorize work" in info.value.hint
        with pytest.raises(ReauthorizationRequired) as info:
            oauth.parse_token_response(
                error_reply("invalid_grant", "Token has been expired or revoked."),
                now=T0,
                account="work",
                testing=True,
            )
        assert "7 days" in str(info.value)


# --- secrets never leak into errors ---------------------------------------------

FAILURES = [
    token_reply(access_token=None),
    token_reply(token_type="mac"),  # noqa: S106 - a token type, not a secret
    token_reply(expires_in=-1),
    html_reply(200),
    error_reply("invalid_grant", "Bad Request"),
    error_reply("invalid_grant", "Token has been expired or revoked."),
    error_reply("invalid_grant", "AADSTS70008: expired"),
    error_reply("invalid_client", "AADSTS7000215: Invalid client secret provided."),
    error_reply("invalid_scope"),
    error_reply("server_error", status=500),
    error_reply("slow_down", status=429, headers={"Retry-After": "30"}),
    error_reply("brand_new_error"),
    html_reply(401),
    html_reply(502),
]


def assert_no_secret(exc: BaseException) -> None:
    """Neither the refresh token nor the client secret (nor its Basic form) is in the error."""
    texts = [str(exc), repr(exc), *map(str, exc.args)]
    if isinstance(exc, GrantError):
        texts += [exc.message, exc.hint or ""]
    encoded = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    for text in texts:
        for secret in (REFRESH, CLIENT_SECRET, encoded):
            assert secret not in text


class TestNoSecretsInErrors:
    @pytest.mark.parametrize("client", [POST_CLIENT, BASIC_CLIENT], ids=["post", "basic"])
    @pytest.mark.parametrize("reply", FAILURES)
    async def test_failed_refresh(self, client: Client, reply: httpx.Response) -> None:
        """However a refresh fails, the raised error shows neither refresh token nor secret."""
        provider = FakeProvider([reply])
        with pytest.raises(GrantError) as info:
            await exchange(provider, oauth.refresh_request(client, Secret(REFRESH), ("IMAP",)))
        assert_no_secret(info.value)

    async def test_unreachable_endpoint(self) -> None:
        """A transport failure's error shows neither refresh token nor secret."""
        with trio.socket.socket() as sock:
            await sock.bind(("127.0.0.1", 0))
            client = dataclasses.replace(POST_CLIENT, token_endpoint=url_of(sock))
            async with httpx.AsyncClient(trust_env=False) as http:
                with trio.fail_after(5), pytest.raises(GrantError) as info:
                    await provider_http.send(http, oauth.refresh_request(client, Secret(REFRESH)))
        assert_no_secret(info.value)


# --- send, against real sockets on 127.0.0.1 ----------------------------------------


def url_of(sock: trio.socket.SocketType) -> str:
    """A token endpoint URL on the address a socket is bound to."""
    host, port = sock.getsockname()[:2]
    return f"http://{host}:{port}/token"


@asynccontextmanager
async def local_server(reply: bytes | None) -> AsyncIterator[tuple[str, list[bytes]]]:
    """
    A TCP server on 127.0.0.1 that accepts one connection and sends `reply` (None: nothing).

    It keeps the connection open afterwards, so the client sees only what we sent.
    Yields the URL and the list of requests received.
    """
    received: list[bytes] = []
    with trio.socket.socket() as listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        async def serve() -> None:
            conn, _ = await listener.accept()
            with conn:
                received.append(await conn.recv(65536))
                if reply is not None:
                    await conn.send(reply)
                await trio.sleep_forever()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            yield url_of(listener), received
            nursery.cancel_scope.cancel()


async def failure_of(sending: Awaitable[httpx.Response]) -> Exception:
    """The exception `send` raised; failing the test if it returned a response."""
    try:
        await sending
    except Exception as exc:
        return exc
    raise AssertionError("send returned a response")


def raw_response(body: bytes, *headers: str) -> bytes:
    """A complete HTTP/1.1 200 response, as bytes on the wire."""
    head = ["HTTP/1.1 200 OK", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class TestSend:
    async def test_answer_is_read(self) -> None:
        """send returns the response with its body read, ready for the pure parser."""
        body = json.dumps({"access_token": "at-real", "expires_in": 60}).encode()
        async with (
            local_server(raw_response(body, "Content-Type: application/json")) as (url, received),
            httpx.AsyncClient(trust_env=False) as http,
        ):
            request = oauth.refresh_request(
                dataclasses.replace(POST_CLIENT, token_endpoint=url), Secret(REFRESH)
            )
            with trio.fail_after(5):
                response = await provider_http.send(http, request)
        assert response.is_closed
        assert Secret("at-real") == parse(response).access_token
        assert received[0].startswith(b"POST /token HTTP/1.1\r\n")

    async def test_closed_port_is_transient(self) -> None:
        """A refused connection (nothing listens on the port) is a TransientGrantError."""
        with trio.socket.socket() as sock:
            await sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
            request = oauth.refresh_request(
                dataclasses.replace(POST_CLIENT, token_endpoint=url_of(sock)), Secret(REFRESH)
            )
            async with httpx.AsyncClient(trust_env=False) as http:
                with trio.fail_after(5), pytest.raises(TransientGrantError) as info:
                    await provider_http.send(http, request)
        assert isinstance(info.value.__cause__, httpx.ConnectError)
        assert "127.0.0.1" in info.value.message
        assert "provider-unavailable" == info.value.code

    async def test_silent_server_is_transient(self, autojump_clock: trio.abc.Clock) -> None:
        """A server that accepts and never answers times out into a TransientGrantError."""
        async with (
            local_server(None) as (url, received),
            httpx.AsyncClient(trust_env=False, timeout=httpx.Timeout(10.0)) as http,
        ):
            request = oauth.refresh_request(
                dataclasses.replace(POST_CLIENT, token_endpoint=url), Secret(REFRESH)
            )
            with trio.fail_after(60), pytest.raises(TransientGrantError) as info:
                await provider_http.send(http, request)
        assert received  # the request was delivered: this is a read timeout, not a refusal
        assert isinstance(info.value.__cause__, httpx.TimeoutException)
        assert "timed out" in info.value.message

    # httpx abandons its stream generators when decoding fails; that is httpx's, not ours.
    @pytest.mark.filterwarnings("ignore:Async generator .* was garbage collected:ResourceWarning")
    async def test_undecodable_body_is_transient(self) -> None:
        """A body that cannot be decoded (broken gzip) is a TransientGrantError, not httpx's."""
        reply = raw_response(b"not gzip at all", "Content-Encoding: gzip")
        async with (
            local_server(reply) as (url, _),
            httpx.AsyncClient(trust_env=False) as http,
        ):
            request = oauth.refresh_request(
                dataclasses.replace(POST_CLIENT, token_endpoint=url), Secret(REFRESH)
            )
            with trio.fail_after(5):
                error = await failure_of(provider_http.send(http, request))
        assert isinstance(error, TransientGrantError), f"send let {error!r} escape"
