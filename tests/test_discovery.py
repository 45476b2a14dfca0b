"""
Discovery of a generic profile's endpoints from its issuer: the pure parts, then real
`.well-known` documents served over HTTP by the development provider (broken ones by its
faults), and the daemon using what it found.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from conftest import USER, DaemonProcess, config_text, helper, in_process_daemon
from test_authorize import Conversation, browse

from mailoauthd import config
from mailoauthd.errors import Misconfigured, TransientGrantError
from mailoauthd.provider.discovery import Discovery, metadata_urls, parse_metadata
from mailoauthd.secret import Secret
from mailoauthd.storage import state
from mailoauthd.storage.state import TokenStore
from mailoauthd.testing import DevProvider

OIDC = "/.well-known/openid-configuration"
RFC8414 = "/.well-known/oauth-authorization-server"
ISSUER = "https://id.example.com"
DOCUMENT = {
    "issuer": ISSUER,
    "authorization_endpoint": f"{ISSUER}/authorize",
    "token_endpoint": f"{ISSUER}/token",
    "device_authorization_endpoint": f"{ISSUER}/device",
    "revocation_endpoint": f"{ISSUER}/revoke",
    "jwks_uri": f"{ISSUER}/keys",
}
URL = ISSUER + OIDC


def issuer_config(tmp: Path, provider: DevProvider) -> str:
    """The usual test config, but its profile names only the issuer."""
    endpoints = provider.endpoints
    return (
        config_text(tmp, provider)
        .replace(f'token_endpoint = "{endpoints["token_endpoint"]}"', f'issuer = "{provider.url}"')
        .replace(f'revocation_endpoint = "{endpoints["revocation_endpoint"]}"', "")
    )


def generic(issuer: str, **endpoints: str) -> config.Provider:
    return config.Provider(name="sso", client_id="demo-client", issuer=issuer, **endpoints)


class TestLocations:
    def test_issuer_without_a_path(self) -> None:
        """OpenID Connect's location first, then RFC 8414's, both at the root."""
        assert metadata_urls("https://id.example.com") == [
            "https://id.example.com/.well-known/openid-configuration",
            "https://id.example.com/.well-known/oauth-authorization-server",
        ]

    def test_issuer_with_a_path(self) -> None:
        """OIDC appends the well-known path to the issuer's; RFC 8414 puts it in front."""
        assert metadata_urls("https://sso.example.org/realms/mail/") == [
            "https://sso.example.org/realms/mail/.well-known/openid-configuration",
            "https://sso.example.org/.well-known/oauth-authorization-server/realms/mail",
        ]


class TestDocument:
    def parse(self, response: httpx.Response) -> dict[str, str]:
        return parse_metadata(response, url=URL, issuer=ISSUER)

    def test_endpoints(self) -> None:
        """The four endpoints a profile has are taken; the rest is ignored."""
        assert self.parse(httpx.Response(200, json=DOCUMENT)) == {
            "authorization_endpoint": f"{ISSUER}/authorize",
            "token_endpoint": f"{ISSUER}/token",
            "device_authorization_endpoint": f"{ISSUER}/device",
            "revocation_endpoint": f"{ISSUER}/revoke",
        }

    def test_trailing_slash_of_the_issuer(self) -> None:
        """An issuer named with a trailing slash is the same issuer."""
        document = {**DOCUMENT, "issuer": ISSUER + "/"}
        assert self.parse(httpx.Response(200, json=document))["token_endpoint"]

    @pytest.mark.parametrize(
        ("response", "why"),
        [
            (httpx.Response(200, text="<html>login</html>"), "not a JSON object (text/plain"),
            (httpx.Response(200, json=["a list"]), "not a JSON object"),
            (httpx.Response(200, json={**DOCUMENT, "issuer": "https://evil"}), "names issuer"),
            (httpx.Response(200, json={"issuer": ISSUER}), "has no token_endpoint"),
            (
                httpx.Response(200, json={**DOCUMENT, "token_endpoint": "http://id.example.com/t"}),
                "token_endpoint is not an https URL",
            ),
            (httpx.Response(403), "HTTP 403"),
        ],
    )
    def test_broken_documents_name_the_url(self, response: httpx.Response, why: str) -> None:
        """Every problem names the URL and what was wrong with the document."""
        with pytest.raises(Misconfigured) as caught:
            self.parse(response)
        assert caught.value.message.startswith(URL + ": ")
        assert why in caught.value.message

    def test_server_errors_are_transient(self) -> None:
        """A 5xx is worth another try later."""
        with pytest.raises(TransientGrantError, match="HTTP 503"):
            self.parse(httpx.Response(503))


class TestFetching:
    async def test_discovers_the_development_providers_endpoints(
        self, provider: DevProvider
    ) -> None:
        """The real document fills in what the profile lacks, once per issuer until cleared."""
        explicit = provider.url + "/elsewhere"
        async with httpx.AsyncClient() as http:
            discovery = Discovery(http, timeout=10)
            found = await discovery.provider(generic(provider.url, revocation_endpoint=explicit))
            again = await discovery.provider(generic(provider.url))
            assert provider.count(path=OIDC) == 1
            discovery.clear()
            await discovery.provider(generic(provider.url))
            assert provider.count(path=OIDC) == 2
        endpoints = provider.endpoints
        assert found.token_endpoint == endpoints["token_endpoint"]
        assert found.authorization_endpoint == endpoints["authorization_endpoint"]
        assert found.device_authorization_endpoint == endpoints["device_authorization_endpoint"]
        assert found.revocation_endpoint == explicit  # the profile's own wins
        assert again.revocation_endpoint == endpoints["revocation_endpoint"]

    async def test_falls_back_to_rfc8414(self, provider: DevProvider) -> None:
        """Without an OpenID document, the OAuth authorization server metadata is used."""
        provider.add_fault("status", path=OIDC, status=404)
        async with httpx.AsyncClient() as http:
            found = await Discovery(http, timeout=10).provider(generic(provider.url))
        assert found.token_endpoint == provider.endpoints["token_endpoint"]
        assert provider.count(path=RFC8414) == 1

    async def test_broken_document_names_the_url(self, provider: DevProvider) -> None:
        """A document that is not JSON is an error naming its URL, and nothing is cached."""
        provider.add_fault("status", path=OIDC, status=200, body="{broken")
        async with httpx.AsyncClient() as http:
            discovery = Discovery(http, timeout=10)
            with pytest.raises(Misconfigured) as caught:
                await discovery.provider(generic(provider.url))
            assert caught.value.message.startswith(f"{provider.url}{OIDC}: not a JSON object")
            found = await discovery.provider(generic(provider.url))  # the fault was used up
        assert found.token_endpoint == provider.endpoints["token_endpoint"]

    async def test_no_document_anywhere(self, provider: DevProvider) -> None:
        """404 at both places names both URLs."""
        provider.add_fault("status", path=OIDC, status=404)
        provider.add_fault("status", path=RFC8414, status=404)
        async with httpx.AsyncClient() as http:
            with pytest.raises(Misconfigured) as caught:
                await Discovery(http, timeout=10).provider(generic(provider.url))
        assert f"{provider.url}{OIDC} and {provider.url}{RFC8414} answered HTTP 404" in str(
            caught.value
        )

    async def test_unreachable_issuer(self, provider: DevProvider) -> None:
        """An issuer nobody answers for is a transient error naming the URL."""
        url = provider.url
        provider.stop()
        async with httpx.AsyncClient() as http:
            with pytest.raises(TransientGrantError) as caught:
                await Discovery(http, timeout=10).provider(generic(url))
        assert f"{url}{OIDC}" in caught.value.message


class TestDaemon:
    @pytest.mark.slow
    async def test_refresh_sign_in_and_revoke_use_discovered_endpoints(
        self, provider: DevProvider, tmp_path: Path
    ) -> None:
        """A profile with only an issuer refreshes, signs in and revokes where the document says."""
        path = tmp_path / "config.toml"
        path.write_text(issuer_config(tmp_path, provider))
        cfg = config.load(path)
        assert cfg.providers["dev"].token_endpoint is None
        async with in_process_daemon(cfg) as d:
            conv = await Conversation.start(d)
            first = await conv.next()
            assert str(first["url"]).startswith(provider.endpoints["authorization_endpoint"])
            assert (await browse(str(first["url"]))).status_code == 200
            _, final = await conv.final()
            assert final["ok"] is True
            before = provider.count(grant_type="refresh_token")
            await d.scheduler.refresh("work")
            assert provider.count(grant_type="refresh_token") == before + 1
            note = await d.scheduler.forget("work")
        assert note == "revoked at the provider; local tokens forgotten"
        assert provider.valid_refresh_tokens(USER) == []
        assert provider.count(path=OIDC) == 1

    @pytest.mark.slow
    def test_broken_discovery_is_reported_and_fixed_by_a_reload(
        self, provider: DevProvider, tmp_path: Path, start_daemon: Callable[..., DaemonProcess]
    ) -> None:
        """At start a broken document is logged with its URL; status shows it; SIGHUP re-fetches."""
        path = tmp_path / "config.toml"
        path.write_text(issuer_config(tmp_path, provider))
        now = datetime.now(UTC)
        store = TokenStore(tmp_path / "state")
        store.open()
        store.save(state.imported("work", Secret(provider.issue_refresh_token(USER)), now))
        store.close()
        provider.add_fault("status", path=OIDC, status=200, body="<html>", count=100)
        provider.add_fault("status", path=RFC8414, status=404, count=100)
        d = start_daemon(path)
        url = f"{provider.url}{OIDC}"
        deadline = time.monotonic() + 10
        while not any(e.get("event") == "discovery.failed" for e in d.events()):
            assert time.monotonic() < deadline, d.log()
            time.sleep(0.02)
        failed = next(e for e in d.events() if e.get("event") == "discovery.failed")
        assert str(failed["error"]).startswith(f"{url}: not a JSON object")
        refresh = helper("refresh", "work", socket=d.socket)
        assert refresh.returncode == 1
        assert url in refresh.stderr
        rows = json.loads(helper("status", "--json", socket=d.socket).stdout)["accounts"]
        assert rows[0]["status"] == "misconfigured"
        assert url in rows[0]["last_error"]
        provider.clear_faults()
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while helper("refresh", "work", socket=d.socket).returncode != 0:
            assert time.monotonic() < deadline, d.log()
            time.sleep(0.05)


async def test_revoke_without_discovery_says_the_grant_may_remain(
    provider: DevProvider, tmp_path: Path
) -> None:
    """When the issuer's document cannot be had, revoke forgets and says why it could not revoke."""
    path = tmp_path / "config.toml"
    path.write_text(issuer_config(tmp_path, provider))
    store = TokenStore(tmp_path / "state")
    store.open()
    now = datetime.now(UTC)
    store.save(state.imported("work", Secret(provider.issue_refresh_token(USER)), now))
    store.close()
    provider.add_fault("status", path=OIDC, status=404, count=100)
    provider.add_fault("status", path=RFC8414, status=404, count=100)
    async with in_process_daemon(config.load(path)) as d:
        note = await d.scheduler.forget("work")
        assert d.scheduler.status()[0]["status"] == state.NEEDS_AUTHORIZATION
    assert note.startswith(
        "local tokens forgotten; the revocation endpoint is unknown (no metadata"
    )
    assert f"{provider.url}{OIDC}" in note
    assert "grant may remain at the provider" in note
    assert provider.count(path="/revoke") == 0
