"""
Sign-in checks who signed in (issue 10, section 5): with `openid` the ID token is required
and its nonce, issuer, audience and mailbox checked; RFC 9207's `iss` on the redirect;
the device flow's provider text shown only clean, and its addresses only when https.
End to end against the development provider, plus the pure checks, Hypothesis for the text.
"""

from __future__ import annotations

import base64
import json
import unicodedata
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import trio
import trio.testing
from conftest import USER, in_process_daemon, make_config
from hypothesis import given
from hypothesis import strategies as st
from test_authorize import Conversation, browse, flow_config, state_file

from mailoauthd import config
from mailoauthd.errors import AuthorizationFailed
from mailoauthd.provider import idtoken, provider_input
from mailoauthd.secret import Secret
from mailoauthd.testing import DevProvider

OPENID = 'scopes = ["openid", "mail"]\n'
OTHER = "bob@example.com"


def issuer_config(tmp: Path, provider: DevProvider) -> config.Config:
    """An openid account whose profile names its issuer (discovery fills in the rest)."""
    return make_config(
        tmp, provider, provider_keys=f'issuer = "{provider.url}"\n', account_keys=OPENID
    )


async def browser_sign_in(cfg: config.Config) -> tuple[int, str, dict[str, object]]:
    """A whole browser sign-in: the page's status and text, and the helper's final answer."""
    async with in_process_daemon(cfg) as d:
        conv = await Conversation.start(d)
        first = await conv.next()
        page = await browse(str(first["url"]))
        _, final = await conv.final()
    return page.status_code, page.text, final


class TestBrowserSignIn:
    async def test_the_right_mailbox(self, provider: DevProvider, tmp_path: Path) -> None:
        """The mailbox asked for signs in: stored (the checks do not refuse a good answer)."""
        status, text, final = await browser_sign_in(issuer_config(tmp_path, provider))
        assert final["ok"] is True, final
        assert status == 200
        assert f"signed in as <b>{USER}</b>" in text
        assert state_file(tmp_path).exists()

    async def test_another_mailbox_is_refused(self, provider: DevProvider, tmp_path: Path) -> None:
        """Signing in as another mailbox: an error naming both, on the page too; nothing stored."""
        provider.sign_in_next_as(OTHER)
        status, text, final = await browser_sign_in(
            flow_config(tmp_path, provider, account_keys=OPENID)
        )
        assert final["ok"] is False
        message = str(final["message"])
        assert f"signed in as {OTHER}, but the account is {USER}" in message
        assert "nothing was stored" in message
        assert f"sign in as {USER}" in str(final["hint"])
        assert status == 400
        assert OTHER in text
        assert USER in text
        assert not state_file(tmp_path).exists()

    async def test_mailbox_case_does_not_matter(
        self, provider: DevProvider, tmp_path: Path
    ) -> None:
        """Mailbox names compare without regard to case, and preferred_username counts too."""
        provider.set_id_token_claims(email=None, preferred_username=USER.upper())
        _, _, final = await browser_sign_in(flow_config(tmp_path, provider, account_keys=OPENID))
        assert final["ok"] is True, final

    @pytest.mark.parametrize(
        ("claims", "why"),
        [
            ({"iss": "https://elsewhere.example"}, "issued by 'https://elsewhere.example'"),
            ({"iss": None}, "issued by 'no issuer'"),
            ({"aud": "another-client"}, "issued to another client"),
            ({"nonce": "replayed"}, "nonce"),
            ({"upn": OTHER, "email": None}, f"signed in as {OTHER}"),
        ],
    )
    async def test_id_token_checks(
        self, provider: DevProvider, tmp_path: Path, claims: dict[str, str | None], why: str
    ) -> None:
        """Another issuer, none, another audience, another nonce or mailbox: nothing stored."""
        provider.set_id_token_claims(**claims)
        _, _, final = await browser_sign_in(issuer_config(tmp_path, provider))
        assert final["ok"] is False
        assert why in str(final["message"])
        assert not state_file(tmp_path).exists()

    async def test_id_token_required(self, provider: DevProvider, tmp_path: Path) -> None:
        """With openid asked for, an answer without an ID token is refused."""
        body = {"access_token": "A" * 40, "token_type": "Bearer", "expires_in": 3600}
        provider.add_fault("status", status=200, body=json.dumps(body))
        _, _, final = await browser_sign_in(flow_config(tmp_path, provider, account_keys=OPENID))
        assert final["ok"] is False
        assert "sent no ID token" in str(final["message"])
        assert not state_file(tmp_path).exists()

    @pytest.mark.parametrize(
        ("iss", "why"),
        [
            ("https://elsewhere.example", "comes from issuer 'https://elsewhere.example'"),
            (None, "names no issuer"),
        ],
    )
    async def test_response_issuer(
        self, provider: DevProvider, tmp_path: Path, iss: str | None, why: str
    ) -> None:
        """RFC 9207: a provider that promises `iss` must send its own; no code is exchanged."""
        provider.set_response_issuer(iss)
        _, text, final = await browser_sign_in(issuer_config(tmp_path, provider))
        assert final["ok"] is False
        assert why in str(final["message"])
        assert "RFC 9207" in text
        assert provider.count(grant_type="authorization_code") == 0
        assert not state_file(tmp_path).exists()

    async def test_response_issuer_unchecked_without_an_issuer(
        self, provider: DevProvider, tmp_path: Path
    ) -> None:
        """A profile that names no issuer has nothing to compare `iss` with."""
        provider.set_response_issuer("https://elsewhere.example")
        _, _, final = await browser_sign_in(flow_config(tmp_path, provider))
        assert final["ok"] is True, final


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """A clock that stands still until the test jumps it (polls wait on it)."""
    return trio.testing.MockClock(rate=0)


async def device_sign_in(
    cfg: config.Config, provider: DevProvider, clock: trio.testing.MockClock, *, user: str = USER
) -> dict[str, object]:
    """A device sign-in approved by `user` at once; the helper's final answer."""
    async with in_process_daemon(cfg) as d:
        conv = await Conversation.start(d, flow="device_code")
        first = await conv.next()
        if first.get("event") != "device":
            await conv.close()
            return first
        provider.approve_device(str(first["user_code"]), user)
        await trio.testing.wait_all_tasks_blocked()
        clock.jump(float(str(first["interval"])))  # the one poll, which gets the tokens
        _, final = await conv.final()
        return final


class TestDeviceFlow:
    async def test_another_mailbox_is_refused(
        self, provider: DevProvider, tmp_path: Path, clock: trio.testing.MockClock
    ) -> None:
        """The device flow has no nonce, but the ID token's mailbox is checked all the same."""
        provider.set_options(device_interval=1)
        cfg = flow_config(tmp_path, provider, account_keys=OPENID)
        final = await device_sign_in(cfg, provider, clock, user=OTHER)
        assert final["ok"] is False
        assert f"signed in as {OTHER}, but the account is {USER}" in str(final["message"])
        assert not state_file(tmp_path).exists()
        final = await device_sign_in(cfg, provider, clock)
        assert final["ok"] is True, final

    async def test_provider_text_is_cleaned(
        self, provider: DevProvider, tmp_path: Path, clock: trio.testing.MockClock
    ) -> None:
        """Escape sequences and bidi overrides never reach the helper; a bad link is dropped."""
        answer = {
            "device_code": "dc",
            "user_code": "\x1b[2J\x1b]0;pwned\x07WXYZ\u202e-1234\x00",
            "verification_uri": provider.url + "/device",
            "verification_uri_complete": "javascript:alert(1)",
            "message": "Go\r\nthere\x1b[0m",
            "expires_in": 60,
            "interval": 1,
        }
        provider.add_fault(
            "status", path="/device_authorization", status=200, body=json.dumps(answer)
        )
        cfg = flow_config(tmp_path, provider)
        async with in_process_daemon(cfg) as d:
            conv = await Conversation.start(d, flow="device_code")
            event = await conv.next()
            await conv.close()
        assert event["event"] == "device"
        assert event["user_code"] == "[2J]0;pwnedWXYZ-1234"
        assert event["verification_uri"] == provider.url + "/device"
        assert event["verification_uri_complete"] is None
        assert event["message"] == "Go there[0m"

    @pytest.mark.parametrize(
        "uri",
        ["http://phish.example/device", "javascript:alert(1)", "https://ok.example/\x1b[2J"],
    )
    async def test_unsafe_verification_uri_ends_the_sign_in(
        self, provider: DevProvider, tmp_path: Path, clock: trio.testing.MockClock, uri: str
    ) -> None:
        """A verification_uri that is not https (or loopback http) is never shown."""
        answer = {"device_code": "dc", "user_code": "WXYZ", "verification_uri": uri}
        answer |= {"expires_in": 60, "interval": 1}
        provider.add_fault(
            "status", path="/device_authorization", status=200, body=json.dumps(answer)
        )
        final = await device_sign_in(flow_config(tmp_path, provider), provider, clock)
        assert final["ok"] is False
        assert "\x1b" not in json.dumps(final, ensure_ascii=False)
        assert "sign in with a browser" in str(final["hint"])


# --- the pure checks -------------------------------------------------------------------------


def jwt(claims: dict[str, object]) -> Secret:
    part = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return Secret(f"eyJhbGciOiJub25lIn0.{part}.")


def preset_account(preset: str, **keys: str) -> config.Account:
    extra = "".join(f'{k} = "{v}"\n' for k, v in keys.items())
    scopes = '["openid", "email", "https://mail.google.com/"]' if preset == "google" else None
    return config.parse(
        f"""
        [providers.p]
        preset = "{preset}"
        client_id = "cid"
        {extra}
        [accounts.a]
        provider = "p"
        username = "{USER}"
        {"scopes = " + scopes if scopes else 'scopes = ["openid", "offline_access"]'}
        """,
        source="<test>",
    ).accounts["a"]


class TestIssuers:
    TID = "9188040d-6c67-4c5b-b112-36a304b66dad"

    def test_microsoft(self) -> None:
        """Microsoft's issuer is its login host with the token's own tenant id."""
        account = preset_account("microsoft")
        good = {"aud": "cid", "tid": self.TID, "email": USER}
        iss = f"https://login.microsoftonline.com/{self.TID}/v2.0"
        idtoken.check_id_token(jwt({**good, "iss": iss}), account, nonce=None)
        for wrong in (iss.replace(self.TID, "other"), "https://evil.example/x/v2.0", None):
            with pytest.raises(AuthorizationFailed, match="issued by"):
                idtoken.check_id_token(jwt({**good, "iss": wrong}), account, nonce=None)

    def test_google(self) -> None:
        """Google's issuer, in either of its documented forms."""
        account = preset_account("google")
        for iss in ("https://accounts.google.com", "accounts.google.com"):
            claims = {"aud": "cid", "iss": iss, "email": USER}
            idtoken.check_id_token(jwt(claims), account, nonce=None)
        claims = {"aud": "cid", "iss": "https://accounts.example", "email": USER}
        with pytest.raises(AuthorizationFailed, match="issued by"):
            idtoken.check_id_token(jwt(claims), account, nonce=None)

    def test_no_identity_claim(self) -> None:
        """An ID token that names no mailbox cannot contradict the username."""
        account = preset_account("google")
        claims = {"aud": "cid", "iss": "https://accounts.google.com", "sub": "1234"}
        idtoken.check_id_token(jwt(claims), account, nonce=None)


def shown(text: str) -> bool:
    """Text fit for a terminal: no control or format characters, no line breaks."""
    return not any(unicodedata.category(c) in ("Cc", "Cf", "Cs") for c in text)


class TestProviderText:
    @given(st.text(), st.integers(min_value=0, max_value=600))
    def test_clean_text(self, text: str, limit: int) -> None:
        """Whatever a provider sends comes out without control characters, and bounded."""
        cleaned = provider_input.clean_text(text, limit)
        assert shown(cleaned)
        assert len(cleaned) <= limit
        assert cleaned == cleaned.strip()

    @given(st.one_of(st.text(), st.from_regex(r"\Ahttps?://[^/]*(/.*)?\Z"), st.integers()))
    def test_shown_uri(self, value: object) -> None:
        """Only https, or http to a loopback host, in printable ASCII, is ever shown."""
        uri = provider_input.shown_uri(value)
        if uri is None:
            return
        assert uri == value
        assert all("!" <= c <= "~" for c in uri)
        parts = urlsplit(uri)
        assert parts.scheme == "https" or parts.hostname in ("127.0.0.1", "::1", "localhost")

    def test_examples(self) -> None:
        assert provider_input.shown_uri("https://microsoft.com/devicelogin")
        assert provider_input.shown_uri("http://127.0.0.1:8080/device")
        assert provider_input.shown_uri("http://example.com/device") is None
        assert provider_input.shown_uri("https://exa\u0430mple.com/") is None  # a Cyrillic a
        assert provider_input.clean_text("AB\x1b[31mCD\u200b\u202e", 64) == "AB[31mCD"
