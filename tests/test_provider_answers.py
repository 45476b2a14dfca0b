"""
What a provider answers, checked at the boundary (issue #10, sections 1–4, the provider's
side): parsing that cannot crash, tokens that must be RFC 6750 b64tokens, bounded texts,
the classification of errors, and grants that are never lost nor retried forever.

Pure parsing is tested on httpx.Response objects (oauth.py is sans-I/O); everything the
daemon does with an answer runs in-process against the development provider over real
HTTP, its hostile mode (mailoauthd/testing/hostile.py) sending what no honest provider would.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from conftest import (
    T0,
    USER,
    config_text,
    eventually,
    helper,
    in_process_daemon,
    make_config,
    mock_now,
    quiet,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailoauthd import config
from mailoauthd.authorization import authorize
from mailoauthd.errors import (
    AuthorizationFailed,
    ConfigError,
    GrantError,
    Misconfigured,
    TransientGrantError,
)
from mailoauthd.provider import discovery, oauth, provider_http, provider_input
from mailoauthd.refresh import attempt, ondemand
from mailoauthd.secret import Secret
from mailoauthd.storage import state
from mailoauthd.storage.state import TokenStore
from mailoauthd.testing import DevProvider, HostileAnswer

FAST = 'refresh_spread = "0s"'
BAD_TOKEN = 'tok"\nurl = "file:///home/u/.secret"\noutput = "/tmp/x"\n#'  # noqa: S105


def seed(tmp: Path, provider: DevProvider, *, expires_in: float | None = 3600) -> str:
    refresh_token = provider.issue_refresh_token(USER)
    st = state.imported("work", Secret(refresh_token), T0)
    if expires_in is not None:
        st = dataclasses.replace(
            st, access_token=Secret("seeded-work"), expires_at=T0 + timedelta(seconds=expires_in)
        )
    store = TokenStore(tmp / "state")
    store.open()
    store.save(st)
    store.close()
    return refresh_token


def stored(tmp: Path) -> state.AccountState:
    return state.from_toml((tmp / "state" / "work.toml").read_text(), source="work")


def refreshes(provider: DevProvider) -> int:
    return provider.count(grant_type="refresh_token")


def answer(status: int = 200, **body: object) -> HostileAnswer:
    return HostileAnswer(
        status=status,
        headers=(("Content-Type", "application/json"),),
        body=json.dumps(body).encode(),
    )


def parse(response: httpx.Response, **kw: float) -> oauth.TokenSet:
    return oauth.parse_token_response(response, now=T0, account="work", **kw)  # type: ignore[arg-type]


def jwt(claims: dict[str, object]) -> str:
    def part(value: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none'})}.{part(claims)}.sig"


# --- section 1: no answer ends the daemon ------------------------------------------------


class TestParsingCannotCrash:
    @pytest.mark.parametrize(
        "body",
        [b"[" * 200_000, b'{"a":' * 200_000, b"\xff\xfe", b'{"expires_in": NaN}', b"1" * 5000],
    )
    def test_hostile_bodies_are_transient_errors(self, body: bytes) -> None:
        """Deep nesting, bad encodings, NaN and huge integers are refused, never raised."""
        with pytest.raises(TransientGrantError):
            parse(httpx.Response(200, content=body))

    @pytest.mark.parametrize("value", [10**400, 1e400, float("inf"), -1, "9" * 300_000, [], {}])
    def test_absurd_expires_in_is_refused_briefly(self, value: object) -> None:
        """A 300 KB expires_in is refused with a short message (it ends up in last_error)."""
        content = json.dumps({"access_token": "at", "expires_in": value}).encode()
        with pytest.raises(TransientGrantError) as caught:
            parse(httpx.Response(200, content=content))
        assert len(caught.value.message) < 200

    def test_control_characters_never_reach_a_message(self) -> None:
        """NUL, escapes and newlines in a provider's text are gone, and it is bounded."""
        description = "bad\x00thing\x1b[31m\nforged: line\u202e" + "x" * 10_000
        response = httpx.Response(
            400, json={"error": "invalid_grant\x00", "error_description": description}
        )
        with pytest.raises(GrantError) as caught:
            parse(response)
        text = caught.value.message + (caught.value.oauth_error or "")
        assert not any(ord(c) < 32 or c == "\u202e" for c in text)
        assert len(caught.value.message) < 500

    @settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
    @given(
        status=st.integers(100, 599),
        body=st.one_of(
            st.binary(max_size=300),
            st.recursive(
                st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text()),
                lambda c: (
                    st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=20), c, max_size=4)
                ),
            ).map(lambda v: json.dumps(v).encode()),
            st.fixed_dictionaries(
                {},
                optional={
                    k: st.one_of(
                        st.none(), st.integers(), st.floats(), st.text(), st.lists(st.text())
                    )
                    for k in (
                        "access_token",
                        "expires_in",
                        "token_type",
                        "refresh_token",
                        "error",
                        "error_description",
                        "device_code",
                        "user_code",
                        "verification_uri",
                        "interval",
                        "issuer",
                        "token_endpoint",
                    )
                },
            ).map(lambda v: json.dumps(v).encode()),
        ),
    )
    def test_any_answer_is_tokens_or_a_grant_error(self, status: int, body: bytes) -> None:
        """Every parser of provider answers returns or raises a GrantError: nothing else."""
        response = httpx.Response(status, content=body)
        for parser in (
            lambda: parse(response),
            lambda: authorize.parse_device_authorization(response, now=T0, account="work"),
            lambda: authorize.parse_device_poll(response, now=T0, account="work"),
            lambda: discovery.parse_metadata(
                response, url="https://i.test/x", issuer="https://i.test"
            ),
        ):
            try:
                result = parser()
            except GrantError as exc:
                message = exc.message
            else:
                message = ""
                if isinstance(result, oauth.TokenSet):
                    assert provider_input.is_b64token(result.access_token.reveal())
            assert not any(ord(c) < 32 for c in message)
            assert len(message) <= provider_input.MAX_MESSAGE

    @pytest.mark.parametrize(
        "header", ["99999999999999999999", "9" * 5000, "Fri, 31 Dec 9999 23:59:59 GMT", "-1"]
    )
    def test_absurd_retry_after_is_bounded(self, header: str) -> None:
        """A Retry-After of 10**20 s or the year 9999 never overflows the scheduler's dates."""
        response = httpx.Response(503, headers={"Retry-After": header})
        with pytest.raises(TransientGrantError) as caught:
            parse(response)
        wait = caught.value.retry_after
        assert wait is None or 0 <= wait <= oauth.MAX_RETRY_AFTER
        T0 + timedelta(seconds=wait or 0)  # what the scheduler does with it

    def test_device_interval_is_bounded(self) -> None:
        """An interval of 10**400 (or 1e400) becomes a sane one, never reaches trio.sleep."""
        for interval in ("1" + "0" * 400, "1e400", "-1"):
            body = (
                '{"device_code":"dc","user_code":"UC","verification_uri":"https://x.test",'
                f'"expires_in":600,"interval":{interval}}}'
            )
            try:
                grant = authorize.parse_device_authorization(
                    httpx.Response(200, content=body.encode()), now=T0, account="work"
                )
            except TransientGrantError:
                continue
            assert 1 <= grant.interval <= authorize.MAX_DEVICE_INTERVAL

    async def test_bodies_are_capped_while_streaming(self, dev: DevProvider) -> None:
        """A 300 MB answer is cut off at 1 MiB: a transient error, memory bounded."""
        dev.hostile.add("/token", HostileAnswer(body=b'{"a":"', filler=b"x", size=300 << 20))
        request = oauth.refresh_request(
            oauth.Client(token_endpoint=dev.url + "/token", client_id="demo-client"), Secret("rt")
        )
        async with httpx.AsyncClient() as http:
            with pytest.raises(TransientGrantError, match="larger than"):
                await provider_http.send(http, request)
        assert dev.hostile.bytes_sent < 64 << 20


class TestFaultsAtStartAndInTasks:
    @pytest.mark.integration
    async def test_nul_in_a_stored_error_does_not_stop_the_start(
        self, clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path
    ) -> None:
        """A state file of an older version with a NUL in last_error: the daemon starts,
        and the notify_command gets the text without it."""
        record = tmp_path / "env.json"
        script = tmp_path / "rec.py"
        script.write_text(
            "import json, os, sys\njson.dump(dict(os.environ), open(sys.argv[1], 'w'))\n"
        )
        argv = json.dumps([sys.executable, str(script), str(record)])
        cfg = make_config(tmp_path, dev, daemon_keys=f"{FAST}\nnotify_command = {argv}")
        store = TokenStore(tmp_path / "state")
        store.open()
        store.save(
            state.AccountState(
                account="work",
                status=state.NEEDS_AUTHORIZATION,
                refresh_token=Secret("rt-old"),
                last_error="invalid_grant: \x00bad\x1b]0;title\x07",
                failures=1,
            )
        )
        store.close()
        async with in_process_daemon(cfg, now=mock_now(clock)) as d:
            await eventually(record.exists)
            await eventually(lambda: record.stat().st_size > 0)
            assert "work" in d.scheduler.names
        env = json.loads(record.read_text())
        assert "\x00" not in env["MAILOAUTHD_MESSAGE"]
        assert "bad" in env["MAILOAUTHD_MESSAGE"]


# --- section 2: a grant is never lost, a dead one never retried forever ---------------------


class TestGrantsKept:
    async def test_refresh_token_of_a_refused_answer_is_kept(
        self, clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path
    ) -> None:
        """A 200 with a new refresh token but an unusable expires_in: the token is stored
        before the answer is refused, and the next refresh uses it."""
        dev.set_options(refresh_token_rotation="strict")
        cfg = make_config(tmp_path, dev, daemon_keys=FAST)
        seed(tmp_path, dev)
        rotated = dev.issue_refresh_token(USER)
        for bad in (0, -5, 10**12):
            dev.hostile.add(
                "/token",
                answer(access_token="at-x", refresh_token=rotated, expires_in=bad),  # type: ignore[arg-type]
            )
        async with in_process_daemon(cfg, now=mock_now(clock)) as d:
            for _ in range(3):
                with pytest.raises(TransientGrantError):
                    await d.scheduler.refresh("work")
                assert stored(tmp_path).refresh_token == Secret(rotated)
            dev.hostile.clear()

    async def test_refresh_token_of_a_refused_answer_is_kept_on_any_refusal(
        self, clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path
    ) -> None:
        """An unexpected token_type (a Misconfigured) does not drop the new refresh token."""
        cfg = make_config(tmp_path, dev, daemon_keys=FAST)
        seed(tmp_path, dev)
        dev.hostile.add(
            "/token", answer(access_token="at", refresh_token="rt-new", token_type="mac")
        )
        async with in_process_daemon(cfg, now=mock_now(clock)) as d:
            with pytest.raises(Misconfigured):
                await d.scheduler.refresh("work")
        assert stored(tmp_path).refresh_token == Secret("rt-new")

    async def test_sign_in_without_refresh_token_keeps_the_held_one(
        self, clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path
    ) -> None:
        """RFC 6749 §6: a second sign-in whose answer has no refresh token keeps the old."""
        cfg = make_config(tmp_path, dev, daemon_keys=FAST)
        held = seed(tmp_path, dev)
        tokens = oauth.TokenSet(
            access_token=Secret("at-signed-in"),
            token_type="Bearer",  # noqa: S106
            expires_at=T0 + timedelta(hours=1),
            refresh_token=None,
            scopes=("mail",),
        )
        async with in_process_daemon(cfg, now=mock_now(clock)) as d:
            await d.scheduler.authorized("work", tokens)
        on_disk = stored(tmp_path)
        assert on_disk.refresh_token == Secret(held)
        assert on_disk.access_token == Secret("at-signed-in")

    @pytest.mark.parametrize(
        ("token", "expected"), [("jwt", 20.0), ("opaque", 300.0)], ids=["jwt-exp", "default"]
    )
    async def test_missing_expires_in(
        self,
        clock: trio.testing.MockClock,
        dev: DevProvider,
        tmp_path: Path,
        token: str,
        expected: float,
    ) -> None:
        """No expires_in: the JWT's exp, else the profile's default_expires_in; never an hour."""
        cfg = make_config(
            tmp_path, dev, daemon_keys=FAST, provider_keys='default_expires_in = "5m"'
        )
        seed(tmp_path, dev)
        access = jwt({"exp": int(T0.timestamp()) + 20}) if token == "jwt" else "opaque-at"
        dev.hostile.add("/token", answer(access_token=access, token_type="Bearer"))
        async with in_process_daemon(cfg, now=mock_now(clock)) as d:
            st = await d.scheduler.refresh("work")
        assert st.expires_at is not None
        assert (st.expires_at - T0).total_seconds() == pytest.approx(expected, abs=2)


class TestDeadGrants:
    async def test_bare_4xx_is_confirmed_once_then_needs_authorization(
        self, clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path
    ) -> None:
        """An empty 400 is retried once after a short pause; again, and the grant is dead."""
        cfg = make_config(tmp_path, dev, daemon_keys=FAST)
        seed(tmp_path, dev, expires_in=30)
        dev.hostile.add("/token", *[HostileAnswer(status=400) for _ in range(10)])
        async with in_process_daemon(cfg, now=mock_now(clock)) as d:
            await quiet(d.scheduler)
            assert stored(tmp_path).status == state.FAILING
            assert dev.hostile.served == 1
            for _ in range(10):  # small steps: never past request_timeout mid-request
                clock.jump(10)
                await quiet(d.scheduler)
            assert stored(tmp_path).status == state.NEEDS_AUTHORIZATION
            for _ in range(20):
                clock.jump(10)
                await quiet(d.scheduler)
            assert dev.hostile.served == 2

    async def test_bare_401_for_an_app_only_account_is_a_misconfiguration(
        self, clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path
    ) -> None:
        """client_credentials has no grant to lose: a confirmed bare 401 is our client's fault."""
        cfg = make_config(
            tmp_path, dev, daemon_keys=FAST, account_keys='flow = "client_credentials"'
        )
        dev.hostile.add("/token", *[HostileAnswer(status=401) for _ in range(10)])
        path = tmp_path / "state" / "work.toml"
        async with in_process_daemon(cfg, now=mock_now(clock)) as d:
            await quiet(d.scheduler)
            assert path.exists()
            assert stored(tmp_path).status == state.FAILING
            for _ in range(10):
                clock.jump(10)
                await quiet(d.scheduler)
            assert stored(tmp_path).status == state.MISCONFIGURED
            assert dev.hostile.served == 2

    async def test_unknown_error_code_in_a_200_is_final(
        self, clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path
    ) -> None:
        """A 200 carrying {"error": "invalid_code"} is a refusal: not retried forever."""
        cfg = make_config(tmp_path, dev, daemon_keys=FAST)
        seed(tmp_path, dev, expires_in=30)
        dev.hostile.add("/token", *[answer(error="invalid_code") for _ in range(10)])
        async with in_process_daemon(cfg, now=mock_now(clock)) as d:
            await quiet(d.scheduler)
            assert stored(tmp_path).status == state.NEEDS_AUTHORIZATION
            for _ in range(20):
                clock.jump(10)
                await quiet(d.scheduler)
            assert dev.hostile.served == 1

    async def test_on_demand_refreshes_are_limited(
        self, clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path
    ) -> None:
        """
        Eight requests for more validity than tokens have: one refresh, not eight; and
        when the token has less left than it should (the wall clock jumped ahead), no
        second one within the gap however many ask.
        """
        dev.set_options(access_token_lifetime=100)
        cfg = make_config(
            tmp_path,
            dev,
            daemon_keys=FAST,
            account_keys='refresh_before = "2s"\nmin_validity = "1s"',
        )
        seed(tmp_path, dev, expires_in=5)
        ahead = [0.0]  # seconds the wall clock is ahead of trio's

        def now() -> datetime:
            return T0 + timedelta(seconds=clock.current_time() + ahead[0])

        async with in_process_daemon(cfg, now=now) as d:
            await quiet(d.scheduler)
            before = refreshes(dev)
            assert before == 0
            for _ in range(8):
                await d.scheduler.token("work", 3600, trio.current_time() + 15)
            assert refreshes(dev) == before + 1
            ahead[0] = 55  # 45 s left; 50 s wanted (the cap), the last refresh just now
            for _ in range(8):
                with pytest.raises(TransientGrantError, match="refreshed on demand"):
                    await d.scheduler.token("work", 3600, trio.current_time() + 15)
            assert refreshes(dev) == before + 1
            ahead[0] = 0
            clock.jump(51)  # 49 s left, past half the tokens' lifetime since: one more
            for _ in range(8):
                await d.scheduler.token("work", 3600, trio.current_time() + 15)
            assert refreshes(dev) == before + 2

    async def test_short_lived_tokens_are_refreshed_as_often_as_requests_need(
        self, clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path
    ) -> None:
        """
        8 s tokens, wanted for 2.5 s, checked every 3 s: between the scheduled refreshes,
        requests need one every few seconds, and get it (the minute-long gap refused them).
        """
        dev.set_options(access_token_lifetime=8)
        cfg = make_config(
            tmp_path,
            dev,
            daemon_keys='refresh_interval = "3s"\nrefresh_spread = "0s"',
            account_keys='refresh_before = "3s"\nmin_validity = "1s"',
        )
        seed(tmp_path, dev, expires_in=8)
        async with in_process_daemon(cfg, now=mock_now(clock)) as d:
            # Requests every 0.7 s: the check runs at the first request after it is due,
            # so its phase drifts against the tokens', as a refresh's latency makes it do.
            for _ in range(60):
                clock.jump(0.7)
                await quiet(d.scheduler)
                st = await d.scheduler.token("work", 2.5, trio.current_time() + 15)
                assert st.valid_for(mock_now(clock)()) >= 2.5
            assert refreshes(dev) >= 6

    def test_aadsts50196_is_a_throttle(self) -> None:
        """Microsoft's loop detection is waited out, not taken as 'sign in again'."""
        response = httpx.Response(
            400, json={"error": "invalid_grant", "error_description": "AADSTS50196: loop"}
        )
        with pytest.raises(TransientGrantError) as caught:
            parse(response)
        assert caught.value.retry_after is not None
        assert caught.value.retry_after >= oauth.THROTTLE_SECONDS


class TestDeviceFlowAnswers:
    @pytest.mark.parametrize(
        ("status", "error"),
        [(403, "org_internal"), (400, "admin_policy_enforced"), (400, "invalid_grant")],
    )
    def test_poll_stops_at_other_errors(self, status: int, error: str) -> None:
        """RFC 8628 §3.5: only authorization_pending and slow_down mean 'poll again'."""
        response = httpx.Response(
            status, json={"error": error, "error_description": "Access blocked: org only"}
        )
        with pytest.raises(AuthorizationFailed) as caught:
            authorize.parse_device_poll(response, now=T0, account="work")
        assert "Access blocked" in caught.value.message
        assert caught.value.message.startswith("work:")

    def test_microsoft_200_with_error_shows_the_aadsts_text(self) -> None:
        """Microsoft's device endpoint answers some refusals with 200: show its words."""
        response = httpx.Response(
            200,
            json={
                "error": "invalid_client",
                "error_description": "AADSTS7000218: The request body must contain client_secret",
            },
        )
        with pytest.raises(GrantError) as caught:
            authorize.parse_device_authorization(response, now=T0, account="work")
        assert "AADSTS7000218" in caught.value.message
        assert "lacks device_code" not in caught.value.message


# --- section 3: tokens are b64tokens ----------------------------------------------------


class TestTokensChecked:
    @pytest.mark.parametrize("field", ["access_token", "refresh_token"], ids=["access", "refresh"])
    @pytest.mark.parametrize(
        "bad", [BAD_TOKEN, "tok en", "tök", "a\x00b", "=abc", "x" * 20_000], ids=range(6)
    )
    def test_only_b64tokens(self, field: str, bad: str) -> None:
        """Anything but RFC 6750 b64token characters is refused, and never printed."""
        body = {"access_token": "at-good", "refresh_token": "rt-good", "expires_in": 3600}
        body[field] = bad
        with pytest.raises(TransientGrantError) as caught:
            parse(httpx.Response(200, json=body))
        assert bad[:8] not in str(caught.value)
        assert "not shown" in caught.value.message

    @given(st.from_regex(r"[A-Za-z0-9\-._~+/]+=*", fullmatch=True).filter(lambda t: len(t) < 1000))
    def test_every_b64token_is_accepted(self, token: str) -> None:
        tokens = parse(httpx.Response(200, json={"access_token": token, "expires_in": 60}))
        assert tokens.access_token.reveal() == token

    async def test_bad_access_token_is_never_stored_nor_shown(
        self, clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path
    ) -> None:
        cfg = make_config(tmp_path, dev, daemon_keys=FAST)
        seed(tmp_path, dev)
        dev.hostile.add("/token", answer(access_token=BAD_TOKEN, expires_in=3600))
        async with in_process_daemon(cfg, now=mock_now(clock)) as d:
            with pytest.raises(TransientGrantError):
                await d.scheduler.refresh("work")
            rows = json.dumps(d.scheduler.status())
        assert "file:///" not in rows
        assert "file:///" not in (tmp_path / "state" / "work.toml").read_text()


# --- section 4: everything stored is bounded ---------------------------------------------


class TestBounded:
    async def test_huge_expires_in_does_not_reach_last_error(
        self, clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path
    ) -> None:
        """A 300 KB expires_in string: last_error stays short, status works."""
        cfg = make_config(tmp_path, dev, daemon_keys=FAST)
        seed(tmp_path, dev)
        dev.hostile.add("/token", answer(access_token="at", expires_in="9" * 300_000))
        async with in_process_daemon(cfg, now=mock_now(clock)) as d:
            with pytest.raises(TransientGrantError):
                await d.scheduler.refresh("work")
            row = d.scheduler.status()[0]
        assert isinstance(row["last_error"], str)
        assert len(row["last_error"]) < provider_input.MAX_MESSAGE
        assert len((tmp_path / "state" / "work.toml").read_bytes()) < 4096

    def test_stored_errors_are_bounded(self) -> None:
        """Whatever the message, what state.failed stores is one bounded line."""
        before = state.AccountState(account="work")
        after = state.failed(before, TransientGrantError("x\x00y\n" * 100_000), state.FAILING, T0)
        assert after.last_error is not None
        assert len(after.last_error) <= provider_input.MAX_MESSAGE
        assert "\x00" not in after.last_error


# --- what the helper says after a failed sign-in ------------------------------------------


class TestSignInMessages:
    def _config(self, tmp_path: Path, provider: DevProvider) -> Path:
        text = config_text(
            tmp_path,
            provider,
            provider_keys=f'device_authorization_endpoint = "{provider.url}/device_authorization"',
        )
        path = tmp_path / "config.toml"
        path.write_text(text)
        return path

    def test_failing_provider_is_not_said_to_be_retried(
        self, provider: DevProvider, tmp_path: Path, start_daemon: Any
    ) -> None:
        """A failing device endpoint: exit 5, the account named, no 'keeps retrying'."""
        d = start_daemon(self._config(tmp_path, provider))
        provider.hostile.add("/device_authorization", HostileAnswer(status=503))
        run = helper("authorize", "work", "--flow", "device_code", socket=d.socket)
        assert run.returncode == 5, run.stderr
        assert "work:" in run.stderr
        assert "keeps retrying" not in run.stderr

    def test_device_poll_stops_at_once_with_the_providers_words(
        self, provider: DevProvider, tmp_path: Path, start_daemon: Any
    ) -> None:
        """Google's 403 org_internal ends the device sign-in at the first poll."""
        provider.set_options(device_interval=1)
        d = start_daemon(self._config(tmp_path, provider))
        provider.hostile.add(
            "/token",
            answer(403, error="org_internal", error_description="Access blocked: org only"),
            *[answer(400, error="authorization_pending") for _ in range(5)],
        )
        started = time.monotonic()
        run = helper("authorize", "work", "--flow", "device_code", socket=d.socket)
        assert run.returncode == 1, run.stderr
        assert "Access blocked: org only" in run.stderr
        assert "work:" in run.stderr
        assert provider.hostile.pending("/token") == 5
        assert time.monotonic() - started < 15


# --- check-config: providers' rules a configuration can break ------------------------------


def _parse(text: str) -> config.Config:
    return config.parse(text, source="c.toml", base_dir=Path("/"))


def _problems(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        _parse(text)
    return str(caught.value)


GOOGLE = '[providers.g]\npreset = "google"\nclient_id = "x.apps.googleusercontent.com"\n'
ACCOUNT = '\n[accounts.a]\nprovider = "{p}"\nusername = "a@example.com"\n'


class TestCheckConfig:
    def test_google_without_client_secret(self) -> None:
        parsed = _parse(GOOGLE + ACCOUNT.format(p="g"))
        assert any("client_secret_file" in w and "Google" in w for w in parsed.warnings)
        with_secret = _parse(GOOGLE + 'client_secret_file = "/s"\n' + ACCOUNT.format(p="g"))
        assert not any("Google's token endpoint" in w for w in with_secret.warnings)

    def test_google_device_flow_with_the_gmail_scope(self) -> None:
        text = GOOGLE + 'client_secret_file = "/s"\n' + ACCOUNT.format(p="g")
        assert "Google refuses mail scopes" in _problems(text + 'flow = "device_code"\n')
        _parse(text + 'flow = "device_code"\nscopes = ["openid", "email"]\n')

    def test_microsoft_scopes_of_two_resources(self) -> None:
        text = '[providers.m]\npreset = "microsoft"\nclient_id = "id"\n' + ACCOUNT.format(p="m")
        _parse(text)  # the preset's scopes: one resource
        mixed = (
            'scopes = ["https://outlook.office.com/IMAP.AccessAsUser.All", "Mail.Read", '
            '"offline_access"]\n'
        )
        assert "span 2 resources" in _problems(text + mixed)


class TestWarnings:
    async def test_google_refresh_token_expires_in_is_recorded_and_warned(
        self, clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path
    ) -> None:
        """refresh_token_expires_in is kept; status shows it, a warning comes a day before."""
        cfg = make_config(tmp_path, dev, daemon_keys=FAST)
        seed(tmp_path, dev)
        two_days = 2 * 86400
        dev.hostile.add(
            "/token",
            answer(access_token="at-1", expires_in=3600, refresh_token_expires_in=two_days),
        )
        events: list[str] = []
        async with in_process_daemon(cfg, now=mock_now(clock)) as d:
            d.scheduler.on_event = lambda event, *_: events.append(event)
            await d.scheduler.refresh("work")
            row = d.scheduler.status()[0]
            assert row["refresh_token_expires_at"] == (T0 + timedelta(seconds=two_days)).isoformat()
            assert row["refresh_token_expiring"] is False
            assert stored(tmp_path).refresh_token_expires_at == T0 + timedelta(seconds=two_days)
            clock.jump(86400 + 60)
            d.scheduler.check(d.now())
            assert "refresh_token_expiring" in events
            assert d.scheduler.status()[0]["refresh_token_expiring"] is True

    async def test_lost_mail_scope_warns(
        self, clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path
    ) -> None:
        """A refresh answer without the mail scope: an event, and a warning in status."""
        cfg = make_config(
            tmp_path, dev, daemon_keys=FAST, account_keys='scopes = ["mail", "openid"]'
        )
        seed(tmp_path, dev)
        dev.hostile.add("/token", answer(access_token="at-1", expires_in=3600, scope="mail openid"))
        dev.hostile.add("/token", answer(access_token="at-2", expires_in=3600, scope="openid"))
        events: list[tuple[str, str]] = []
        async with in_process_daemon(cfg, now=mock_now(clock)) as d:
            d.scheduler.on_event = lambda event, _account, message, _action: events.append(
                (event, message)
            )
            await d.scheduler.refresh("work")
            assert d.scheduler.status()[0]["scope_warning"] is None
            await d.scheduler.refresh("work")
            warning = d.scheduler.status()[0]["scope_warning"]
        assert isinstance(warning, str)
        assert "mail" in warning
        assert [e for e, _ in events if e == "scope_lost"] == ["scope_lost"]

    def test_lost_mail_scopes(self) -> None:
        """Scopes compare by their last part: Microsoft answers with or without the resource."""
        configured = ("https://outlook.office.com/IMAP.AccessAsUser.All", "offline_access")
        assert attempt.lost_mail_scopes(configured, (), ("IMAP.AccessAsUser.All",)) == []
        assert attempt.lost_mail_scopes(configured, (), ("openid",)) == [configured[0]]
        held = ("https://mail.google.com/",)
        assert attempt.lost_mail_scopes(held, held, ("https://mail.google.com/",)) == []
        assert attempt.lost_mail_scopes(held, ("email",), ("email",)) == []


class TestSignInKeepsTheGrant:
    def test_device_sign_in_without_refresh_token_keeps_and_says_so(
        self, provider: DevProvider, tmp_path: Path, start_daemon: Any
    ) -> None:
        """The real helper: a sign-in answered without refresh token keeps the held one."""
        provider.set_options(device_interval=1)
        seed(tmp_path, provider)
        d = start_daemon(TestSignInMessages()._config(tmp_path, provider))
        assert helper("refresh", "work", socket=d.socket).returncode == 0
        held = stored(tmp_path).refresh_token
        assert held is not None
        provider.hostile.add("/token", answer(access_token="at-signed-in", expires_in=3600))
        run = helper("authorize", "work", "--flow", "device_code", socket=d.socket)
        assert run.returncode == 0, run.stderr
        assert "kept" in run.stdout + run.stderr
        assert stored(tmp_path).refresh_token == held
        assert stored(tmp_path).access_token == Secret("at-signed-in")

    def test_import_refuses_what_is_no_token(
        self, provider: DevProvider, tmp_path: Path, start_daemon: Any
    ) -> None:
        """`import` takes only a b64token, and never echoes what it refused."""
        d = start_daemon(TestSignInMessages()._config(tmp_path, provider))
        run = helper("import", "work", socket=d.socket, stdin='rt"secret-ish\\x\n')
        assert run.returncode == 2, run.stderr
        assert "secret-ish" not in run.stderr
        assert "RFC 6750" in run.stderr
        assert not (tmp_path / "state" / "work.toml").exists()


@settings(max_examples=300, deadline=None)
@given(
    lifetime=st.floats(1.0, 7200.0),
    asked=st.floats(0.0, 10_000.0),
    elapsed=st.floats(0.0, 1.0),
)
def test_a_request_within_the_cap_never_meets_the_on_demand_gap(
    lifetime: float, asked: float, elapsed: float
) -> None:
    """
    Whatever the tokens' lifetime: a request whose min_validity (capped) the token no
    longer has may start a refresh, however recently a request started the last one,
    so long as that refresh got this token. Only a token with less left than its age
    allows (a wall clock that jumped) meets the gap.
    """
    account = config.Account(
        name="work", provider=config.Provider(name="p", client_id="c", token_endpoint="http://x/")
    )
    issued = T0
    slot = ondemand.Slot(
        account=account,
        state=state.AccountState(
            account="work",
            status=state.OK,
            access_token=Secret("at"),
            expires_at=issued + timedelta(seconds=lifetime),
            last_refresh=issued,
        ),
    )
    wanted = ondemand._capped(slot, asked)
    age = elapsed * lifetime  # since that refresh got this token
    now = issued + timedelta(seconds=age)
    if slot.state.valid_for(now) > wanted - 0.01:
        return  # the token still has what is wanted: no refresh to start

    async def held_back() -> None:
        slot.last_on_demand = trio.current_time() - age
        assert ondemand._held_back(slot, now, wanted) is None

    trio.run(held_back, clock=trio.testing.MockClock())
