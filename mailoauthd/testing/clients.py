"""
Client authentication at the development provider (RFC 6749 §2.3): Basic or form, secret or none.
"""

from __future__ import annotations

import secrets
from urllib.parse import unquote_plus

from mailoauthd.testing.state import ProviderState
from mailoauthd.testing.wire import OAuthError, Request, invalid_client


def authenticate(st: ProviderState, req: Request) -> str:
    """The client id, authenticated as RFC 6749 §2.3 says, or invalid_client."""
    basic = req.basic_auth()
    form_id, form_secret = req.get("client_id"), req.get("client_secret")
    if basic is None:
        if form_id is None:
            raise invalid_client("no client authentication")
        candidates = [(form_id, form_secret)]
    else:
        if form_secret is not None:
            raise OAuthError("invalid_request", "more than one client authentication method")
        # §2.3.1 form-encodes id and secret inside Basic; many clients don't. Take either.
        raw_id, raw_secret = basic
        candidates = [(unquote_plus(raw_id), unquote_plus(raw_secret)), (raw_id, raw_secret)]
    for client_id, secret in candidates:
        if client_id not in st.clients or form_id not in (None, client_id):
            continue
        expected = st.clients[client_id]
        if expected is None and not secret:
            return client_id
        if expected is not None and secret is not None:
            if secrets.compare_digest(secret.encode(), expected.encode()):
                if client_id in st.expired_secrets:
                    raise invalid_client("the client secret has expired", "expired_secret")
                return client_id
    known = any(client_id in st.clients for client_id, _ in candidates)
    raise invalid_client(
        "unknown client or wrong secret", "wrong_secret" if known else "unknown_client"
    )
