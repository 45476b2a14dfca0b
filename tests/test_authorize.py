"""
Signing in: the sans-I/O parts (authorize.py), then every flow end to end against the
development provider over real HTTP: the daemon in-process or as a subprocess, the
helper as a real program or a conversation over the real socket, and a test "browser"
(httpx) that follows the authorize URL to the daemon's loopback redirect listener.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
import trio
import trio.testing
from conftest import (
    MAILOAUTH,
    USER,
    DaemonProcess,
    config_text,
    eventually,
    helper,
    in_process_daemon,
    make_config,
    mock_now,
)

from mailoauthd import config, daemon, protocol
from mailoauthd.authorization import authorize
from mailoauthd.errors import AuthorizationFailed, Misconfigured, TransientGrantError
from mailoauthd.flows import GrantType
from mailoauthd.helper import token as helper_token
from mailoauthd.provider import idtoken
from mailoauthd.provider.oauth import TokenSet
from mailoauthd.secret import Secret
from mailoauthd.storage import state
from mailoauthd.testing import DevProvider

# --- helpers -----------------------------------------------------------------------------


def sign_in_keys(provider: DevProvider, extra: str = "") -> str:
    """Provider keys that let the development provider's accounts sign in both ways."""
    endpoints = provider.endpoints
    return (
        f'authorization_endpoint = "{endpoints["authorization_endpoint"]}"\n'
        f'device_authorization_endpoint = "{endpoints["device_authorization_endpoint"]}"\n' + extra
    )


def flow_config(
    tmp: Path, provider: DevProvider, *, provider_keys: str = "", account_keys: str = ""
) -> config.Config:
    return make_config(
        tmp,
        provider,
        provider_keys=sign_in_keys(provider, provider_keys),
        account_keys=account_keys,
    )


def state_file(tmp: Path, account: str = "work") -> Path:
    return tmp / "state" / f"{account}.toml"


def stored(tmp: Path, account: str = "work") -> state.AccountState:
    return state.from_toml(state_file(tmp, account).read_text(), source=account)


def query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


class Conversation:
    """The helper's side of `authorize`, spoken over the daemon's real socket."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    @classmethod
    async def start(cls, d: daemon.Daemon, account: str = "work", **extra: str) -> Conversation:
        stream = await trio.open_unix_socket(str(d.socket_path))
        request = {"v": 1, "op": "authorize", "account": account, **extra}
        await stream.send_all(protocol.encode(request))
        return cls(stream)

    async def next(self) -> dict[str, object]:
        while b"\n" not in self.buffer:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise AssertionError(f"the daemon hung up; unread: {self.buffer!r}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        message = json.loads(line)
        assert isinstance(message, dict)
        return message

    async def final(self) -> tuple[list[dict[str, object]], dict[str, object]]:
        """Events up to the final answer, and the answer; then the connection is closed."""
        events = []
        while "ok" not in (message := await self.next()):
            events.append(message)
        await self.close()
        return events, message

    async def paste(self, text: str) -> None:
        await self.stream.send_all(protocol.encode({"op": "redirect", "url": text}))

    async def close(self) -> None:
        await self.stream.aclose()


async def browse(url: str, *, follow: bool = True) -> httpx.Response:
    """The test's browser: GET, following redirects to the loopback listener."""
    async with httpx.AsyncClient(follow_redirects=follow, timeout=20) as http:
        return await http.get(url)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def account_for(provider: DevProvider, tmp: Path, **keys: str) -> config.Account:
    extra = "".join(f"{k} = {v}\n" for k, v in keys.items())
    return flow_config(tmp, provider, account_keys=extra).accounts["work"]


# --- the authorization request -------------------------------------------------------------


class TestAuthorizationRequest:
    def test_url_carries_pkce_state_and_login_hint(
        self, provider: DevProvider, tmp_path: Path
    ) -> None:
        """The URL asks for a code with an S256 challenge of the verifier, the state and hint."""
        account = account_for(provider, tmp_path)
        auth = authorize.start(account, "http://127.0.0.1:5000/")
        params = query(auth.url)
        assert auth.url.startswith(provider.endpoints["authorization_endpoint"] + "?")
        assert params["response_type"] == "code"
        assert params["client_id"] == "demo-client"
        assert params["redirect_uri"] == "http://127.0.0.1:5000/"
        assert params["state"] == auth.state.reveal()
        assert params["code_challenge_method"] == "S256"
        digest = hashlib.sha256(auth.verifier.reveal().encode()).digest()
        assert params["code_challenge"] == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        assert params["login_hint"] == USER
        assert "nonce" not in params
        assert 43 <= len(auth.verifier.reveal()) <= 128  # RFC 7636 §4.1

    def test_every_request_is_fresh(self, provider: DevProvider, tmp_path: Path) -> None:
        """Two requests share no state, verifier or nonce."""
        account = account_for(provider, tmp_path, scopes='["openid"]')
        one, two = (authorize.start(account, "http://127.0.0.1:1/") for _ in range(2))
        assert one.state != two.state
        assert one.verifier != two.verifier
        assert one.nonce != two.nonce

    def test_nonce_with_openid(self, provider: DevProvider, tmp_path: Path) -> None:
        """With `openid` among the scopes, a nonce is sent."""
        account = account_for(provider, tmp_path, scopes='["openid", "mail"]')
        auth = authorize.start(account, "http://127.0.0.1:1/")
        assert auth.nonce is not None
        assert query(auth.url)["nonce"] == auth.nonce.reveal()
        assert query(auth.url)["scope"] == "openid mail"

    def test_preset_and_profile_parameters(self) -> None:
        """Google gets access_type=offline and prompt=consent; a profile's own params win."""
        cfg = config.parse(
            """
            [providers.gmail]
            preset = "google"
            client_id = "cid"
            authorize_params = { prompt = "select_account", hd = "example.com" }
            [accounts.me]
            provider = "gmail"
            username = "me@example.com"
            """,
            source="<test>",
        )
        params = query(authorize.start(cfg.accounts["me"], "http://127.0.0.1:1/").url)
        assert params["access_type"] == "offline"
        assert params["prompt"] == "select_account"
        assert params["hd"] == "example.com"
        assert params["scope"] == "https://mail.google.com/"

    def test_no_authorization_endpoint(self, provider: DevProvider, tmp_path: Path) -> None:
        """A profile without an authorization endpoint says how to fix it or sign in instead."""
        account = make_config(tmp_path, provider).accounts["work"]
        with pytest.raises(Misconfigured) as caught:
            authorize.start(account, "http://127.0.0.1:1/")
        assert "authorization_endpoint" in caught.value.message
        assert "--flow device_code" in caught.value.hint


class TestRedirect:
    @pytest.fixture
    def auth(self, provider: DevProvider, tmp_path: Path) -> authorize.Authorization:
        """A request to answer."""
        return authorize.start(account_for(provider, tmp_path), "http://127.0.0.1:5000/")

    @pytest.mark.parametrize(
        "form",
        [
            "http://127.0.0.1:5000/?code=C0DE&state={state}",
            "  'http://127.0.0.1:5000/?state={state}&code=C0DE'\n",
            "?code=C0DE&state={state}",
            "code=C0DE&state={state}",
            "http://localhost:8080/callback?code=C0DE&state={state}&session_state=x",
        ],
    )
    def test_code_from_what_a_person_pastes(self, auth: authorize.Authorization, form: str) -> None:
        """The whole address, a quoted one, or just its query all yield the code."""
        text = form.format(state=auth.state.reveal())
        assert authorize.parse_redirect(text, auth, account="work") == Secret("C0DE")

    @pytest.mark.parametrize(
        ("text", "why"),
        [
            ("http://127.0.0.1:5000/?code=C0DE", "carries no state"),
            ("http://127.0.0.1:5000/?code=C0DE&state=forged", "another sign-in's state"),
            ("http://127.0.0.1:5000/?error=access_denied&state=forged", "another sign-in"),
            ("hello", "carries no state"),
        ],
    )
    def test_foreign_answers(self, auth: authorize.Authorization, text: str, why: str) -> None:
        """Without this request's state, nothing is taken from an address, not even an error."""
        with pytest.raises(authorize.ForeignRedirect) as caught:
            authorize.parse_redirect(text, auth, account="work")
        assert why in caught.value.message

    def test_repeated_parameter(self, auth: authorize.Authorization) -> None:
        """An address with a parameter twice is no provider's answer."""
        state = auth.state.reveal()
        with pytest.raises(authorize.ForeignRedirect):
            authorize.parse_redirect(f"?code=a&code=b&state={state}", auth, account="work")

    def test_error_answer_is_explained(self, auth: authorize.Authorization) -> None:
        """An error with our state ends the sign-in with the provider's reason explained."""
        text = "?" + urlencode(
            {
                "error": "consent_required",
                "error_description": "AADSTS65001: The user or administrator has not consented",
                "state": auth.state.reveal(),
            }
        )
        with pytest.raises(AuthorizationFailed) as caught:
            authorize.parse_redirect(text, auth, account="work")
        assert "AADSTS65001" in caught.value.message
        assert "not consented" in caught.value.message
        assert "administrator grant consent" in caught.value.hint

    def test_no_code(self, auth: authorize.Authorization) -> None:
        """Our state but neither a code nor an error is a failed sign-in."""
        with pytest.raises(AuthorizationFailed, match="neither a code nor an error"):
            authorize.parse_redirect(f"?state={auth.state.reveal()}", auth, account="work")


def id_token(claims: dict[str, object]) -> Secret:
    part = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return Secret(f"eyJhbGciOiJub25lIn0.{part}.")


class TestIdToken:
    @pytest.fixture
    def account(self, provider: DevProvider, tmp_path: Path) -> config.Account:
        """An account that asks for openid."""
        return account_for(provider, tmp_path, scopes='["openid"]')

    @pytest.fixture
    def auth(self, account: config.Account) -> authorize.Authorization:
        """A request with a nonce."""
        return authorize.start(account, "http://127.0.0.1:1/")

    def test_matching_nonce(self, account: config.Account, auth: authorize.Authorization) -> None:
        """An ID token with our nonce and audience passes."""
        assert auth.nonce is not None
        token = id_token({"nonce": auth.nonce.reveal(), "aud": "demo-client"})
        idtoken.check_id_token(token, account, nonce=auth.nonce)

    @pytest.mark.parametrize(
        ("claims", "why"),
        [
            ({"nonce": "another", "aud": "demo-client"}, "nonce"),
            ({"aud": "demo-client"}, "nonce"),
            ({"nonce": "OURS", "aud": ["someone-else"]}, "another client"),
        ],
    )
    def test_refused(
        self,
        account: config.Account,
        auth: authorize.Authorization,
        claims: dict[str, str],
        why: str,
    ) -> None:
        """Another nonce, none, or another audience: nothing is stored."""
        assert auth.nonce is not None
        claims = {k: auth.nonce.reveal() if v == "OURS" else v for k, v in claims.items()}
        with pytest.raises(AuthorizationFailed, match=why):
            idtoken.check_id_token(id_token(claims), account, nonce=auth.nonce)

    def test_unreadable(self, account: config.Account, auth: authorize.Authorization) -> None:
        """An ID token that is not a JWT is refused."""
        with pytest.raises(AuthorizationFailed, match="cannot be read"):
            idtoken.check_id_token(Secret("garbage"), account, nonce=auth.nonce)

    def test_without_openid_nothing_is_checked(self, provider: DevProvider, tmp_path: Path) -> None:
        """Without openid no nonce was sent, and an ID token is not ours to judge."""
        account = account_for(provider, tmp_path)
        auth = authorize.start(account, "http://127.0.0.1:1/")
        idtoken.check_id_token(Secret("garbage"), account, nonce=auth.nonce)


def answer(status: int, body: object) -> httpx.Response:
    return httpx.Response(status, json=body)


class TestDeviceAnswers:
    def test_google_names(self) -> None:
        """Google's verification_url and numbers as strings are understood."""
        grant = authorize.parse_device_authorization(
            answer(
                200,
                {
                    "device_code": "dc",
                    "user_code": "ABCD-EFGH",
                    "verification_url": "https://www.google.com/device",
                    "expires_in": "1800",
                    "interval": "5",
                },
            ),
            now=mock_now(trio.testing.MockClock())(),
            account="work",
        )
        assert grant.verification_uri == "https://www.google.com/device"
        assert (grant.expires_in, grant.interval) == (1800, 5)
        assert grant.verification_uri_complete is None
        assert grant.device_code == Secret("dc")

    def test_missing_fields(self) -> None:
        """An answer without a user_code is a provider failure that names what is missing."""
        with pytest.raises(TransientGrantError, match="user_code"):
            authorize.parse_device_authorization(
                answer(
                    200, {"device_code": "dc", "verification_uri": "https://x", "expires_in": 9}
                ),
                now=mock_now(trio.testing.MockClock())(),
                account="work",
            )

    def test_error_is_classified_and_explained(self) -> None:
        """A refused device request explains AADSTS7000218 (public client flows)."""
        body = {
            "error": "invalid_client",
            "error_description": "AADSTS7000218: The request body must contain client_secret",
        }
        with pytest.raises(Misconfigured) as caught:
            authorize.parse_device_authorization(
                answer(401, body), now=mock_now(trio.testing.MockClock())(), account="work"
            )
        assert "Allow public client flows" in caught.value.hint

    @pytest.mark.parametrize(
        ("error", "outcome"),
        [
            ("authorization_pending", authorize.PENDING),
            ("slow_down", authorize.SLOW_DOWN),
            ("access_denied", "declined"),
            ("authorization_declined", "declined"),
            ("expired_token", "expired"),
            ("bad_verification_code", "does not know"),
        ],
    )
    def test_poll_answers(self, error: str, outcome: str) -> None:
        """Pending and slow_down keep polling; declined, expired and unknown codes stop."""
        now = mock_now(trio.testing.MockClock())()
        response = answer(400, {"error": error})
        if outcome in (authorize.PENDING, authorize.SLOW_DOWN):
            assert authorize.parse_device_poll(response, now=now, account="work") == outcome
        else:
            with pytest.raises(AuthorizationFailed, match=outcome):
                authorize.parse_device_poll(response, now=now, account="work")

    def test_poll_tokens(self) -> None:
        """An approved poll yields tokens."""
        now = mock_now(trio.testing.MockClock())()
        body = {
            "access_token": "at",
            "token_type": "Bearer",
            "expires_in": 60,
            "refresh_token": "r",
        }
        tokens = authorize.parse_device_poll(answer(200, body), now=now, account="work")
        assert isinstance(tokens, TokenSet)
        assert tokens.refresh_token == Secret("r")


# --- the browser flow, end to end ------------------------------------------------------------


class TestBrowserFlow:
    async def test_signs_in_through_the_loopback_redirect(
        self, provider: DevProvider, tmp_path: Path
    ) -> None:
        """The browser follows the URL back to the daemon, which stores tokens and says so."""
        cfg = flow_config(tmp_path, provider)
        async with in_process_daemon(cfg) as d:
            conv = await Conversation.start(d)
            first = await conv.next()
            assert first["event"] == "authorize"
            redirect = str(first["redirect_uri"])
            assert redirect.startswith("http://127.0.0.1:")
            assert query(str(first["url"]))["redirect_uri"] == redirect
            page = await browse(str(first["url"]))
            assert page.status_code == 200
            assert "Signed in" in page.text
            assert page.headers["Referrer-Policy"] == "no-referrer"
            events, final = await conv.final()
            assert events == [{"event": "exchanging", "via": "browser"}]
            assert final["ok"] is True
            assert isinstance(final["expires_in"], int)
            assert final["expires_in"] > 3500
            st = stored(tmp_path)
            assert st.status == state.OK
            assert st.refresh_token is not None
            assert provider.valid_refresh_tokens(USER) == [st.refresh_token.reveal()]
            token = await d.scheduler.token("work", None, trio.current_time() + 5)
            assert token.access_token == st.access_token
            with pytest.raises(httpx.ConnectError):  # the listener is gone
                await browse(redirect)

    async def test_forged_state_is_rejected_and_the_real_answer_still_works(
        self, provider: DevProvider, tmp_path: Path
    ) -> None:
        """A redirect with a forged state gets a clear refusal, no exchange; then the real one."""
        cfg = flow_config(tmp_path, provider)
        async with in_process_daemon(cfg) as d:
            conv = await Conversation.start(d)
            first = await conv.next()
            forged = await browse(f"{first['redirect_uri']}?code=stolen&state=forged")
            assert forged.status_code == 400
            assert "not the answer to this sign-in" in forged.text
            rejected = await conv.next()
            assert rejected["event"] == "rejected"
            assert "another sign-in's state" in str(rejected["message"])
            assert provider.count(grant_type="authorization_code") == 0
            assert not state_file(tmp_path).exists()
            assert (await browse(str(first["url"]))).status_code == 200
            _, final = await conv.final()
            assert final["ok"] is True

    async def test_replayed_redirect_is_rejected(
        self, provider: DevProvider, tmp_path: Path
    ) -> None:
        """The answer to a finished sign-in, pasted into the next one, is refused unexchanged."""
        cfg = flow_config(tmp_path, provider)
        async with in_process_daemon(cfg) as d:
            conv = await Conversation.start(d)
            first = await conv.next()
            location = (await browse(str(first["url"]), follow=False)).headers["Location"]
            await conv.paste(location)
            _, final = await conv.final()
            assert final["ok"] is True
            before = state_file(tmp_path).read_bytes()
            again = await Conversation.start(d)
            await again.next()
            await again.paste(location)
            rejected = await again.next()
            assert rejected["event"] == "rejected"
            assert "another sign-in's state" in str(rejected["message"])
            assert provider.count(grant_type="authorization_code") == 1
            assert state_file(tmp_path).read_bytes() == before
            await again.close()

    async def test_wrong_pkce_verifier_stores_nothing(
        self, provider: DevProvider, tmp_path: Path
    ) -> None:
        """A code injected with our state but issued for another PKCE challenge is refused."""
        cfg = flow_config(tmp_path, provider)
        async with in_process_daemon(cfg) as d:
            conv = await Conversation.start(d)
            first = await conv.next()
            ours = query(str(first["url"]))
            # The attacker's own request: same client and redirect, their own challenge.
            attack = (
                provider.endpoints["authorization_endpoint"]
                + "?"
                + urlencode(
                    {
                        "client_id": "demo-client",
                        "response_type": "code",
                        "redirect_uri": ours["redirect_uri"],
                        "state": ours["state"],
                        "code_challenge": base64.urlsafe_b64encode(
                            hashlib.sha256(b"x" * 43).digest()
                        )
                        .rstrip(b"=")
                        .decode(),
                        "code_challenge_method": "S256",
                        "login_hint": "mallory@example.com",
                    }
                )
            )
            injected = (await browse(attack, follow=False)).headers["Location"]
            page = await browse(injected)
            assert page.status_code == 400
            assert "PKCE verification failed" in page.text
            _, final = await conv.final()
            assert final["ok"] is False
            assert final["error"] == "authorization-failed"
            assert "the authorization code" in str(final["message"])
            assert "PKCE verification failed" in str(final["message"])
            assert "mailoauth authorize work" in str(final["hint"])
            assert not state_file(tmp_path).exists()

    async def test_error_redirect_ends_with_a_clear_message(
        self, provider: DevProvider, tmp_path: Path
    ) -> None:
        """A refused sign-in shows the browser why, ends the flow and stores nothing."""
        cfg = flow_config(tmp_path, provider)
        provider.deny_next_authorization("access_denied")
        async with in_process_daemon(cfg) as d:
            conv = await Conversation.start(d)
            first = await conv.next()
            page = await browse(str(first["url"]))
            assert page.status_code == 403
            assert "access_denied" in page.text
            _, final = await conv.final()
            assert final["error"] == "authorization-failed"
            assert "refused the sign-in (access_denied)" in str(final["message"])
            assert "mailoauth authorize work" in str(final["hint"])
            assert provider.count(grant_type="authorization_code") == 0
            assert not state_file(tmp_path).exists()

    async def test_pasted_error_is_explained(self, provider: DevProvider, tmp_path: Path) -> None:
        """A pasted error answer with an AADSTS code says what it means and what to do."""
        cfg = flow_config(tmp_path, provider)
        async with in_process_daemon(cfg) as d:
            conv = await Conversation.start(d)
            first = await conv.next()
            state_value = query(str(first["url"]))["state"]
            description = "AADSTS50011: The redirect URI specified in the request does not match"
            await conv.paste(
                f"{first['redirect_uri']}?"
                + urlencode(
                    {
                        "error": "invalid_request",
                        "error_description": description,
                        "state": state_value,
                    }
                )
            )
            _, final = await conv.final()
            assert "redirect URI is not registered" in str(final["message"])
            assert "'Mobile and desktop applications' redirect URI" in str(final["hint"])

    async def test_paste_back_completes_the_same_flow(
        self, provider: DevProvider, tmp_path: Path
    ) -> None:
        """The address of the page that failed to load, pasted back, finishes the sign-in."""
        cfg = flow_config(tmp_path, provider, account_keys='scopes = ["openid", "mail"]')
        async with in_process_daemon(cfg) as d:
            conv = await Conversation.start(d)
            first = await conv.next()
            assert "nonce" in query(str(first["url"]))
            # The browser on another machine: the provider's redirect is not followed.
            location = (await browse(str(first["url"]), follow=False)).headers["Location"]
            await conv.paste("  " + location + "  ")
            events, final = await conv.final()
            assert events == [{"event": "exchanging", "via": "paste"}]
            assert final["ok"] is True
            assert stored(tmp_path).refresh_token is not None

    async def test_fixed_redirect_port(self, provider: DevProvider, tmp_path: Path) -> None:
        """With redirect_port the listener is on that port, so `ssh -L` can forward it."""
        port = free_port()
        cfg = flow_config(tmp_path, provider, provider_keys=f"redirect_port = {port}\n")
        async with in_process_daemon(cfg) as d:
            conv = await Conversation.start(d)
            first = await conv.next()
            assert first["redirect_uri"] == f"http://127.0.0.1:{port}/"
            assert (await browse(str(first["url"]))).status_code == 200
            _, final = await conv.final()
            assert final["ok"] is True

    async def test_microsoft_redirects_to_localhost(
        self, provider: DevProvider, tmp_path: Path
    ) -> None:
        """A microsoft profile uses http://localhost:PORT/, what its app portal registers."""
        preset = 'preset = "microsoft"\ntenant = "contoso.com"\nscopes = ["mail"]\n'
        cfg = flow_config(tmp_path, provider, provider_keys=preset)
        assert cfg.providers["dev"].preset == "microsoft"
        async with in_process_daemon(cfg) as d:
            conv = await Conversation.start(d)
            first = await conv.next()
            assert str(first["redirect_uri"]).startswith("http://localhost:")
            assert (await browse(str(first["url"]))).status_code == 200
            _, final = await conv.final()
            assert final["ok"] is True

    async def test_hanging_up_cancels_and_frees_the_port(
        self, provider: DevProvider, tmp_path: Path
    ) -> None:
        """When the helper goes away the sign-in ends: its port closes, a new one may start."""
        cfg = flow_config(tmp_path, provider)
        async with in_process_daemon(cfg) as d:
            conv = await Conversation.start(d)
            first = await conv.next()
            busy = await Conversation.start(d)
            _, refused = await busy.final()
            assert refused["error"] == "busy"
            assert "already in progress" in str(refused["message"])
            await conv.close()
            port = urlsplit(str(first["redirect_uri"])).port

            def closed() -> bool:
                with socket.socket() as s:
                    return s.connect_ex(("127.0.0.1", port or 0)) != 0

            await eventually(closed)
            again = await Conversation.start(d)
            assert (await again.next())["event"] == "authorize"
            await again.close()
            assert not state_file(tmp_path).exists()

    async def test_client_credentials_needs_no_sign_in(
        self, provider: DevProvider, tmp_path: Path
    ) -> None:
        """authorize on a client_credentials account says nobody needs to sign in."""
        cfg = flow_config(tmp_path, provider, account_keys='flow = "client_credentials"')
        async with in_process_daemon(cfg) as d:
            conv = await Conversation.start(d)
            events, final = await conv.final()
            assert events == []
            assert final["ok"] is True
            assert "client_credentials" in str(final["note"])
            assert "nobody needs to sign in" in str(final["note"])

    async def test_nobody_signs_in(
        self, clock: trio.testing.MockClock, provider: DevProvider, tmp_path: Path
    ) -> None:
        """After AUTHORIZE_TIMEOUT without an answer the sign-in fails and says so."""
        cfg = flow_config(tmp_path, provider)
        async with in_process_daemon(cfg, now=mock_now(clock)) as d:
            conv = await Conversation.start(d)
            await conv.next()
            await trio.testing.wait_all_tasks_blocked()
            clock.jump(601)
            _, final = await conv.final()
            assert final["error"] == "authorization-failed"
            assert "within 10 minutes" in str(final["message"])


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """A clock that stands still until the test jumps it."""
    return trio.testing.MockClock(rate=0)


@pytest.mark.slow
class TestDeviceFlow:
    @pytest.fixture
    def dev(self, clock: trio.testing.MockClock) -> Iterator[DevProvider]:
        """A provider on the test's clock, so its expiry and slow_down follow the jumps."""
        with DevProvider(clock=lambda: mock_now(clock)().timestamp()) as p:
            p.set_options(device_interval=5, device_expires_in=60)
            yield p

    @staticmethod
    async def step(
        clock: trio.testing.MockClock, dev: DevProvider, seconds: float, *, poll: bool = True
    ) -> None:
        """Jump, then wait in real time for the poll that the jump allows (or for none)."""
        await trio.testing.wait_all_tasks_blocked()
        before = dev.count()
        clock.jump(seconds)
        if poll:
            await eventually(lambda: dev.count() > before)
        await trio.to_thread.run_sync(time.sleep, 0.05)
        await trio.testing.wait_all_tasks_blocked()
        assert dev.count() == before + poll

    async def start(self, d: daemon.Daemon) -> tuple[Conversation, dict[str, object]]:
        conv = await Conversation.start(d, flow="device_code")
        first = await conv.next()
        assert first["event"] == "device"
        return conv, first

    async def test_pending_slow_down_then_approved(
        self, clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path
    ) -> None:
        """Polls wait the interval, add 5 s on slow_down, and end with tokens once approved."""
        cfg = flow_config(tmp_path, dev)
        async with in_process_daemon(cfg, now=mock_now(clock)) as d:
            conv, first = await self.start(d)
            assert first["interval"] == 5
            assert first["verification_uri"] == dev.url + "/device"
            assert str(first["verification_uri_complete"]).endswith(str(first["user_code"]))
            await self.step(clock, dev, 4.9, poll=False)  # not yet
            await self.step(clock, dev, 0.1)  # 5 s: authorization_pending
            dev.add_fault("status", path="/token", status=400, error="slow_down")
            await self.step(clock, dev, 5)  # 10 s: slow_down
            assert await conv.next() == {"event": "slow_down", "interval": 10}
            await self.step(clock, dev, 10)  # 20 s: pending again
            dev.approve_device(str(first["user_code"]), USER)
            await self.step(clock, dev, 10)  # 30 s: approved
            _, final = await conv.final()
            assert final["ok"] is True
            polls = [r for r in dev.requests if r.grant_type == GrantType.DEVICE_CODE]
            start = polls[0].time - 5
            assert [round(r.time - start) for r in polls] == [5, 10, 20, 30]
            assert [r.status for r in polls] == [400, 400, 400, 200]
            st = stored(tmp_path)
            assert st.refresh_token is not None
            assert dev.valid_refresh_tokens(USER) == [st.refresh_token.reveal()]

    async def test_declined(
        self, clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path
    ) -> None:
        """A declined request ends the sign-in with a clear message and nothing stored."""
        cfg = flow_config(tmp_path, dev)
        async with in_process_daemon(cfg, now=mock_now(clock)) as d:
            conv, first = await self.start(d)
            dev.deny_device(str(first["user_code"]))
            await self.step(clock, dev, 5)
            _, final = await conv.final()
            assert final["error"] == "authorization-failed"
            assert "the sign-in was declined (access_denied)" in str(final["message"])
            assert "approve the request" in str(final["hint"])
            assert not state_file(tmp_path).exists()

    async def test_expired(
        self, clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path
    ) -> None:
        """A code nobody enters in time ends the sign-in when the provider says expired_token."""
        dev.set_options(device_interval=5, device_expires_in=30)
        cfg = flow_config(tmp_path, dev)
        async with in_process_daemon(cfg, now=mock_now(clock)) as d:
            conv, first = await self.start(d)
            assert first["expires_in"] == 30
            for _ in range(6):
                await self.step(clock, dev, 5)
            _, final = await conv.final()
            assert final["error"] == "authorization-failed"
            assert "expired before anyone signed in" in str(final["message"])
            assert "expired_token" in str(final["message"])
            assert not state_file(tmp_path).exists()


# --- the real programs -------------------------------------------------------------------------


@pytest.fixture
def setup(tmp_path: Path, provider: DevProvider) -> Path:
    """A config file whose account can sign in at the development provider."""
    path = tmp_path / "config.toml"
    path.write_text(config_text(tmp_path, provider, provider_keys=sign_in_keys(provider)))
    return path


Popen = subprocess.Popen[str]
Start = Callable[..., DaemonProcess]


def start_helper(*args: str, socket: Path, stdin: int | None = subprocess.DEVNULL) -> Popen:
    """The real `mailoauth`, for a conversation on its stdin and stdout."""
    return subprocess.Popen(
        [str(MAILOAUTH), "--socket", str(socket), *args],
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_until(proc: Popen, marker: str, seen: list[str]) -> str:
    """Lines of the helper's stdout until one containing `marker`, which is returned."""
    assert proc.stdout is not None
    while line := proc.stdout.readline():
        seen.append(line)
        if marker in line:
            return line
    raise AssertionError(f"no {marker!r} in {''.join(seen)!r}; stderr: {proc.communicate()[1]}")


def finish(proc: Popen, seen: list[str]) -> tuple[int, str, str]:
    """Wait for the helper; its status, all of its stdout, its stderr."""
    # Not communicate(): it reads the pipes' fds and would miss what readline() buffered.
    assert proc.stdout is not None
    assert proc.stderr is not None
    if proc.stdin is not None:
        proc.stdin.close()
    proc.wait(timeout=60)
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    return proc.returncode, "".join(seen) + out, err


@pytest.mark.slow
class TestHelper:
    def test_browser_sign_in(self, setup: Path, provider: DevProvider, start_daemon: Start) -> None:
        """`mailoauth authorize --no-browser` prints the URL; once followed it reports success."""
        d = start_daemon(setup)
        proc = start_helper("authorize", "work", "--no-browser", socket=d.socket)
        seen: list[str] = []
        url = read_until(proc, "/authorize?", seen).strip()
        assert httpx.get(url, follow_redirects=True).status_code == 200
        status, out, err = finish(proc, seen)
        assert status == 0, err
        assert "work: signed in; access token valid until" in out
        assert "paste it here" in out
        assert helper("token", "work", socket=d.socket).returncode == 0

    def test_paste_back(self, setup: Path, provider: DevProvider, start_daemon: Start) -> None:
        """The address pasted on the helper's stdin completes the sign-in."""
        d = start_daemon(setup)
        proc = start_helper(
            "authorize", "work", "--no-browser", socket=d.socket, stdin=subprocess.PIPE
        )
        seen: list[str] = []
        url = read_until(proc, "/authorize?", seen).strip()
        location = httpx.get(url, follow_redirects=False).headers["Location"]
        assert proc.stdin is not None
        proc.stdin.write("http://127.0.0.1:1/?code=x&state=forged\n")  # a wrong paste first
        proc.stdin.write(location + "\n")
        proc.stdin.flush()
        status, out, err = finish(proc, seen)
        assert status == 0, err
        assert "not accepted" in err
        assert "signed in" in out

    def test_device_code(self, setup: Path, provider: DevProvider, start_daemon: Start) -> None:
        """--flow device_code shows where to go and the code, and ends when it is approved."""
        provider.set_options(device_interval=1)
        d = start_daemon(setup)
        proc = start_helper("authorize", "work", "--flow", "device_code", socket=d.socket)
        seen: list[str] = []
        line = read_until(proc, "enter the code", seen)
        assert provider.url + "/device" in "".join(seen)
        provider.approve_device(line.split()[-1], USER)
        status, out, err = finish(proc, seen)
        assert status == 0, err
        assert "signed in" in out

    def test_failure_exits_1_with_the_reason(
        self, setup: Path, provider: DevProvider, start_daemon: Start
    ) -> None:
        """A refused sign-in exits 1 with the reason and the command to retry on stderr."""
        d = start_daemon(setup)
        provider.deny_next_authorization()
        proc = start_helper("authorize", "work", "--no-browser", socket=d.socket)
        seen: list[str] = []
        url = read_until(proc, "/authorize?", seen).strip()
        httpx.get(url, follow_redirects=True)
        status, _, err = finish(proc, seen)
        assert status == 1
        assert "access_denied" in err
        assert "mailoauth authorize work" in err

    def test_token_wait(self, setup: Path, provider: DevProvider, start_daemon: Start) -> None:
        """`token --wait` blocks while the account needs a sign-in, and prints the token after."""
        d = start_daemon(setup)
        short = helper("token", "work", "--wait=0.5", socket=d.socket)
        assert short.returncode == 4
        assert "mailoauth authorize work" in short.stderr
        waiting = start_helper("token", "work", "--wait=60", socket=d.socket)
        time.sleep(0.5)
        assert waiting.poll() is None
        sign_in = start_helper("authorize", "work", "--no-browser", socket=d.socket)
        seen: list[str] = []
        httpx.get(read_until(sign_in, "/authorize?", seen).strip(), follow_redirects=True)
        assert finish(sign_in, seen)[0] == 0
        status, out, err = finish(waiting, [])
        assert status == 0, err
        assert out.strip() == helper("token", "work", socket=d.socket).stdout.strip()
        assert provider.introspect(out.strip())["active"] is True

    def test_token_wait_usage(self, setup: Path, start_daemon: Start) -> None:
        """--wait takes its seconds only as --wait=S; a bad value is a usage error (exit 2)."""
        d = start_daemon(setup)
        bad = helper("token", "work", "--wait=soon", socket=d.socket)
        assert bad.returncode == 2
        assert "--wait takes a number of seconds" in bad.stderr
        # Alone it means the default, and does not take the account for its value.
        assert helper_token._parse_hot(["--wait", "work"]) == ("work", {"--wait": "300.0"})

    def test_no_secret_in_logs(
        self, setup: Path, provider: DevProvider, start_daemon: Start, tmp_path: Path
    ) -> None:
        """No state, nonce, code, PKCE verifier, device code, token or secret reaches the log."""
        setup.write_text(
            setup.read_text().replace('username = "', 'scopes = ["openid"]\nusername = "')
        )
        provider.set_options(device_interval=1)
        d = start_daemon(setup)
        proc = start_helper("authorize", "work", "--no-browser", socket=d.socket)
        seen: list[str] = []
        url = read_until(proc, "/authorize?", seen).strip()
        location = httpx.get(url, follow_redirects=False).headers["Location"]
        httpx.get(f"{query(url)['redirect_uri']}?code=forged-{query(url)['state'][:5]}&state=x")
        httpx.get(location)
        status, _, err = finish(proc, seen)
        assert status == 0, err
        secrets = {query(url)["state"], query(url)["nonce"], query(location)["code"], "demo-secret"}
        proc = start_helper("authorize", "work", "--flow", "device_code", socket=d.socket)
        seen = []
        line = read_until(proc, "enter the code", seen)
        secrets |= set(provider.devices)  # the device codes
        provider.approve_device(line.split()[-1], USER)
        assert finish(proc, seen)[0] == 0
        on_disk = stored(tmp_path)
        assert on_disk.access_token is not None
        assert on_disk.refresh_token is not None
        secrets |= {on_disk.access_token.reveal(), on_disk.refresh_token.reveal()}
        assert helper("revoke", "work", socket=d.socket).returncode == 0
        # Codes, PKCE verifiers (which only the provider sees), device codes, tokens.
        secrets |= set(provider.issued_secrets())
        d.stop()
        log = d.log()
        assert "authorize.code_received" in log  # the flows really were logged
        assert [s for s in secrets if s in log] == []


# --- revoke, and provider errors explained ------------------------------------------------


def seed_grant(tmp: Path, provider: DevProvider) -> str:
    """Store a grant as a finished sign-in would; returns its refresh token."""
    refresh_token = provider.issue_refresh_token(USER)
    store = state.TokenStore(tmp / "state")
    store.open()
    store.save(state.imported("work", Secret(refresh_token), datetime.now(UTC)))
    store.close()
    return refresh_token


async def run_helper(*args: str, d: daemon.Daemon) -> subprocess.CompletedProcess[str]:
    """The real `mailoauth` against the in-process daemon (in a thread: the loop runs on)."""
    return await trio.to_thread.run_sync(lambda: helper(*args, socket=d.socket_path))


@pytest.mark.integration  # ,  # `mailoauth revoke`
@pytest.mark.slow
class TestRevoke:
    async def test_revokes_at_the_provider_then_forgets(
        self, provider: DevProvider, tmp_path: Path
    ) -> None:
        """With a revocation endpoint the grant dies at the provider and the tokens here."""
        cfg = flow_config(tmp_path, provider)
        seed_grant(tmp_path, provider)
        async with in_process_daemon(cfg) as d:
            assert (await run_helper("refresh", "work", d=d)).returncode == 0
            run = await run_helper("revoke", "work", d=d)
            assert run.returncode == 0, run.stderr
            assert run.stdout == ""
            assert "revoked at the provider; local tokens forgotten" in run.stderr
            assert provider.valid_refresh_tokens(USER) == []
            assert not state_file(tmp_path).exists()
            assert d.scheduler.status()[0]["status"] == state.NEEDS_AUTHORIZATION
            token = await run_helper("token", "work", d=d)
            assert token.returncode == 4
            assert "not authorized yet" in token.stderr

    async def test_nothing_to_revoke(self, provider: DevProvider, tmp_path: Path) -> None:
        """An account without tokens is said to have had none; nothing goes to the provider."""
        async with in_process_daemon(flow_config(tmp_path, provider)) as d:
            run = await run_helper("revoke", "work", d=d)
        assert run.returncode == 0, run.stderr
        assert "there were no tokens to revoke" in run.stderr
        assert provider.count(path="/revoke") == 0

    async def test_without_an_endpoint_the_grant_remains(
        self, provider: DevProvider, tmp_path: Path
    ) -> None:
        """Without a revocation endpoint the tokens are forgotten and the grant said to remain."""
        path = tmp_path / "config.toml"
        revocation = f'revocation_endpoint = "{provider.endpoints["revocation_endpoint"]}"'
        path.write_text(config_text(tmp_path, provider).replace(revocation, ""))
        seed_grant(tmp_path, provider)
        async with in_process_daemon(config.load(path)) as d:
            await run_helper("refresh", "work", d=d)
            run = await run_helper("revoke", "work", d=d)
        assert run.returncode == 0, run.stderr
        assert "no revocation endpoint, so the grant remains there" in run.stderr
        assert provider.valid_refresh_tokens(USER) != []
        assert provider.count(path="/revoke") == 0
        assert not state_file(tmp_path).exists()

    async def test_failed_revocation_is_reported(
        self, provider: DevProvider, tmp_path: Path
    ) -> None:
        """A revocation endpoint that fails is named with its answer; the tokens go anyway."""
        cfg = flow_config(tmp_path, provider)
        seed_grant(tmp_path, provider)
        provider.add_fault("status", path="/revoke", status=503)
        async with in_process_daemon(cfg) as d:
            run = await run_helper("revoke", "work", d=d)
        assert run.returncode == 0, run.stderr
        assert "did not confirm the revocation (the revocation endpoint answered HTTP 503)" in (
            run.stderr
        )
        assert "remove the app's access" in run.stderr
        assert not state_file(tmp_path).exists()


@pytest.mark.integration  # ,  # `mailoauth status` and `token`
@pytest.mark.slow
class TestExplanations:
    @pytest.mark.parametrize(
        ("description", "what", "todo"),
        [
            (
                "AADSTS70008: The provided authorization code or refresh token has expired",
                "AADSTS70008: the refresh token has expired or was revoked",
                "run 'mailoauth authorize work' to sign in again",
            ),
            (
                "AADSTS65001: The user or administrator has not consented to use the application",
                "AADSTS65001: the user or an administrator has not consented",
                "have an administrator grant consent, then run 'mailoauth authorize work'",
            ),
            # Google's words, from a profile not marked `testing`: no 7-day remark (issue #10).
            (
                "Token has been expired or revoked.",
                "invalid_grant: Token has been expired or revoked.",
                "run 'mailoauth authorize work' and sign in again",
            ),
        ],
    )
    async def test_status_and_helper_explain_and_say_what_to_do(
        self, provider: DevProvider, tmp_path: Path, description: str, what: str, todo: str
    ) -> None:
        """The helper's message and status say what the provider's error means and what to do."""
        cfg = flow_config(tmp_path, provider)
        seed_grant(tmp_path, provider)
        provider.add_fault(
            "status", count=5, status=400, error="invalid_grant", error_description=description
        )
        async with in_process_daemon(cfg) as d:
            refresh = await run_helper("refresh", "work", d=d)
            assert refresh.returncode == 4
            assert what in refresh.stderr
            assert todo in refresh.stderr
            token = await run_helper("token", "work", d=d)
            assert token.returncode == 4
            assert what in token.stderr
            assert todo in token.stderr
        # After a restart too, from what the state file kept.
        async with in_process_daemon(cfg) as d:
            rows = json.loads((await run_helper("status", "--json", d=d)).stdout)["accounts"]
            assert what in rows[0]["last_error"]
            assert todo in rows[0]["hint"]
            table = (await run_helper("status", d=d)).stdout
            assert f"work: {rows[0]['hint']}" in table
