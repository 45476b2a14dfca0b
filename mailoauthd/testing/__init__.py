"""
Test doubles for mailoauthd, as `trio.testing` is for trio: the development OAuth2 provider.

`DevProvider` is a real HTTP server on 127.0.0.1, standard library only. It
speaks enough of RFC 6749 (authorization code, refresh token, client
credentials), RFC 7636 (PKCE, S256 only), RFC 8628 (device flow), RFC 7662
(introspection), RFC 7009 (revocation) and RFC 8414 (discovery) for
`mailoauthd demo`, for the test suite, and for Dovecot's token introspection in
the end-to-end suite. Tests drive it in-process; scripts and subprocess tests
use the `/admin/...` JSON routes, or the command line:

    python -m mailoauthd.testing --port 0

prints one JSON line with its URL and endpoints once it listens, then serves
until SIGTERM or SIGINT.

`add_fault` scripts the next requests on a path: HTTP errors, hangs, delays,
connection resets, HTML error pages, broken JSON. Its hostile mode
(`provider.hostile.add(path, HostileAnswer(...))`) sends what no honest
provider would. Expiry follows the injected clock, so tests never sleep to
expire a token.

Refresh token rotation: "none" keeps one refresh token for good, "rotate"
issues a new one on each refresh and keeps the old ones working, "strict"
retires the old one on each refresh. A retired token is refused at once unless
`refresh_token_reuse_interval` is set: then it keeps working for that many
seconds after it was first used, each use answered with new tokens, as Okta's
grace period and Auth0's reuse interval do. That window is what lets a client
that died after the provider rotated its token, but before it could store the
new one, recover (docs/reliability.md). Nothing here is meant to be
secure: state lives in memory, id_tokens are unsigned (alg "none") and every
authorization is approved without asking anyone.

The modules, from the bottom up: wire (requests, responses, OAuth errors),
faults, hostile, state (what the provider holds; minting; queries), clients
(client authentication), device (RFC 8628), endpoints (token, authorize,
revoke, introspect), discovery, microsoft (tenant routes), server (the
threaded listener and the life of one request), provider (`DevProvider`: the
controls and the routes), __main__ (the command line).
"""

from mailoauthd.testing.faults import FAULT_KINDS
from mailoauthd.testing.hostile import HostileAnswer, HostileAnswers
from mailoauthd.testing.microsoft import DEFAULT_TENANTS
from mailoauthd.testing.provider import DevProvider
from mailoauthd.testing.state import (
    DEFAULT_CLIENTS,
    DEFAULT_SCOPES,
    DEFAULT_USER,
    ROTATIONS,
    RequestRecord,
    Rotation,
)

__all__ = [
    "DEFAULT_CLIENTS",
    "DEFAULT_SCOPES",
    "DEFAULT_TENANTS",
    "DEFAULT_USER",
    "FAULT_KINDS",
    "ROTATIONS",
    "DevProvider",
    "HostileAnswer",
    "HostileAnswers",
    "RequestRecord",
    "Rotation",
]
