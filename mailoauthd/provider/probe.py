"""
`mailoauthd check-config --online`: each OAuth profile tried against its provider, before
anyone signs in.

For each profile, without any account's tokens: discovery (when it has an `issuer`), the
other endpoints it names, the token endpoint over TLS, and the client's credentials —
sent with a refresh token that cannot be valid, so that `invalid_grant` means the
provider accepted the client and `invalid_client` means it did not. A profile used by a
`client_credentials` account gets a real token instead, whose lifetime and permissions
are reported and which is then dropped. One request per check, no retries; nothing is
stored, and no secret or token is printed.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from mailoauthd import config, presets
from mailoauthd.errors import GrantError, MailoauthdError
from mailoauthd.flows import Flow
from mailoauthd.provider import discovery, oauth, provider_http, provider_input
from mailoauthd.secret import Secret

# Not a token anyone could have been issued: the provider must refuse it, and how it
# refuses says whether it accepted the client.
PROBE_REFRESH_TOKEN = Secret("mailoauthd-check-config-probe.not-a-refresh-token")

_REFUSED_CLIENT = frozenset({"invalid_client", "unauthorized_client"})
_MARK = {True: "✓", False: "✗", None: "·"}


@dataclass(frozen=True, slots=True)
class Check:
    """One line of the report: passed (True), failed (False) or for information (None)."""

    ok: bool | None
    text: str
    fix: str | None = None


def _describe(body: dict[str, object] | None) -> tuple[str, str]:
    """The error code and description of an OAuth error body, cleaned for a terminal."""
    if body is None:
        return "", ""
    error = body.get("error")
    description = body.get("error_description")
    return (
        provider_input.clean_text(error, 60) if isinstance(error, str) else "",
        provider_input.clean_text(description, 300) if isinstance(description, str) else "",
    )


def _json(response: httpx.Response) -> dict[str, object] | None:
    try:
        body = response.json()
    except (ValueError, RecursionError):
        return None
    return body if isinstance(body, dict) else None


def _microsoft(description: str) -> tuple[str, str, str] | None:
    """(AADSTS code, what, fix) for a Microsoft code that names a client problem."""
    match = presets.MICROSOFT_CODE.search(description)
    if match is None:
        return None
    code = match.group(1)
    if code in presets.MICROSOFT_CLIENT_CODES:
        return (code, *presets.MICROSOFT_CLIENT_CODES[code])
    if code in presets.MICROSOFT_EXPLANATIONS:
        what, fix = presets.MICROSOFT_EXPLANATIONS[code]
        return code, what, fix.format(account="ACCOUNT")
    return None


async def _send(
    http: httpx.AsyncClient, request: httpx.Request, what: str, limit: float
) -> httpx.Response:
    """One request, bounded; a failure to reach it is a GrantError naming what."""
    try:
        with trio.fail_after(limit):
            return await provider_http.send(http, request, what=what)
    except trio.TooSlowError:
        raise GrantError(f"{what} did not answer within {limit:g} s") from None


def _reach_fix(url: str, exc: GrantError) -> str:
    if "TLS" in exc.message or "CERTIFICATE" in exc.message.upper():
        return (
            f"the certificate of {httpx.URL(url).host} is not trusted: check that the URL is "
            "the provider's own; a proxy that inspects TLS needs its CA in SSL_CERT_FILE"
        )
    return "check the URL and that this machine can reach it (DNS, firewall, proxy)"


def _over(url: str) -> str:
    return "over TLS" if url.startswith("https:") else "over plain http (this machine only)"


async def _discovery(
    provider: config.Provider, http: httpx.AsyncClient, limit: float
) -> tuple[config.Provider, list[Check]]:
    issuer = provider.issuer
    if not issuer:
        return provider, []
    try:
        with trio.fail_after(limit):
            found = await discovery.discover(http, issuer)
    except trio.TooSlowError:
        url = discovery.metadata_urls(issuer)[0]
        return provider, [Check(False, f"discovery: {url} did not answer within {limit:g} s")]
    except GrantError as exc:
        return provider, [Check(False, f"discovery: {exc.message}", exc.hint)]
    missing: dict[str, Any] = {
        k: v for k, v in found.items() if getattr(provider, k) in (None, False)
    }
    named = ", ".join(k for k in discovery.ENDPOINTS if k in found)
    check = Check(True, f"discovery: the document of {issuer} names it as issuer; it gives {named}")
    return dataclasses.replace(provider, **missing), [check]


async def _endpoint(name: str, url: str, http: httpx.AsyncClient, limit: float) -> Check:
    """An endpoint other than the token endpoint answers at all (any status under 500)."""
    what = name.replace("_", " ")
    request = httpx.Request("GET", url, headers={"Accept": "application/json"})
    try:
        response = await _send(http, request, f"the {what}", limit)
    except GrantError as exc:
        return Check(False, f"{what} {url}: {exc.message}", _reach_fix(url, exc))
    status = response.status_code
    if status >= 500:
        return Check(False, f"{what} {url} answers HTTP {status}", "try again later")
    return Check(True, f"{what} {url} answers {_over(url)} (HTTP {status})")


def _client_verdict(response: httpx.Response, *, public: bool, profile: str) -> tuple[Check, Check]:
    """The token endpoint's and the client's lines for the answer to the probe."""
    url = str(response.request.url)
    status = response.status_code
    if status >= 500:
        failed = Check(False, f"token endpoint {url} answers HTTP {status}", "try again later")
        return failed, Check(False, "client authentication: not checked (the provider failed)")
    reached = Check(True, f"token endpoint {url} answers {_over(url)} (HTTP {status})")
    error, description = _describe(_json(response))
    said = f"{error}: {description}" if description else error or f"HTTP {status}"
    if (known := _microsoft(description)) is not None:
        code, what, fix = known
        return reached, Check(False, f"client authentication: AADSTS{code}: {what}", fix)
    if error == "invalid_grant":
        if public:
            text = "client: a public client (no secret), so there is no secret to check; "
            text += "the provider knows the client_id (it refused only the probe's refresh token)"
            return reached, Check(None, text)
        text = "client authentication: the provider accepted client_id and secret "
        text += "(it refused only the probe's made-up refresh token: invalid_grant)"
        return reached, Check(True, text)
    if error in _REFUSED_CLIENT:
        fix = (
            "check client_id"
            if public
            else f"check client_id and the client secret (its value, not its ID), and "
            f"token_auth_method in [providers.{profile}]"
        )
        return reached, Check(False, f"client authentication: refused ({said})", fix)
    return reached, Check(
        False,
        f"client authentication: an unexpected answer ({said})",
        "check token_endpoint, client_id and the app registration",
    )


async def _client_credentials(
    account: config.Account, client: oauth.Client, http: httpx.AsyncClient, limit: float
) -> list[Check]:
    url = client.token_endpoint
    request = oauth.client_credentials_request(client, account.scopes)
    try:
        response = await _send(http, request, "the token endpoint", limit)
    except GrantError as exc:
        return [Check(False, f"token endpoint {url}: {exc.message}", _reach_fix(url, exc))]
    body = _json(response)
    if response.status_code != 200 or body is None or "access_token" not in body:
        reached, verdict = _client_verdict(response, public=False, profile=account.provider.name)
        return [reached, dataclasses.replace(verdict, text=verdict.text + f" [{account.name}]")]
    now = oauth.now_utc()
    try:
        tokens = oauth.parse_token_response(
            response, now=now, account=account.name, subject="the client credentials"
        )
    except MailoauthdError as exc:
        return [Check(False, f"client_credentials for {account.name}: {exc.message}", exc.hint)]
    reached = Check(True, f"token endpoint {url} answers {_over(url)} (HTTP 200)")
    minutes = round((tokens.expires_at - now).total_seconds() / 60)
    text = f"client_credentials for {account.name}: a token valid for {minutes} min"
    claims = provider_input.jwt_claims(tokens.access_token.reveal())
    roles = claims.get("roles") if claims else None
    if isinstance(roles, list) and roles:
        text += "; roles: " + ", ".join(provider_input.clean_text(str(r), 80) for r in roles)
    elif claims is not None:
        text += "; no roles (grant the app its application permissions, with admin consent)"
    if tokens.scopes:
        text += "; scope: " + provider_input.clean_text(" ".join(tokens.scopes), 300)
    if claims is not None and isinstance(claims.get("aud"), str):
        text += f"; audience {provider_input.clean_text(str(claims['aud']), 120)}"
    return [reached, Check(True, text + " (not kept)")]


async def check_profile(
    provider: config.Provider,
    accounts: Sequence[config.Account],
    secret: Secret | None,
    http: httpx.AsyncClient,
    limit: float,
) -> list[Check]:
    """Every check of one profile, in order; each failure says what to change."""
    provider, checks = await _discovery(provider, http, limit)
    if checks and checks[0].ok is False:
        return checks
    for name in ("authorization_endpoint", "device_authorization_endpoint", "revocation_endpoint"):
        url = getattr(provider, name)
        if url and url != provider.token_endpoint:
            checks.append(await _endpoint(name, url, http, limit))
    if not provider.token_endpoint:
        return [*checks, Check(False, "no token_endpoint", "set token_endpoint or issuer")]
    client = oauth.Client(
        token_endpoint=provider.token_endpoint,
        client_id=provider.client_id,
        client_secret=secret,
        auth_method=provider.token_auth_method,
    )
    app_only = [a for a in accounts if a.flow == Flow.CLIENT_CREDENTIALS]
    if app_only:
        account = dataclasses.replace(app_only[0], provider=provider)
        return checks + await _client_credentials(account, client, http, limit)
    url = provider.token_endpoint
    request = oauth.refresh_request(client, PROBE_REFRESH_TOKEN)
    try:
        response = await _send(http, request, "the token endpoint", limit)
    except GrantError as exc:
        return [*checks, Check(False, f"token endpoint {url}: {exc.message}", _reach_fix(url, exc))]
    return [*checks, *_client_verdict(response, public=secret is None, profile=provider.name)]


async def _run(
    cfg: config.Config, secrets: dict[str, Secret | None], names: list[str]
) -> list[tuple[str, list[Check]]]:
    limit = cfg.daemon.request_timeout.total_seconds()
    results = []
    async with httpx.AsyncClient(timeout=limit + 5, follow_redirects=False) as http:
        for name in names:
            provider = cfg.providers[name]
            accounts = [a for a in cfg.accounts.values() if a.provider.name == name]
            checks = await check_profile(provider, accounts, secrets.get(name), http, limit)
            results.append((name, checks))
    return results


def run(cfg: config.Config, secrets: dict[str, Secret | None], profile: str | None) -> int:
    """Check every profile (or the one named), print the report; 0 when all passed, else 1."""
    if profile is not None and profile not in cfg.providers:
        known = ", ".join(cfg.providers) or "none"
        sys.stderr.write(f"mailoauthd: there is no [providers.{profile}] (defined: {known})\n")
        return 1
    names = [profile] if profile is not None else list(cfg.providers)
    results = trio.run(_run, cfg, secrets, names)
    failed = 0
    for name, checks in results:
        print(f"\n[providers.{name}]")
        for check in checks:
            print(f"  {_MARK[check.ok]} {check.text}")
            if check.fix and check.ok is False:
                print(f"      fix: {check.fix}")
        failed += any(check.ok is False for check in checks)
    print()
    if failed:
        print(f"{failed} of {len(results)} profiles failed a check.")
        return 1
    print(f"{len(results)} profile{'s' if len(results) != 1 else ''}: every check passed.")
    return 0
