"""
A generic profile's endpoints from its `issuer`: OpenID Connect Discovery 1.0 and RFC 8414.

`metadata_urls` and `parse_metadata` are pure; `Discovery` fetches each issuer's
document once, caches it until `clear()` (the daemon clears on reload), and fills
in the endpoints a profile does not set itself. Every error names the URL and
says what was wrong with it.
"""

from __future__ import annotations

import dataclasses
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import structlog
import trio

from mailoauthd import hostport
from mailoauthd.config import Account, Provider
from mailoauthd.errors import Misconfigured, TransientGrantError
from mailoauthd.provider import provider_http
from mailoauthd.provider.provider_input import clean_text, json_object, short_repr

log = structlog.get_logger(__name__)

# The Provider fields a metadata document may fill in.
ENDPOINTS = (
    "authorization_endpoint",
    "token_endpoint",
    "device_authorization_endpoint",
    "revocation_endpoint",
)


def metadata_urls(issuer: str) -> list[str]:
    """
    Where an issuer's metadata may be, in the order we try them.

    OpenID Connect appends /.well-known/openid-configuration to the issuer; RFC 8414
    §3.1 inserts /.well-known/oauth-authorization-server before the issuer's path.
    """
    parts = urlsplit(issuer)
    path = parts.path.rstrip("/")
    oidc = urlunsplit(
        (parts.scheme, parts.netloc, f"{path}/.well-known/openid-configuration", "", "")
    )
    rfc8414 = urlunsplit(
        (parts.scheme, parts.netloc, f"/.well-known/oauth-authorization-server{path}", "", "")
    )
    return [oidc, rfc8414]


def _usable_url(value: object) -> bool:
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        return False
    try:
        parts = urlsplit(value)
        if parts.scheme == "http":
            return parts.hostname in hostport.LOOPBACK_HOSTS
        return parts.scheme == "https" and bool(parts.hostname)
    except ValueError:  # e.g. "https://[not-an-address]"
        return False


def parse_metadata(response: httpx.Response, *, url: str, issuer: str) -> dict[str, str | bool]:
    """
    The endpoints in a metadata document, and `authorization_response_iss` (RFC 9207)
    when it says its authorization responses name the issuer.

    Args:
        response: the answer to GET `url`, body read.
        url: where it came from, for messages.
        issuer: the configured issuer, which the document must name as its own.

    Raises:
        TransientGrantError: HTTP 5xx or 429: try again later.
        Misconfigured: any other status, not JSON, another issuer, no usable token_endpoint.
    """
    status = response.status_code
    reason = clean_text(response.reason_phrase, 100)
    if status >= 500 or status == 429:
        raise TransientGrantError(f"{url}: HTTP {status} {reason}")
    if status != 200:
        raise Misconfigured(
            f"{url}: HTTP {status} {reason}",
            hint="check the issuer URL in the configuration",
        )
    document = json_object(response.content)
    kind = clean_text(response.headers.get("Content-Type", "no content type"), 100)
    if not isinstance(document, dict):
        raise Misconfigured(
            f"{url}: not a JSON object ({kind})", hint="check the issuer URL in the configuration"
        )
    named = document.get("issuer")
    if not isinstance(named, str) or named.rstrip("/") != issuer.rstrip("/"):
        raise Misconfigured(
            f"{url}: names issuer {short_repr(named, 200)}, not {issuer!r}",
            hint="set issuer to exactly the value the document names",
        )
    endpoints: dict[str, str | bool] = {}
    if document.get("authorization_response_iss_parameter_supported") is True:
        endpoints["authorization_response_iss"] = True
    for key in ENDPOINTS:
        value = document.get(key)
        if value is None:
            continue
        if not _usable_url(value) or clean_text(value, 2000) != value:
            raise Misconfigured(
                f"{url}: {key} is not an https URL ({short_repr(value, 200)})",
                hint=f"set {key} explicitly in the configuration",
            )
        endpoints[key] = str(value)
    if "token_endpoint" not in endpoints:
        raise Misconfigured(
            f"{url}: has no token_endpoint", hint="set token_endpoint explicitly instead"
        )
    return endpoints


async def discover(http: httpx.AsyncClient, issuer: str) -> dict[str, str | bool]:
    """
    Fetch an issuer's metadata: OpenID Connect's location first, then RFC 8414's.

    The caller bounds it with a cancel scope.

    Raises:
        TransientGrantError: unreachable or 5xx, naming the URL.
        Misconfigured: no document at either place, or a broken one, naming the URL.
    """
    not_found: list[str] = []
    for url in metadata_urls(issuer):
        request = httpx.Request("GET", url, headers={"Accept": "application/json"})
        response = await provider_http.send(http, request, what=url)
        if response.status_code == 404:
            not_found.append(url)
            continue
        return parse_metadata(response, url=url, issuer=issuer)
    raise Misconfigured(
        f"no metadata for issuer {issuer}: {' and '.join(not_found)} answered HTTP 404",
        hint="check the issuer URL, or set the endpoints explicitly",
    )


class Discovery:
    """Each issuer's endpoints, fetched once and kept until `clear()`."""

    def __init__(self, http: httpx.AsyncClient, *, timeout: float) -> None:
        self.http = http
        self.timeout = timeout
        self._cache: dict[str, dict[str, str | bool]] = {}
        self._locks: dict[str, trio.Lock] = {}

    def clear(self) -> None:
        """Forget every document: the next use fetches again (on reload)."""
        self._cache.clear()

    async def provider(self, provider: Provider) -> Provider:
        """
        The profile with the endpoints it does not set itself filled in from its issuer.

        Raises:
            TransientGrantError, Misconfigured: as `discover`.
        """
        issuer = provider.issuer
        if not issuer:
            return provider
        lock = self._locks.setdefault(issuer, trio.Lock())
        async with lock:  # one fetch per issuer, however many accounts ask
            if issuer not in self._cache:
                try:
                    with trio.fail_after(self.timeout):
                        self._cache[issuer] = await discover(self.http, issuer)
                except trio.TooSlowError:
                    raise TransientGrantError(
                        f"{metadata_urls(issuer)[0]}: no answer within {self.timeout:g} s"
                    ) from None
                log.info("discovery.fetched", issuer=issuer, endpoints=sorted(self._cache[issuer]))
        found = self._cache[issuer]
        missing: dict[str, Any] = {
            k: v for k, v in found.items() if getattr(provider, k) in (None, False)
        }
        return dataclasses.replace(provider, **missing) if missing else provider

    async def account(self, account: Account) -> Account:
        """The account with its profile's discovered endpoints filled in."""
        provider = await self.provider(account.provider)
        if provider is account.provider:
            return account
        return dataclasses.replace(account, provider=provider)
