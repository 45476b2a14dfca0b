"""
The development provider's OAuth endpoints: /token and its grants, /authorize, /revoke, /introspect.

RFC 6749 (authorization code, refresh token, client credentials), RFC 7636
(PKCE, S256 only), RFC 7009 (revocation), RFC 7662 (introspection, which
Dovecot uses in the end-to-end suite), RFC 9207 (`iss` on the redirect). Each
endpoint is a function of the state and the request; provider.py routes to
them with the state's lock held. The device grant is in device.py.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode, urlsplit

from mailoauthd import hostport
from mailoauthd.flows import GrantType
from mailoauthd.testing import device
from mailoauthd.testing.clients import authenticate
from mailoauthd.testing.state import (
    DEFAULT_USER,
    AuthCode,
    ProviderState,
    Rotation,
    scopes_of,
)
from mailoauthd.testing.wire import (
    OAuthError,
    Request,
    Response,
    b64url,
    json_response,
    page,
)

CODE_LIFETIME = 600.0


def token(st: ProviderState, req: Request) -> Response:
    if not req.is_form:
        raise OAuthError("invalid_request", "send application/x-www-form-urlencoded")
    grant_type = req.require("grant_type")
    client_id = authenticate(st, req)
    handler = _GRANTS.get(grant_type)
    if handler is None:
        raise OAuthError("unsupported_grant_type", f"grant type {grant_type!r}")
    return json_response(handler(st, req, client_id))


def _grant_refresh(st: ProviderState, req: Request, client_id: str) -> dict[str, Any]:
    token = req.require("refresh_token")
    grant = st.refresh_tokens.get(token)
    retired, until = st.retired.get(token, (None, 0.0))
    if grant is None and retired is not None and st.clock() < until:
        grant = retired  # strict, inside the reuse interval: answered like a current one
    if grant is None or grant.revoked:
        raise OAuthError("invalid_grant", "the refresh token is invalid, expired or revoked")
    if grant.client_id != client_id:
        raise OAuthError("invalid_grant", "the refresh token was issued to another client")
    scopes = grant.scopes
    if (asked := req.get("scope")) is not None:
        scopes = tuple(asked.split())
        if not set(scopes) <= set(grant.scopes):
            raise OAuthError("invalid_scope", "scope exceeds what was granted")
    rotation = st.options.refresh_token_rotation
    body = st.tokens(grant, scopes, refresh=rotation != "none")
    if rotation == "strict" and st.refresh_tokens.pop(token, None) is not None:
        # The reuse interval runs from the first use; later reuses do not extend it.
        st.retired[token] = (grant, st.clock() + st.options.refresh_token_reuse_interval)
    st.rotation_log.append(
        Rotation(st.clock(), token, body.get("refresh_token"), body["access_token"])
    )
    return body


def _grant_client_credentials(st: ProviderState, req: Request, client_id: str) -> dict[str, Any]:
    if st.clients[client_id] is None:
        raise OAuthError("unauthorized_client", "a public client has no credentials")
    scopes = scopes_of(req.get("scope"))
    return st.tokens(st.new_grant(f"client:{client_id}", client_id, scopes), scopes, refresh=False)


def _grant_code(st: ProviderState, req: Request, client_id: str) -> dict[str, Any]:
    code = st.auth_codes.get(req.require("code"))
    if code is None or code.grant.client_id != client_id:
        raise OAuthError("invalid_grant", "unknown authorization code")
    if code.used:
        # RFC 6749 §4.1.2: a replayed code may be stolen; revoke what it yielded.
        code.grant.revoked = True
        raise OAuthError("invalid_grant", "code already used; its tokens are revoked")
    if code.grant.revoked or st.clock() >= code.expires_at:
        raise OAuthError("invalid_grant", "the authorization code expired or was revoked")
    if req.get("redirect_uri") != code.redirect_uri:
        raise OAuthError("invalid_grant", "redirect_uri differs from the authorization's")
    verifier = req.get("code_verifier")
    if verifier is not None:
        st.issued.append(verifier)
    if code.challenge is None:
        if verifier is not None:
            raise OAuthError("invalid_grant", "code_verifier without a code_challenge")
    elif verifier is None or b64url(hashlib.sha256(verifier.encode()).digest()) != (code.challenge):
        raise OAuthError("invalid_grant", "PKCE verification failed")
    code.used = True
    return st.tokens(code.grant, code.grant.scopes, refresh=True, nonce=code.nonce)


_GRANTS: dict[str, Callable[[ProviderState, Request, str], dict[str, Any]]] = {
    GrantType.REFRESH_TOKEN: _grant_refresh,
    GrantType.CLIENT_CREDENTIALS: _grant_client_credentials,
    GrantType.AUTHORIZATION_CODE: _grant_code,
    GrantType.DEVICE_CODE: device.grant_device,
}


def _is_loopback_redirect(uri: str) -> bool:
    parts = urlsplit(uri)
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        return False
    loopback = parts.hostname in hostport.LOOPBACK_HOSTS
    return parts.scheme == "http" and loopback and port_ok and not parts.fragment


def authorize(st: ProviderState, req: Request) -> Response:
    client_id, redirect_uri = req.get("client_id"), req.get("redirect_uri")
    if client_id not in st.clients:
        return page(400, "Unknown client", "<p>The client_id is not registered.</p>")
    if redirect_uri is None or not _is_loopback_redirect(redirect_uri):
        return page(400, "Bad redirect_uri", "<p>Only http loopback redirects are allowed.</p>")
    assert client_id is not None
    target, state = redirect_uri, req.get("state")

    def back(**params: str) -> Response:
        if state is not None:
            params["state"] = state
        iss = st.url if st.response_issuer is None else st.response_issuer[0]
        if iss is not None:
            params["iss"] = iss  # RFC 9207
        separator = "&" if "?" in target else "?"
        return Response(302, headers={"Location": target + separator + urlencode(params)})

    if req.get("response_type") != "code":
        return back(error="unsupported_response_type")
    challenge, method = req.get("code_challenge"), req.get("code_challenge_method")
    if (challenge is None) != (method is None) or method not in (None, "S256"):
        return back(error="invalid_request", error_description="PKCE supports S256 only")
    if st.deny_next is not None:
        error, st.deny_next = st.deny_next, None
        return back(error=error)
    user, st.next_user = st.next_user or req.get("login_hint") or DEFAULT_USER, None
    grant = st.new_grant(user, client_id, scopes_of(req.get("scope")))
    code = secrets.token_urlsafe(32)
    st.issued.append(code)
    st.auth_codes[code] = AuthCode(
        grant, target, challenge, req.get("nonce"), st.clock() + CODE_LIFETIME
    )
    return back(code=code)


def revoke_token(st: ProviderState, token: str) -> None:
    """RFC 7009: a refresh token takes its whole grant with it; an access token only itself."""
    with st.lock:
        grant = st.refresh_tokens.get(token) or st.retired.get(token, (None, 0.0))[0]
        if grant is not None:
            grant.revoked = True
        elif (access := st.access_tokens.get(token)) is not None:
            access.revoked = True


def revoke(st: ProviderState, req: Request) -> Response:
    if (token := req.get("token")) is not None:
        revoke_token(st, token)
    return Response(200)


def introspect(st: ProviderState, req: Request) -> Response:
    return json_response(st.introspect(req.get("token") or ""))
