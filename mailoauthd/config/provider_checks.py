"""
What check-config knows of providers' rules that a configuration can break without
being malformed: each rule is one the provider enforces only at sign-in or refresh
time, with an error message far from the cause. Pure functions over plain values.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

from mailoauthd import presets
from mailoauthd.flows import Flow

# Scopes that are no resource's: OpenID Connect's and Microsoft's refresh-token scope.
_NO_RESOURCE = frozenset({"openid", "profile", "email", "offline_access"})
# A bare Microsoft scope ("Mail.Read") is Microsoft Graph's.
_GRAPH = "https://graph.microsoft.com"


def provider_problems(preset: str, has_secret: bool) -> list[tuple[str, str]]:
    """(key, problem) pairs for a [providers.NAME] table."""
    required = presets.PRESETS[preset].public_client_problem
    return [("client_secret_file", required)] if required and not has_secret else []


def account_problems(preset: str, flow: str, scopes: Iterable[str]) -> list[tuple[str, str]]:
    """(key, problem) pairs for an [accounts.NAME] table, given its profile's preset."""
    scopes = tuple(scopes)
    found: list[tuple[str, str]] = []
    facts = presets.PRESETS[preset]
    if facts.device_flow_refuses and flow == Flow.DEVICE_CODE:
        mail = [s for s in scopes if any(part in s for part in facts.device_flow_refuses)]
        if mail:
            found.append(
                (
                    "flow",
                    f"Google refuses mail scopes ({mail[0]}) on the device flow; "
                    f'use flow = "{Flow.AUTHORIZATION_CODE}" '
                    "(with --no-browser on a headless machine)",
                )
            )
    if facts.one_resource_per_token:
        resources = sorted(microsoft_resources(scopes))
        if len(resources) > 1:
            found.append(
                (
                    "scopes",
                    f"span {len(resources)} resources ({', '.join(resources)}); Microsoft "
                    "issues a token for one resource at a time (AADSTS70011/AADSTS9001023): "
                    "keep the scopes of one",
                )
            )
    return found


def microsoft_resources(scopes: Iterable[str]) -> set[str]:
    """The resources (scheme://host) a list of Microsoft scopes asks for."""
    resources = set()
    for scope in scopes:
        if scope in _NO_RESOURCE:
            continue
        if "://" in scope:
            parts = urlsplit(scope)
            resources.add(f"{parts.scheme}://{parts.netloc}".lower())
        else:
            resources.add(_GRAPH)
    return resources
