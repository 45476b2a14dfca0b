"""
The development provider's device flow (RFC 8628): codes, the approval page, the polls.

/device_authorization hands out a device code and a user code; /device (or
`DevProvider.approve_device`) approves it as a user; the token endpoint's device
grant answers each poll: pending, slow_down when polled too often, denied,
expired, or the tokens once.
"""

from __future__ import annotations

import secrets
from typing import Any

from mailoauthd.testing.clients import authenticate
from mailoauthd.testing.state import DEFAULT_USER, Device, ProviderState, scopes_of
from mailoauthd.testing.wire import OAuthError, Request, Response, json_response, page

# RFC 8628 §6.1: no vowels (no words), no digits (no 0/O, 1/I confusion).
USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"


def _normal_user_code(code: str) -> str:
    return "".join(c for c in code.upper() if c.isalnum())


def pending_device(st: ProviderState, user_code: str) -> Device:
    """The pending authorization with this user code (KeyError if unknown, ValueError if
    no longer pending); with the lock held."""
    device_code = st.user_codes.get(_normal_user_code(user_code))
    if device_code is None:
        raise KeyError(f"unknown user code {user_code!r}")
    device = st.devices[device_code]
    if device.status != "pending" or st.clock() >= device.expires_at:
        raise ValueError(f"user code {user_code} is no longer pending")
    return device


def approve(st: ProviderState, user_code: str, user: str) -> None:
    with st.lock:
        device = pending_device(st, user_code)
        device.grant = st.new_grant(user, device.client_id, device.scopes)
        device.status = "approved"


def grant_device(st: ProviderState, req: Request, client_id: str) -> dict[str, Any]:
    """The token endpoint's answer to one poll."""
    device = st.devices.get(req.require("device_code"))
    if device is None or device.client_id != client_id or device.status == "done":
        raise OAuthError("invalid_grant", "unknown or already used device code")
    now = st.clock()
    if now >= device.expires_at:
        raise OAuthError("expired_token", "the device code expired")
    if device.status == "denied":
        raise OAuthError("access_denied", "the user denied the authorization")
    if device.status == "approved" and device.grant is not None:
        device.status = "done"
        return st.tokens(device.grant, device.scopes, refresh=True)
    too_soon = device.last_poll is not None and now - device.last_poll < device.interval
    device.last_poll = now
    if too_soon:
        device.interval += 5  # RFC 8628 §3.5
        raise OAuthError("slow_down", f"poll at most every {device.interval} seconds")
    raise OAuthError("authorization_pending", "the user has not answered yet")


def device_authorization(st: ProviderState, req: Request) -> Response:
    if not req.is_form:
        raise OAuthError("invalid_request", "send application/x-www-form-urlencoded")
    client_id = authenticate(st, req)
    options = st.options
    while True:
        letters = "".join(secrets.choice(USER_CODE_ALPHABET) for _ in range(8))
        if letters not in st.user_codes:
            break
    user_code = f"{letters[:4]}-{letters[4:]}"
    device_code = secrets.token_urlsafe(32)
    st.issued.append(device_code)
    st.devices[device_code] = Device(
        client_id,
        scopes_of(req.get("scope")),
        st.clock() + options.device_expires_in,
        options.device_interval,
    )
    st.user_codes[letters] = device_code
    verification_uri = st.url + "/device"
    return json_response(
        {
            "device_code": device_code,
            "user_code": user_code,
            "verification_uri": verification_uri,
            "verification_uri_complete": f"{verification_uri}?user_code={user_code}",
            "expires_in": options.device_expires_in,
            "interval": options.device_interval,
        }
    )


def device_page(st: ProviderState, req: Request) -> Response:
    try:
        approve(st, req.require("user_code"), req.get("user") or DEFAULT_USER)
    except (KeyError, ValueError, OAuthError):
        hint = "<p>That code is unknown or expired. Open the verification_uri_complete link.</p>"
        return page(400, "Unknown code", hint)
    return page(200, "Approved", "<p>You can close this window.</p>")
