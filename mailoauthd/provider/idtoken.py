"""
Who signed in: the ID token of a sign-in, checked (OpenID Connect Core §3.1.3.7).

When an account asks for `openid`, the token endpoint's answer to either sign-in flow
carries an ID token naming who signed in; check_id_token refuses the sign-in when it
is missing, replayed, from another issuer, for another client or for another mailbox,
so that nothing is stored for the wrong person. Pure functions; signin.py calls them.
"""

from __future__ import annotations

import secrets
from urllib.parse import urlsplit

from mailoauthd import presets
from mailoauthd.config import Account, Provider
from mailoauthd.errors import AuthorizationFailed, helper_command
from mailoauthd.provider.provider_input import clean_text, jwt_claims
from mailoauthd.secret import Secret

# The claims that may name the mailbox signed in to: `email` (Google, most), then
# Microsoft's `preferred_username` and `upn`.
IDENTITY_CLAIMS = ("email", "preferred_username", "upn")


def id_token_claims(id_token: Secret) -> dict[str, object] | None:
    """The claims of an ID token, unverified; None when it is not a JWT."""
    return jwt_claims(id_token.reveal())


def _issuer_ok(provider: Provider, claims: dict[str, object]) -> bool | None:
    """Whether the ID token's `iss` is the profile's issuer; None when we cannot know it."""
    iss = claims.get("iss")
    if provider.issuer:
        return isinstance(iss, str) and iss.rstrip("/") == provider.issuer.rstrip("/")
    facts = presets.PRESETS[provider.preset]
    if facts.id_token_issuers:
        return iss in facts.id_token_issuers
    if facts.id_token_issuer_per_tenant:
        # https://login.microsoftonline.com/{tid}/v2.0, on the cloud's own host.
        tid = claims.get("tid")
        parts = urlsplit(provider.authorization_endpoint or provider.token_endpoint or "")
        base = f"{parts.scheme}://{parts.netloc}"
        return isinstance(tid, str) and bool(tid) and iss == f"{base}/{tid}/v2.0"
    return None


def id_token_identity(claims: dict[str, object]) -> str | None:
    """The mailbox an ID token names: its email, preferred_username or upn."""
    for claim in IDENTITY_CLAIMS:
        value = claims.get(claim)
        if isinstance(value, str) and value:
            return clean_text(value, 320)
    return None


def check_id_token(id_token: Secret | None, account: Account, *, nonce: Secret | None) -> None:
    """
    Check who signed in, when `openid` was asked for (OpenID Connect Core §3.1.3.7).

    The ID token must be there; carry this sign-in's nonce (when one was sent: the
    device flow sends none); come from the profile's issuer (when it is known) to this
    client; and name the account's mailbox (`username`) in `email`,
    `preferred_username` or `upn`, when it names one at all. The token came straight
    from the token endpoint over TLS, so its signature need not be checked.

    Raises:
        AuthorizationFailed: any of these is not so; the caller stores nothing.
    """
    if "openid" not in account.scopes:
        return
    name = account.name
    again = f"run {helper_command('authorize', name)} again"
    hint = f"{again}; if this persists, the provider or a proxy is misbehaving"
    if id_token is None:
        raise AuthorizationFailed(
            f"{name}: 'openid' was asked for but the provider sent no ID token, so who "
            "signed in cannot be checked; nothing was stored",
            hint=hint,
        )
    claims = id_token_claims(id_token)
    if claims is None:
        raise AuthorizationFailed(
            f"{name}: the provider's ID token cannot be read; nothing was stored", hint=hint
        )
    if nonce is not None:
        got = claims.get("nonce")
        if not isinstance(got, str) or not secrets.compare_digest(
            got.encode(), nonce.reveal().encode()
        ):
            raise AuthorizationFailed(
                f"{name}: the ID token does not carry this sign-in's nonce (a replayed "
                "answer?); nothing was stored",
                hint=hint,
            )
    if _issuer_ok(account.provider, claims) is False:
        iss = claims.get("iss")
        shown = clean_text(iss, 200) if isinstance(iss, str) else "no issuer"
        raise AuthorizationFailed(
            f"{name}: the ID token was issued by {shown!r}, not by this profile's provider; "
            "nothing was stored",
            hint=hint,
        )
    audience = claims.get("aud")
    audiences = audience if isinstance(audience, list) else [audience]
    if account.provider.client_id not in audiences:
        raise AuthorizationFailed(
            f"{name}: the ID token was issued to another client; nothing was stored", hint=hint
        )
    signed_in = id_token_identity(claims)
    wanted = account.username
    if wanted and signed_in and signed_in.casefold() != wanted.casefold():
        raise AuthorizationFailed(
            f"{name}: signed in as {signed_in}, but the account is {wanted}; nothing was stored",
            hint=f"{again} and sign in as {wanted} (sign out of {signed_in} at the provider "
            f"first, or use a private window), or set username = {signed_in!r} in "
            f"[accounts.{name}] if that is the mailbox meant",
        )


__all__ = ["IDENTITY_CLAIMS", "check_id_token", "id_token_claims", "id_token_identity"]
