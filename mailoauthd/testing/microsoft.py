"""
Microsoft-shaped routes of the development provider: /TENANT/oauth2/v2.0/token and the like.

They lead to the same endpoints as the plain paths, but a refused client is
answered as login.microsoftonline.com words it, with an AADSTS code, and an
unknown tenant is AADSTS90002: what the daemon's explanations are tested against.
"""

from __future__ import annotations

import re

from mailoauthd.testing.wire import OAuthError, Request, Response, json_response

DEFAULT_TENANTS = ("common", "organizations", "consumers", "dev-tenant")

# Microsoft's answers where a client is refused:
# reason -> (status, error, AADSTS text), as login.microsoftonline.com words them.
_REFUSALS = {
    "unknown_client": (
        400,
        "unauthorized_client",
        "AADSTS700016: Application with identifier '{client}' was not found in the directory "
        "'{tenant}'. This can happen if the application has not been installed by the "
        "administrator of the tenant or consented to by any user in the tenant.",
    ),
    "wrong_secret": (
        401,
        "invalid_client",
        "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the "
        "request is the client secret value, not the client secret ID, for a secret added to "
        "app '{client}'.",
    ),
    "expired_secret": (
        401,
        "invalid_client",
        "AADSTS7000222: The provided client secret keys for app '{client}' are expired. Visit "
        "the Azure portal to create new keys for your app.",
    ),
    "unknown_tenant": (
        400,
        "invalid_request",
        "AADSTS90002: Tenant '{tenant}' not found. Check to make sure you have the correct "
        "tenant ID and are signing into the correct cloud.",
    ),
}
_TENANT_ROUTE = re.compile(r"/([^/]+)/oauth2/v2\.0/(token|authorize|devicecode)")
_TENANT_PATHS = {
    "token": "/token",
    "authorize": "/authorize",
    "devicecode": "/device_authorization",
}


def split_tenant(path: str) -> tuple[str | None, str]:
    """(tenant, the plain path) for a Microsoft-shaped route; (None, path) for any other."""
    if (match := _TENANT_ROUTE.fullmatch(path)) is not None:
        return match.group(1), _TENANT_PATHS[match.group(2)]
    return None, path


def unknown_tenant() -> OAuthError:
    unknown = OAuthError("invalid_request", "unknown tenant")
    unknown.reason = "unknown_tenant"
    return unknown


def refusal(exc: OAuthError, req: Request, tenant: str) -> Response | None:
    """Microsoft's wording of a refused client on a tenant route; None for other errors."""
    if exc.reason not in _REFUSALS:
        return None
    status, error, text = _REFUSALS[exc.reason]
    client = req.client_hint() or ""
    description = text.format(client=client, tenant=tenant)
    code = int(description[6 : description.index(":")])
    body = {"error": error, "error_description": description, "error_codes": [code]}
    return json_response(body, status)
