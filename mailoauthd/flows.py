"""
How a grant is obtained, named once: an account's `flow`, and the `grant_type` on the wire.

An account signs in by one flow (the `flow` key of [accounts.NAME]); each flow, and
each refresh, sends one grant_type to the token endpoint (RFC 6749 §4 and §6, RFC 8628
§3.4). The configuration, the OAuth core, the sign-in, the development provider and
the helper all speak of them, so they are spelled here and nowhere else.

Standard library only, and imports nothing of ours: anything may read it, the helper
included (tests/test_client.py).
"""

from __future__ import annotations

from enum import StrEnum


class Flow(StrEnum):
    """How an account gets its grant; the values are what the configuration file says."""

    # A person signs in in a browser, which is sent back to us (RFC 6749 §4.1).
    AUTHORIZATION_CODE = "authorization_code"
    # A person types a code on another device while we poll (RFC 8628).
    DEVICE_CODE = "device_code"
    # The app alone, with its own secret: no person, no refresh token (RFC 6749 §4.4).
    CLIENT_CREDENTIALS = "client_credentials"


# The flows a person signs in by (`mailoauth authorize --flow`); the app-only flow
# needs nobody, so it is no choice there.
SIGN_IN_FLOWS = (Flow.AUTHORIZATION_CODE, Flow.DEVICE_CODE)


class GrantType(StrEnum):
    """The `grant_type` of a token request, spelled as the RFCs spell it on the wire."""

    AUTHORIZATION_CODE = "authorization_code"
    REFRESH_TOKEN = "refresh_token"  # noqa: S105 - a grant type, not a secret
    CLIENT_CREDENTIALS = "client_credentials"
    # RFC 8628 §3.4 registers a URN, not the flow's short name.
    DEVICE_CODE = "urn:ietf:params:oauth:grant-type:device_code"


__all__ = ["SIGN_IN_FLOWS", "Flow", "GrantType"]
