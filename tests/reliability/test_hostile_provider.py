"""
A hostile provider: the development provider's hostile mode (mailoauthd/testing/hostile.py)
answers the token, device authorization, discovery and revocation endpoints with
Hypothesis-generated responses (any status, any JSON shape and nesting, huge and
non-finite numbers, control characters, wrong types, bodies streamed up to hundreds
of MB). The real daemon, as a subprocess, must never exit, stay within a bounded
amount of memory, keep serving the token it holds, and keep `status` well-formed.
"""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mailoauthd.testing import DevProvider, HostileAnswer

from .support import (
    Daemon,
    Figures,
    ask,
    memory_and_fds,
    new_provider,
    seed_accounts,
    size,
    write_config,
)

EXAMPLES_TEST, EXAMPLES_SOAK = 150, 1500
EXAMPLES = size(EXAMPLES_TEST, EXAMPLES_SOAK)
# Bodies streamed after the generated part: the daemon reads at most 1 MiB of them.
STREAM_TEST, STREAM_SOAK = 8 << 20, 400 << 20
STREAM = size(STREAM_TEST, STREAM_SOAK)
# The daemon's resident memory may not grow past this, whatever it was sent.
RSS_LIMIT_KIB = 200 * 1024
SECTION = "hostile provider"

# Keys honest answers have, so that generated objects look enough like one to go deep.
KEYS = (
    "access_token",
    "token_type",
    "expires_in",
    "refresh_token",
    "refresh_token_expires_in",
    "scope",
    "id_token",
    "error",
    "error_description",
    "device_code",
    "user_code",
    "verification_uri",
    "verification_uri_complete",
    "interval",
    "message",
    "issuer",
    "token_endpoint",
    "revocation_endpoint",
    "device_authorization_endpoint",
    "authorization_endpoint",
)
ERRORS = (
    "invalid_grant",
    "invalid_request",
    "invalid_client",
    "temporarily_unavailable",
    "authorization_pending",
    "slow_down",
    "access_denied",
    "expired_token",
    "org_internal",
    "invalid_code",
)
WEIRD_TEXT = st.text(
    st.characters(codec="utf-8", categories=("Cc", "Cf", "Zs", "Zl", "Lu", "Nd", "Po", "So")),
    max_size=60,
)
NUMBERS = st.one_of(
    st.integers(),
    st.sampled_from([0, -1, 1, 2**63, 10**400, -(10**400), 10**4000]),
    st.floats(allow_nan=True, allow_infinity=True),
)
SCALARS = st.one_of(
    st.none(), st.booleans(), NUMBERS, WEIRD_TEXT, st.sampled_from(ERRORS), st.just("x" * 300_000)
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS), inner, max_size=6)
    ),
    max_leaves=12,
)
TOKENISH = st.fixed_dictionaries(
    {},
    optional={key: st.one_of(JSON, st.text("abcXYZ019-._~+/=", min_size=1)) for key in KEYS},
)


def _dumps(value: object) -> bytes:
    try:
        return json.dumps(value).encode()
    except ValueError:  # an int too long to print: its digits by hand
        return b"1" * 5000


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["object", "json", "nested", "bytes", "empty", "numbers"]))
    if kind == "object":
        return _dumps(draw(TOKENISH))
    if kind == "json":
        return _dumps(draw(JSON))
    if kind == "nested":
        depth = draw(st.sampled_from([500, 5000, 200_000]))
        opener = draw(st.sampled_from([b"[", b'{"error":']))
        return opener * depth
    if kind == "numbers":
        key = draw(st.sampled_from(["expires_in", "interval"]))
        number = draw(st.sampled_from([b"1e400", b"-1e400", b"NaN", b"Infinity", b"1" * 400]))
        return (
            b'{"access_token":"at","device_code":"dc","user_code":"U","verification_uri":"https://x","expires_in":600,"%s":%s}'
            % (  # noqa: E501
                key.encode(),
                number,
            )
        )
    if kind == "empty":
        return b""
    return draw(st.binary(max_size=512))


@st.composite
def answers(draw: st.DrawFn) -> HostileAnswer:
    status = draw(
        st.one_of(st.sampled_from([200, 200, 400, 401, 403, 429, 500, 503]), st.integers(200, 599))
    )
    content_type = draw(
        st.sampled_from(["application/json", "text/html", "application/json; charset=utf-16", ""])
    )
    headers = (("Content-Type", content_type),) if content_type else ()
    if draw(st.booleans()):
        retry = draw(st.sampled_from(["0", "1", "99999999999999999999", "Wed, 21 Oct 2015", "-5"]))
        headers += (("Retry-After", retry),)
    body = draw(bodies())
    streamed = draw(st.sampled_from([0, 0, 0, 2 << 20, STREAM]))
    declared = draw(st.sampled_from([None, None, len(body), 10**12]))
    return HostileAnswer(
        status=status,
        headers=headers,
        body=body,
        filler=b" " if streamed else b"",
        size=streamed,
        content_length=declared if not streamed else None,
    )


DEVICE_ANSWER = (
    b'{"device_code":"dc","user_code":"UC","verification_uri":"https://x.test/d",'
    b'"expires_in":600,"interval":%s}'
)


@dataclass
class Target:
    daemon: Daemon
    provider: DevProvider
    socket: Path
    held: str  # the access token of account "held", which must keep being served


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    """One daemon; "held" keeps its token; "victim" is refreshed against hostile answers,
    "device" signs in by device code, "gone" is revoked; "disc" discovers its endpoints."""
    base = Path(tempfile.mkdtemp(prefix="mailoauthd-hostile-provider-"))
    provider, client_secret = new_provider(refresh_token_rotation="none")
    daemon = None
    try:
        config = write_config(
            base,
            provider,
            client_secret,
            accounts=("held", "victim", "gone"),
            account_keys='refresh_before = "2m"\nmin_validity = "30s"',
            # Provider text reaches a child process's environment (a NUL once ended us).
            daemon_keys='notify_command = ["/bin/true"]',
            provider_keys=(
                f'device_authorization_endpoint = "{provider.url}/device_authorization"'
            ),
        )
        text = config.read_text() + (
            f'\n[providers.disc]\nclient_id = "demo-client"\nissuer = "{provider.url}"\n'
            f'client_secret_file = "{base / "client-secret"}"\n'
            '\n[accounts.disc]\nprovider = "disc"\nusername = "alice@example.com"\n'
            '\n[accounts.device]\nprovider = "dev"\nusername = "alice@example.com"\n'
            'flow = "device_code"\n'
        )
        config.write_text(text)
        seed_accounts(base, provider, ("held", "victim", "gone", "disc"))
        # Discovery fails at start, so that every later use fetches it again.
        for path in _DISCOVERY:
            provider.hostile.add(path, HostileAnswer(status=503))
        daemon = Daemon(config, base / "run" / "socket", base / "daemon.log")
        daemon.wait_ready()
        deadline = time.monotonic() + 15
        while daemon.status()["held"]["status"] != "ok":
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.02)
        held = ask(daemon.socket, {"v": 1, "op": "token", "account": "held"})
        assert held.get("ok"), held
        provider.hostile.clear()
        yield Target(daemon, provider, daemon.socket, str(held["token"]))
        assert daemon.stop() == 0
    finally:
        if daemon is not None:
            daemon.kill()
        provider.stop()
        shutil.rmtree(base, ignore_errors=True)


_DISCOVERY = ("/.well-known/openid-configuration", "/.well-known/oauth-authorization-server")


def _sign_in_by_device(path: Path) -> None:
    """Start a device sign-in and read what the daemon says for a moment, then hang up."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        request = {"v": 1, "op": "authorize", "account": "device", "flow": "device_code"}
        sock.sendall(json.dumps(request).encode() + b"\n")
        deadline = time.monotonic() + 3
        try:
            while time.monotonic() < deadline and sock.recv(65536):
                pass
        except TimeoutError:
            pass


def _check(target: Target, figures: Figures) -> None:
    """The daemon lives, holds its memory bounded, serves "held", answers status sanely."""
    assert target.daemon.proc.poll() is None, target.daemon.log()[-3000:]
    rss, _ = memory_and_fds(target.daemon.pid)
    figures.peak(SECTION, "largest resident memory of the daemon (MiB)", round(rss / 1024, 1))
    assert rss < RSS_LIMIT_KIB, f"resident memory {rss} KiB"
    reply = ask(target.socket, {"v": 1, "op": "token", "account": "held"})
    assert reply.get("ok"), reply
    assert reply.get("token") == target.held
    status = ask(target.socket, {"v": 1, "op": "status"})
    assert status.get("ok"), status
    for row in status["accounts"]:  # type: ignore[union-attr]
        for key in ("last_error", "hint"):
            value = row.get(key)
            if isinstance(value, str):
                assert len(value) <= 1200, (key, len(value))
                assert not any(ord(c) < 32 or c == "\x7f" for c in value), (key, value[:200])


class TestHostileProvider:
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    @given(
        endpoint=st.sampled_from(["token", "device", "discovery", "revocation"]),
        script=st.lists(answers(), min_size=1, max_size=3),
    )
    # What ended the daemon before issue #10, always tried first.
    @example(endpoint="token", script=[HostileAnswer(body=b"[" * 200_000)])
    @example(endpoint="discovery", script=[HostileAnswer(body=b"[" * 200_000)])
    @example(endpoint="device", script=[HostileAnswer(body=DEVICE_ANSWER % (b"1" + b"0" * 400))])
    @example(endpoint="device", script=[HostileAnswer(body=DEVICE_ANSWER % b"1e400")])
    @example(
        endpoint="token",
        script=[
            HostileAnswer(400, body=b'{"error":"invalid_grant","error_description":"a\\u0000b"}')
        ],
    )
    def test_daemon_survives_and_keeps_serving(
        self, target: Target, figures: Figures, endpoint: str, script: list[HostileAnswer]
    ) -> None:
        """Whatever the provider answers, the daemon lives on and serves the token it holds."""
        hostile = target.provider.hostile
        before, served = hostile.bytes_sent, hostile.served
        try:
            if endpoint == "token":
                hostile.add("/token", *script)
                reply = ask(target.socket, {"v": 1, "op": "refresh", "account": "victim"})
                assert "ok" in reply
            elif endpoint == "device":
                hostile.add("/device_authorization", *script[:1])
                hostile.add("/token", *script[1:])
                _sign_in_by_device(target.socket)
            elif endpoint == "discovery":
                hostile.add(_DISCOVERY[0], *script[:1])
                hostile.add(_DISCOVERY[1], *script[1:2], HostileAnswer(status=503))
                reply = ask(target.socket, {"v": 1, "op": "refresh", "account": "disc"})
                assert "ok" in reply
            else:
                hostile.add("/revoke", *script[:1])
                reply = ask(target.socket, {"v": 1, "op": "revoke", "account": "gone"})
                assert "ok" in reply
                hostile.clear()
                grant = target.provider.issue_refresh_token("gone-alice@example.com")
                ask(
                    target.socket,
                    {"v": 1, "op": "import", "account": "gone", "refresh_token": grant},
                )
        finally:
            hostile.clear()
        _check(target, figures)
        figures.add(SECTION, f"generated answers queued at the {endpoint} endpoint", len(script))
        figures.add(SECTION, "attacks (Hypothesis examples)")
        figures.add(SECTION, "generated answers the daemon received", hostile.served - served)
        offered = max(a.size + len(a.body) for a in script)
        figures.peak(SECTION, "largest body offered to the daemon (MiB)", offered >> 20)
        figures.add(
            SECTION, "bytes the provider got to send (KiB)", (hostile.bytes_sent - before) >> 10
        )
        figures.held(SECTION, "the daemon never exited, whatever the provider answered")
        figures.held(SECTION, f"its resident memory stayed under {RSS_LIMIT_KIB // 1024} MiB")
        figures.held(SECTION, "the token it held was served after every answer")
        figures.held(SECTION, "`status` stayed well-formed: no control characters, bounded texts")
