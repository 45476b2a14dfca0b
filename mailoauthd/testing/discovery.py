"""
The development provider's metadata (RFC 8414, OpenID Connect discovery): where its endpoints are.
"""

from __future__ import annotations

from mailoauthd.testing.state import GRANT_TYPES, ProviderState
from mailoauthd.testing.wire import Request, Response, json_response


def endpoints(url: str) -> dict[str, str]:
    """The issuer and the endpoints of a provider at `url`."""
    return {
        "issuer": url,
        "authorization_endpoint": url + "/authorize",
        "token_endpoint": url + "/token",
        "device_authorization_endpoint": url + "/device_authorization",
        "revocation_endpoint": url + "/revoke",
        "introspection_endpoint": url + "/introspect",
    }


def document(st: ProviderState, req: Request) -> Response:
    """/.well-known/openid-configuration and /.well-known/oauth-authorization-server."""
    return json_response(
        {
            **endpoints(st.url),
            "grant_types_supported": list(GRANT_TYPES),
            "response_types_supported": ["code"],
            "code_challenge_methods_supported": ["S256"],
            "authorization_response_iss_parameter_supported": True,
            "token_endpoint_auth_methods_supported": [
                "client_secret_basic",
                "client_secret_post",
                "none",
            ],
        }
    )
