"""
OAuth2 grants as a sans-I/O core: build token requests, parse and classify responses.

Everything here is a pure function over `httpx.Request` / `httpx.Response`;
provider_http.py sends the requests and reads the answers. Classification
decides what the daemon does next: a TransientGrantError is retried with
backoff, ReauthorizationRequired stops and waits for a human, Misconfigured
stops and waits for a config fix.
"""

from __future__ import annotations

import email.utils
import urllib.parse
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx

from mailoauthd import presets
from mailoauthd.errors import (
    GrantError,
    Misconfigured,
    ReauthorizationRequired,
    TransientGrantError,
    helper_command,
)
from mailoauthd.flows import GrantType
from mailoauthd.provider import provider_input
from mailoauthd.secret import Secret

# Providers that omit expires_in are rare; RFC 6749 recommends it. When the
# access token is a JWT its `exp` claim says; otherwise we assume this much
# (a profile's default_expires_in): short, so that a token that dies sooner is
# not handed out for long after it has.
DEFAULT_EXPIRES_IN = 900
# No provider issues access tokens for longer than a day or so; a year means
# a broken answer, and a larger number would overflow datetime arithmetic.
MAX_EXPIRES_IN = 366 * 24 * 3600
# Cap on what we read of an error body into a message: provider HTML error
# pages can be large, and one line on stderr must stay one line.
MAX_DESCRIPTION = provider_input.MAX_TEXT
# A 4xx without an OAuth error body (an empty 400, a proxy's bare 401) is retried
# once after this long; refused again, the grant is taken as dead.
CONFIRM_REFUSAL_SECONDS = 30
# Longest Retry-After we honour; a longer one is a broken header.
MAX_RETRY_AFTER = 86400.0
# AADSTS50196: Microsoft saw the same request in a loop and throttles it.
THROTTLE_SECONDS = 120

# RFC 6749 §5.2 error codes, by what the daemon should do about them. Every
# OAuth error code is final except these: `temporarily_unavailable`, and
# `server_error` (the same thing where a 5xx cannot be sent, RFC 6749 §4.1.2.1).
_NEEDS_AUTH = frozenset(
    {"invalid_grant", "interaction_required", "consent_required", "login_required"}
)
_MISCONFIGURED = frozenset(
    {
        "invalid_client",
        "unauthorized_client",
        "invalid_scope",
        "unsupported_grant_type",
        "invalid_request",
        "invalid_resource",
        "invalid_target",
        "unsupported_response_type",
    }
)
_TRANSIENT = frozenset({"temporarily_unavailable", "server_error", "slow_down"})


@dataclass(frozen=True, slots=True, kw_only=True)
class Client:
    """What the token endpoint needs to know about us."""

    token_endpoint: str
    client_id: str
    client_secret: Secret | None = None
    auth_method: str = "client_secret_post"


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenSet:
    """A successful token response, parsed."""

    access_token: Secret
    token_type: str
    expires_at: datetime
    refresh_token: Secret | None
    scopes: tuple[str, ...] | None
    id_token: Secret | None = None
    # Google: seconds until the refresh token stops working (time-limited grants).
    refresh_token_expires_in: float | None = None
    # Where the lifetime came from: "expires_in", "jwt" or "default".
    expiry_source: str = "expires_in"


def _form_request(
    client: Client, form: dict[str, str], endpoint: str | None = None
) -> httpx.Request:
    url = endpoint or client.token_endpoint
    headers = {"Accept": "application/json"}
    if client.client_secret is not None and client.auth_method == "client_secret_basic":
        # RFC 6749 §2.3.1: both are form-urlencoded before they are joined.
        auth = httpx.BasicAuth(
            urllib.parse.quote_plus(client.client_id),
            urllib.parse.quote_plus(client.client_secret.reveal()),
        )
        return next(auth.auth_flow(httpx.Request("POST", url, data=form, headers=headers)))
    form = {**form, "client_id": client.client_id}
    if client.client_secret is not None:
        form["client_secret"] = client.client_secret.reveal()
    return httpx.Request("POST", url, data=form, headers=headers)


def refresh_request(
    client: Client, refresh_token: Secret, scopes: tuple[str, ...] | None = None
) -> httpx.Request:
    """
    A refresh_token grant request (RFC 6749 §6).

    Args:
        client: the OAuth client.
        refresh_token: the current refresh token.
        scopes: scopes to ask for, or None to keep those granted.
    """
    form = {"grant_type": GrantType.REFRESH_TOKEN, "refresh_token": refresh_token.reveal()}
    if scopes:
        form["scope"] = " ".join(scopes)
    return _form_request(client, form)


def client_credentials_request(client: Client, scopes: tuple[str, ...]) -> httpx.Request:
    """A client_credentials grant request (RFC 6749 §4.4): app-only access."""
    form: dict[str, str] = {"grant_type": GrantType.CLIENT_CREDENTIALS}
    if scopes:
        form["scope"] = " ".join(scopes)
    return _form_request(client, form)


def revocation_request(
    client: Client, endpoint: str, token: Secret, hint: str | None = None
) -> httpx.Request:
    """An RFC 7009 revocation request for a refresh (or access) token; `hint` its type."""
    form = {"token": token.reveal()}
    if hint:
        form["token_type_hint"] = hint
    return _form_request(client, form, endpoint)


def authorization_code_request(
    client: Client, code: Secret, redirect_uri: str, verifier: Secret
) -> httpx.Request:
    """
    An authorization_code grant request (RFC 6749 §4.1.3) with its PKCE verifier (RFC 7636).

    Args:
        client: the OAuth client.
        code: the code the redirect carried.
        redirect_uri: exactly the one sent in the authorization request.
        verifier: the PKCE code_verifier whose S256 challenge was sent.
    """
    form = {
        "grant_type": GrantType.AUTHORIZATION_CODE,
        "code": code.reveal(),
        "redirect_uri": redirect_uri,
        "code_verifier": verifier.reveal(),
    }
    return _form_request(client, form)


def device_authorization_request(
    client: Client, endpoint: str, scopes: tuple[str, ...]
) -> httpx.Request:
    """A device authorization request (RFC 8628 §3.1)."""
    return _form_request(client, {"scope": " ".join(scopes)} if scopes else {}, endpoint)


def device_token_request(client: Client, device_code: Secret) -> httpx.Request:
    """One poll of the token endpoint for a device authorization (RFC 8628 §3.4)."""
    return _form_request(
        client, {"grant_type": GrantType.DEVICE_CODE, "device_code": device_code.reveal()}
    )


def retry_after(response: httpx.Response, now: datetime) -> float | None:
    """Seconds the provider asked us to wait (Retry-After: seconds or an HTTP date)."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        number = provider_input.seconds(value)
        return None if number is None else min(number, MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, OverflowError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    # A date in the year 9999 is no reason to stop asking for good (nor to overflow).
    return min(MAX_RETRY_AFTER, max(0.0, (when - now).total_seconds()))


def _one_line(text: object) -> str:
    return provider_input.clean_text(text, MAX_DESCRIPTION)


def _json_body(response: httpx.Response) -> dict[str, object] | None:
    return provider_input.json_object(response.content)


def explain(
    oauth_error: str, description: str, account: str, *, testing: bool = False
) -> tuple[str, str | None]:
    """
    A provider's error in words a person can act on; `testing`: the profile says the
    app is in Google's "testing" status (its 7-day limit is named only then).

    Returns:
        (message, hint): the hint is None when we have nothing better than the default.
    """
    match = presets.MICROSOFT_CODE.search(description)
    if match and match.group(1) in presets.MICROSOFT_EXPLANATIONS:
        what, todo = presets.MICROSOFT_EXPLANATIONS[match.group(1)]
        return f"AADSTS{match.group(1)}: {what}", todo.format(account=account)
    if testing and oauth_error == "invalid_grant" and presets.GOOGLE_TESTING_EXPIRED in description:
        # Google's wording; apps in "testing" publishing status get 7-day refresh tokens.
        what, todo = presets.GOOGLE_TESTING_EXPLANATION
        return f"invalid_grant: {description}; {what}", todo.format(account=account)
    text = f"{oauth_error}: {description}" if description else oauth_error
    return text, None


def parse_token_response(
    response: httpx.Response,
    *,
    now: datetime,
    account: str,
    subject: str = "the refresh token",
    default_expires_in: float = DEFAULT_EXPIRES_IN,
    testing: bool = False,
) -> TokenSet:
    """
    Turn the token endpoint's answer into tokens, or into a classified error.

    Args:
        response: the HTTP response, body read (and bounded: `send`).
        now: the wall-clock time the response arrived, for the expiry.
        account: the account's name, for messages.
        subject: what the provider may reject, for messages ("the authorization code").
        default_expires_in: the lifetime assumed when the answer names none and the
            access token is no JWT (the profile's default_expires_in).
        testing: the profile is a Google app in "testing" status (for messages).

    Raises:
        TransientGrantError: 5xx, 429, `temporarily_unavailable`, a malformed answer;
            retry later. A 4xx without an OAuth error body is a BareRefusal, retried
            once before the grant is taken as dead.
        ReauthorizationRequired: the grant is gone; a human must sign in again.
        Misconfigured: the provider refuses our client or request.
        Any of them carries `refresh_token` when a 200 answer held a usable one that
        must be kept although the rest of the answer is refused.
    """
    status = response.status_code
    body = _json_body(response)
    # Some providers answer errors with 200; an error and no token is an error.
    if status == 200 and not (
        body is not None and body.get("error") is not None and "access_token" not in body
    ):
        if body is None:
            kind = _one_line(response.headers.get("Content-Type", "no content type"))
            raise TransientGrantError(
                f"the token endpoint answered 200 with a body that is not a JSON object ({kind})"
            )
        return _tokens(body, now, default_expires_in)
    wait = retry_after(response, now)
    if body is not None and body.get("error") is not None:
        oauth_error = _one_line(body["error"])[:80] or "unnamed_error"
        description = _one_line(body.get("error_description") or "")
        message, hint = explain(oauth_error, description, account, testing=testing)
        aadsts = presets.MICROSOFT_CODE.search(description)
        code = aadsts.group(1) if aadsts else None
        if code in presets.MICROSOFT_THROTTLE:
            raise TransientGrantError(
                f"the provider is throttling us (HTTP {status}, {message})",
                retry_after=max(wait or 0.0, THROTTLE_SECONDS),
                oauth_error=oauth_error,
                hint=hint,
            )
        if status >= 500 or status == 429 or oauth_error in _TRANSIENT:
            raise TransientGrantError(
                f"the provider is failing (HTTP {status}, {message})",
                retry_after=wait,
                oauth_error=oauth_error,
            )
        if code in presets.MICROSOFT_MISCONFIGURED or oauth_error in _MISCONFIGURED:
            raise Misconfigured(
                f"the provider refused the request ({message})",
                hint=hint,
                oauth_error=oauth_error,
            )
        if oauth_error in _NEEDS_AUTH:
            raise ReauthorizationRequired(
                f"the provider rejected {subject} ({message})",
                hint=hint or f"run {helper_command('authorize', account)} and sign in again",
                oauth_error=oauth_error,
            )
        # RFC 6749 §5.2: an error code we do not know is still a refusal, and final.
        raise ReauthorizationRequired(
            f"the provider refused {subject} (HTTP {status}, {message})",
            hint=hint or f"run {helper_command('authorize', account)} and sign in again",
            oauth_error=oauth_error,
        )
    reason = _one_line(response.reason_phrase or "no reason given")
    kind = (
        "an HTML page" if "html" in response.headers.get("Content-Type", "") else "no OAuth error"
    )
    if 400 <= status < 500 and status not in (408, 425, 429):
        raise BareRefusal(
            f"the token endpoint refused {subject} (HTTP {status} {reason}, {kind})",
            retry_after=CONFIRM_REFUSAL_SECONDS,
            hint=f"if it is refused again, run {helper_command('authorize', account)}",
        )
    raise TransientGrantError(
        f"the token endpoint answered HTTP {status} {reason} with {kind}", retry_after=wait
    )


class BareRefusal(TransientGrantError):
    """
    A 4xx without an OAuth error: retried once after CONFIRM_REFUSAL_SECONDS (a proxy's
    hiccup); the same again and the grant is dead (the scheduler decides).
    """


def _tokens(body: dict[str, object], now: datetime, default_expires_in: float) -> TokenSet:
    # A refresh token comes first: under strict rotation the one we sent is already
    # retired, so whatever else is wrong with this answer, this one must be kept.
    raw_refresh = body.get("refresh_token")
    refresh: Secret | None = None
    if raw_refresh is not None and raw_refresh != "":
        if not provider_input.is_b64token(raw_refresh):
            raise TransientGrantError(
                "the token endpoint's refresh_token is not a bearer token "
                "(characters RFC 6750 does not allow, or too long; not shown)"
            )
        refresh = Secret(str(raw_refresh))
    try:
        return _usable_tokens(body, now, default_expires_in, refresh)
    except GrantError as exc:
        exc.refresh_token = refresh
        raise


def _usable_tokens(
    body: dict[str, object], now: datetime, default_expires_in: float, refresh: Secret | None
) -> TokenSet:
    access = body.get("access_token")
    if not isinstance(access, str) or not access:
        raise TransientGrantError("the token endpoint's answer has no access_token")
    if not provider_input.is_b64token(access):
        raise TransientGrantError(
            "the token endpoint's access_token is not a bearer token "
            "(characters RFC 6750 does not allow, or too long; not shown)"
        )
    token_type = body.get("token_type", "Bearer")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        shown = provider_input.short_repr(token_type)
        raise Misconfigured(f"the provider issued a {shown} token; only Bearer is usable")
    source = "expires_in"
    if body.get("expires_in") is None:
        exp = provider_input.jwt_expiry(access)
        if exp is not None:
            expires_in: float | None = exp - now.timestamp()
            source = "jwt"
        else:
            expires_in, source = default_expires_in, "default"
    else:
        expires_in = provider_input.seconds(body["expires_in"], maximum=MAX_EXPIRES_IN)
    if expires_in is None or not 0 < expires_in <= MAX_EXPIRES_IN:
        shown = provider_input.short_repr(body.get("expires_in"))
        raise TransientGrantError(f"the token endpoint's expires_in is not usable: {shown}")
    scope = body.get("scope")
    scopes = None
    if isinstance(scope, str):
        scopes = tuple(provider_input.clean_text(s, 200) for s in scope.split()[:100])
    id_token = body.get("id_token")
    return TokenSet(
        access_token=Secret(access),
        token_type="Bearer",  # noqa: S106 - a token type, not a secret
        expires_at=now + timedelta(seconds=expires_in),
        refresh_token=refresh,
        scopes=scopes,
        id_token=Secret(id_token) if isinstance(id_token, str) and id_token else None,
        refresh_token_expires_in=provider_input.seconds(body.get("refresh_token_expires_in")),
        expiry_source=source,
    )


def now_utc() -> datetime:
    """The wall clock, in UTC; the daemon's default `now`."""
    return datetime.now(UTC)


__all__ = [
    "BareRefusal",
    "Client",
    "authorization_code_request",
    "device_authorization_request",
    "device_token_request",
    "GrantError",
    "TokenSet",
    "client_credentials_request",
    "explain",
    "parse_token_response",
    "refresh_request",
    "retry_after",
    "revocation_request",
]
