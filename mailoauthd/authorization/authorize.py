"""
Signing in, sans-I/O: PKCE, state and nonce, the authorize URL, the redirect, the device grant.

Pure functions over strings and `httpx.Response`s; signin.py does the I/O. Every
value that would let someone else finish a sign-in (the state, the PKCE verifier,
the nonce, the authorization code, the device code) is a Secret: it leaves the
process only in the request it belongs to, and in the authorize URL shown to the
person signing in.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import httpx

from mailoauthd import presets
from mailoauthd.config import Account, Provider
from mailoauthd.errors import (
    AuthorizationFailed,
    Misconfigured,
    TransientGrantError,
    helper_command,
)
from mailoauthd.flows import Flow
from mailoauthd.provider import oauth, provider_input
from mailoauthd.secret import Secret

# 32 random bytes (256 bits) each: unguessable. The verifier becomes 43
# characters, RFC 7636's minimum length, which every provider accepts.
STATE_BYTES = 32
VERIFIER_BYTES = 32
NONCE_BYTES = 32
# RFC 8628 §3.2: poll every 5 s when the provider names no interval.
DEFAULT_DEVICE_INTERVAL = 5
# A provider that answers interval 0 would have us poll in a tight loop.
MIN_DEVICE_INTERVAL = 1
# Device codes live 15 min at Microsoft and 30 at Google; longer would hold a
# connection open for nobody.
MAX_DEVICE_SECONDS = 1800
# A provider's poll interval beyond this is nonsense (RFC 8628 suggests 5 s).
MAX_DEVICE_INTERVAL = 60

# Device-poll answers that mean "keep polling" (RFC 8628 §3.5).
PENDING = "authorization_pending"
SLOW_DOWN = "slow_down"
_DECLINED = frozenset({"access_denied", "authorization_declined"})
_EXPIRED = frozenset({"expired_token", "code_expired"})
# Errors after which polling goes on (a provider failing for a while).
_KEEP_POLLING = frozenset({"temporarily_unavailable", "server_error"})


class ForeignRedirect(AuthorizationFailed):
    """A redirect that is not the answer to this sign-in (wrong or no state): ignored."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Authorization:
    """One authorization request: what to show the person, and what to check the answer with."""

    url: str
    redirect_uri: str
    state: Secret
    verifier: Secret
    nonce: Secret | None
    # RFC 9207: the issuer that must answer, named in the redirect's `iss` when the
    # provider says it sends one (or whenever it sends one anyway).
    issuer: str | None = None
    issuer_required: bool = False


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def redirect_host(provider: Provider) -> str:
    """The host name for the loopback redirect URI: 127.0.0.1, or the preset's (localhost)."""
    return presets.PRESETS[provider.preset].redirect_host


def challenge(verifier: Secret) -> str:
    """The S256 code_challenge of a PKCE verifier (RFC 7636 §4.2)."""
    return _b64url(hashlib.sha256(verifier.reveal().encode("ascii")).digest())


def start(
    account: Account,
    redirect_uri: str,
    *,
    token: Callable[[int], str] = secrets.token_urlsafe,
) -> Authorization:
    """
    A new authorization request with fresh state, PKCE pair and (with `openid`) nonce.

    Args:
        account: whose sign-in; its username becomes the login_hint.
        redirect_uri: where the provider sends the browser back to.
        token: random URL-safe text of n bytes; tests may pin it.

    Raises:
        Misconfigured: the profile has no authorization_endpoint.
    """
    provider = account.provider
    endpoint = provider.authorization_endpoint
    if not endpoint:
        raise Misconfigured(
            f"{account.name}: provider {provider.name!r} has no authorization_endpoint",
            hint=f"set authorization_endpoint (or issuer) in [providers.{provider.name}], "
            "or sign in by device code: "
            + helper_command("authorize", account.name, "--flow", Flow.DEVICE_CODE),
        )
    state, verifier = Secret(token(STATE_BYTES)), Secret(token(VERIFIER_BYTES))
    # Some identity providers refuse an OpenID request without a nonce.
    nonce = Secret(token(NONCE_BYTES)) if "openid" in account.scopes else None
    # What a preset needs at /authorize for the grant to be of use to a daemon; a
    # profile's authorize_params override these.
    params = dict(presets.PRESETS[provider.preset].authorize_params)
    if account.username:
        params["login_hint"] = account.username
    params.update(provider.authorize_params)
    params.update(
        response_type="code",
        client_id=provider.client_id,
        redirect_uri=redirect_uri,
        state=state.reveal(),
        code_challenge=challenge(verifier),
        code_challenge_method="S256",
    )
    if account.scopes:
        params["scope"] = " ".join(account.scopes)
    if nonce is not None:
        params["nonce"] = nonce.reveal()
    separator = "&" if urlsplit(endpoint).query else "?"
    url = endpoint + separator + urlencode(params, quote_via=quote)
    return Authorization(
        url=url,
        redirect_uri=redirect_uri,
        state=state,
        verifier=verifier,
        nonce=nonce,
        issuer=provider.issuer,
        issuer_required=bool(provider.issuer and provider.authorization_response_iss),
    )


def _query(text: str) -> str:
    """The query of a pasted address, or the pasted query itself."""
    text = text.strip().strip("'\"<>")
    if "://" not in text:
        return text.lstrip("?")
    parts = urlsplit(text)
    # A few providers answer in the fragment; we never ask them to, but take it.
    return parts.query or parts.fragment


def parse_redirect(text: str, auth: Authorization, *, account: str) -> Secret:
    """
    The authorization code from the address the browser was sent back to.

    Args:
        text: the whole address, or its query (what a person pastes).
        auth: the request this should answer.
        account: for messages.

    Raises:
        ForeignRedirect: no state, or another one: not the answer to this request.
        AuthorizationFailed: the provider answered with an error, or without a code.
    """
    again = f"run {helper_command('authorize', account)} again"
    try:
        params = parse_qs(_query(text), keep_blank_values=True, strict_parsing=True)
    except ValueError:
        params = {}
    if any(len(values) > 1 for values in params.values()):
        raise ForeignRedirect(
            f"{account}: that address repeats a parameter; it is not a provider's answer",
            hint="paste the address exactly as the browser shows it",
        )
    state = params.get("state", [""])[0]
    if not state or not secrets.compare_digest(state.encode(), auth.state.reveal().encode()):
        why = "carries no state" if not state else "carries another sign-in's state"
        raise ForeignRedirect(
            f"{account}: that address {why}; it is not the answer to this sign-in",
            hint="paste the address the browser was sent to after signing in this time",
        )
    _check_response_issuer(params.get("iss", [None])[0], auth, account=account)
    if error := params.get("error", [""])[0]:
        description = " ".join(params.get("error_description", [""])[0].split())[:300]
        message, hint = oauth.explain(error, description, account)
        if error == "access_denied" and hint is None:
            hint = f"the sign-in was cancelled or refused; {again}"
        raise AuthorizationFailed(
            f"{account}: the provider refused the sign-in ({message})", hint=hint or again
        )
    code = params.get("code", [""])[0]
    if not code:
        raise AuthorizationFailed(
            f"{account}: the provider's answer has neither a code nor an error", hint=again
        )
    return Secret(code)


def _check_response_issuer(iss: str | None, auth: Authorization, *, account: str) -> None:
    """
    RFC 9207: the `iss` of an authorization response names the issuer that answered.

    A provider whose metadata says it sends `iss` must send ours; any `iss` sent must be
    ours. Another issuer's answer means a mix-up attack or a misdirected browser.

    Raises:
        AuthorizationFailed: another issuer, or none where one is promised.
    """
    if auth.issuer is None:
        return
    hint = f"run {helper_command('authorize', account)} again, and sign in at {auth.issuer}"
    if iss is None:
        if auth.issuer_required:
            raise AuthorizationFailed(
                f"{account}: the answer names no issuer, though {auth.issuer} says it always "
                "does (RFC 9207); nothing was stored",
                hint=hint,
            )
        return
    if iss.rstrip("/") != auth.issuer.rstrip("/"):
        raise AuthorizationFailed(
            f"{account}: the answer comes from issuer {provider_input.clean_text(iss, 200)!r}, not "
            f"{auth.issuer!r} (RFC 9207); nothing was stored",
            hint=hint,
        )


# --- the device authorization grant (RFC 8628) --------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceAuthorization:
    """The provider's answer to a device authorization request."""

    device_code: Secret
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    expires_in: int
    interval: int
    message: str | None = None


def _seconds(value: object, default: int | None, maximum: int) -> int | None:
    """A provider's count of seconds, bounded by `maximum`; None when it is not one."""
    if value is None:
        return default
    number = provider_input.seconds(value)
    return None if number is None else int(min(number, maximum))


def _device_text(value: object, limit: int = 2000) -> str | None:
    """Provider text shown to a person: a non-empty string without control characters."""
    if not isinstance(value, str) or not value:
        return None
    cleaned = provider_input.clean_text(value, limit)
    return cleaned or None


def _device_uri(value: object) -> str | None:
    """A provider's address as sent, if it is a string of a sane length; checked later."""
    return value if isinstance(value, str) and 0 < len(value) <= 2048 else None


def parse_device_authorization(
    response: httpx.Response, *, now: datetime, account: str
) -> DeviceAuthorization:
    """
    Read a device authorization response.

    Raises:
        TransientGrantError, Misconfigured, ReauthorizationRequired: as the token
            endpoint's errors are classified (oauth.parse_token_response).
    """
    body = provider_input.json_object(response.content)
    if response.status_code != 200 or (
        # Microsoft answers some refusals with 200 and an error (AADSTS text and all).
        body is not None and body.get("error") is not None and "device_code" not in body
    ):
        oauth.parse_token_response(
            response, now=now, account=account, subject="the device authorization request"
        )
        raise TransientGrantError(
            f"the device authorization endpoint answered HTTP {response.status_code}"
        )
    if body is None:
        raise TransientGrantError("the device authorization endpoint's answer is not JSON")
    raw_code = body.get("device_code")
    device_code = raw_code if provider_input.is_b64token(raw_code) else None
    user_code = _device_text(body.get("user_code"), 100)
    # Google calls it verification_url.
    # Addresses are not cleaned but checked whole (shown_uri, before anything is shown):
    # one with a control character in it is refused, not repaired into another address.
    uri = _device_uri(body.get("verification_uri") or body.get("verification_url"))
    complete = _device_uri(body.get("verification_uri_complete"))
    expires_in = _seconds(body.get("expires_in"), None, MAX_DEVICE_SECONDS)
    interval = _seconds(body.get("interval"), DEFAULT_DEVICE_INTERVAL, MAX_DEVICE_INTERVAL)
    texts = {"device_code": device_code, "user_code": user_code, "verification_uri": uri}
    missing = [name for name, value in texts.items() if value is None]
    if (
        device_code is None
        or user_code is None
        or uri is None
        or not expires_in
        or interval is None
    ):
        what = ", ".join(missing) or "a usable expires_in and interval"
        raise TransientGrantError(f"the device authorization endpoint's answer lacks {what}")
    return DeviceAuthorization(
        device_code=Secret(str(device_code)),
        user_code=user_code,
        verification_uri=uri,
        verification_uri_complete=complete,
        expires_in=expires_in,
        interval=max(interval, MIN_DEVICE_INTERVAL),
        message=_device_text(body.get("message")),
    )


def parse_device_poll(
    response: httpx.Response, *, now: datetime, account: str
) -> oauth.TokenSet | str:
    """
    One poll's answer: tokens, PENDING or SLOW_DOWN.

    Raises:
        AuthorizationFailed: declined, or the code expired: stop polling.
        TransientGrantError, Misconfigured, ReauthorizationRequired: as for any token request.
    """
    body = provider_input.json_object(response.content)
    raw_error = body.get("error") if body is not None else None
    if raw_error is not None and (
        response.status_code != 200 or "access_token" not in (body or {})
    ):
        error = provider_input.clean_text(raw_error, 80)
        if error in (PENDING, SLOW_DOWN):
            return error
        again = f"run {helper_command('authorize', account)} again"
        if error in _DECLINED:
            raise AuthorizationFailed(
                f"{account}: the sign-in was declined ({error})",
                hint=f"{again} and approve the request",
            )
        if error in _EXPIRED:
            raise AuthorizationFailed(
                f"{account}: the code expired before anyone signed in with it ({error})",
                hint=f"{again}, and enter the new code before it expires",
            )
        if error == "bad_verification_code":
            raise AuthorizationFailed(
                f"{account}: the provider does not know this device code ({error})", hint=again
            )
        if error not in _KEEP_POLLING and response.status_code < 500:
            # RFC 8628 §3.5: any other error ends the sign-in at once (Google's
            # org_internal, admin_policy_enforced ...), with the provider's words.
            try:
                oauth.parse_token_response(
                    response, now=now, account=account, subject="the device code"
                )
            except TransientGrantError:
                raise
            except Misconfigured as exc:
                raise AuthorizationFailed(f"{account}: {exc.message}", hint=exc.hint) from None
            except oauth.GrantError as exc:
                raise AuthorizationFailed(f"{account}: {exc.message}", hint=again) from None
    return oauth.parse_token_response(response, now=now, account=account, subject="the device code")


def shown_device_authorization(grant: DeviceAuthorization, *, account: str) -> DeviceAuthorization:
    """
    The device answer as it may be shown to a person: the user code and message as
    clean text, the verification addresses only when `shown_uri` accepts them.

    Raises:
        AuthorizationFailed: no user code is left, or the verification_uri is not one
            to send a person to.
    """
    hint = (
        "the provider's device authorization answer cannot be shown safely; sign in "
        "with a browser: " + helper_command("authorize", account, "--flow", Flow.AUTHORIZATION_CODE)
    )
    user_code = provider_input.clean_text(grant.user_code, 64)
    if not user_code:
        raise AuthorizationFailed(f"{account}: the provider sent no usable user_code", hint=hint)
    uri = provider_input.shown_uri(grant.verification_uri)
    if uri is None:
        shown = provider_input.clean_text(grant.verification_uri, 100)
        raise AuthorizationFailed(
            f"{account}: the provider's verification_uri {shown!r} is not an https address",
            hint=hint,
        )
    message = provider_input.clean_text(grant.message, 500) if grant.message else None
    return dataclasses.replace(
        grant,
        user_code=user_code,
        verification_uri=uri,
        verification_uri_complete=provider_input.shown_uri(grant.verification_uri_complete),
        message=message or None,
    )
