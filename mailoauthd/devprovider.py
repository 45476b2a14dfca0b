"""
A development OAuth2 provider: a real HTTP server on 127.0.0.1, standard library only.

It speaks enough of RFC 6749 (authorization code, refresh token, client
credentials), RFC 7636 (PKCE, S256 only), RFC 8628 (device flow), RFC 7662
(introspection), RFC 7009 (revocation) and RFC 8414 (discovery) for
`mailoauthd demo`, for the test suite, and for Dovecot's token introspection in
the end-to-end suite. Tests drive it in-process through `DevProvider`; scripts
and subprocess tests use the `/admin/...` JSON endpoints, or the command line:

    python -m mailoauthd.devprovider --port 0

prints one JSON line with its URL and endpoints once it listens, then serves
until SIGTERM or SIGINT.

`add_fault` scripts the next requests on a path: HTTP errors, hangs, delays,
connection resets, HTML error pages, broken JSON. Expiry follows the injected
clock, so tests never sleep to expire a token.

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
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import html
import json
import re
import secrets
import signal
import socket
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote_plus, urlencode, urlsplit

from mailoauthd.devprovider_hostile import HostileAnswers

DEFAULT_CLIENTS: Mapping[str, str | None] = {"demo-client": "demo-secret", "public-client": None}
DEFAULT_USER = "demo@example.com"
DEFAULT_SCOPES = ("mail",)
ROTATIONS = ("none", "rotate", "strict")
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
GRANT_TYPES = ("authorization_code", "refresh_token", "client_credentials", DEVICE_GRANT)
# Fault kind -> the parameters it takes; anything else is a typo worth an error.
FAULT_KINDS: Mapping[str, frozenset[str]] = {
    "status": frozenset({"status", "body", "headers", "error", "error_description"}),
    "hang": frozenset({"seconds"}),
    "delay": frozenset({"seconds"}),
    "reset": frozenset(),
    "html": frozenset({"status"}),
    "malformed": frozenset(),
    "no_access_token": frozenset(),
}
CODE_LIFETIME = 600.0
MAX_BODY = 1 << 20
# RFC 8628 §6.1: no vowels (no words), no digits (no 0/O, 1/I confusion).
USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"
_STATUS_ERRORS = {401: "invalid_client", 403: "access_denied", 429: "temporarily_unavailable"}
_ERROR_PAGE = (
    b"<!DOCTYPE html><html><head><title>Service Unavailable</title></head>"
    b"<body><h1>Sorry, something went wrong.</h1><p>Please try again later.</p></body></html>"
)


@dataclass(frozen=True)
class RequestRecord:
    """One request as the provider saw it; `status` is 0 when no answer was sent."""

    time: float
    method: str
    path: str
    grant_type: str | None
    client_id: str | None
    status: int
    fault: str | None


@dataclass(frozen=True)
class Rotation:
    """One answered refresh: the refresh token used, the one issued (if any), the access token."""

    time: float
    used: str
    issued: str | None
    access_token: str


@dataclass(frozen=True)
class _Options:
    access_token_lifetime: float
    refresh_token_rotation: str
    access_token_length: int
    device_interval: int = 5
    device_expires_in: int = 600
    # "strict" only: how long a retired refresh token still works (0: not at all).
    refresh_token_reuse_interval: float = 0.0
    # None: opaque access tokens. Else JWTs (unsigned) with these claims, plus scp, upn,
    # iat and exp unless given: what Microsoft's look like to `mailoauth inspect`.
    access_token_claims: dict[str, Any] | None = None

    def check(self) -> None:
        if self.refresh_token_rotation not in ROTATIONS:
            raise ValueError(f"refresh_token_rotation must be one of {ROTATIONS}")
        if not self.access_token_lifetime >= 0:
            raise ValueError("access_token_lifetime must be >= 0")
        # Shorter tokens would be guessable, and could collide.
        if not isinstance(self.access_token_length, int) or self.access_token_length < 16:
            raise ValueError("access_token_length must be an integer >= 16")
        if not self.device_interval >= 0 or not self.device_expires_in > 0:
            raise ValueError("device_interval must be >= 0 and device_expires_in > 0")
        if not self.refresh_token_reuse_interval >= 0:
            raise ValueError("refresh_token_reuse_interval must be >= 0")
        if self.access_token_claims is not None and not isinstance(self.access_token_claims, dict):
            raise ValueError("access_token_claims must be an object, or null")


@dataclass(eq=False)
class _Grant:
    """One authorization by a user (or a client, for client_credentials)."""

    user: str
    client_id: str
    scopes: tuple[str, ...]
    revoked: bool = False


@dataclass(eq=False)
class _AccessToken:
    grant: _Grant
    scopes: tuple[str, ...]
    issued_at: float
    expires_at: float
    revoked: bool = False

    def active(self, now: float) -> bool:
        return not self.revoked and not self.grant.revoked and now < self.expires_at


@dataclass(eq=False)
class _AuthCode:
    grant: _Grant
    redirect_uri: str
    challenge: str | None
    nonce: str | None
    expires_at: float
    used: bool = False


@dataclass(eq=False)
class _Device:
    client_id: str
    scopes: tuple[str, ...]
    expires_at: float
    interval: int
    last_poll: float | None = None
    status: str = "pending"  # then "approved" or "denied"; "done" once tokens went out
    grant: _Grant | None = None


@dataclass(eq=False)
class _Fault:
    kind: str
    path: str
    remaining: int
    params: dict[str, Any]


@dataclass
class _Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


class _OAuthError(Exception):
    """An RFC 6749 §5.2 error answer."""

    def __init__(
        self, error: str, description: str, status: int = 400, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(description)
        self.error, self.description, self.status = error, description, status
        self.headers = headers or {}
        self.reason: str | None = None  # why a client was refused, for Microsoft's wording

    def response(self) -> _Response:
        body = {"error": self.error, "error_description": self.description}
        return _json(body, self.status, self.headers)


def _invalid_client(description: str, reason: str = "unknown_client") -> _OAuthError:
    # RFC 6749 §5.2: 401 with a challenge, so Basic-capable clients know to retry.
    error = _OAuthError(
        "invalid_client", description, 401, {"WWW-Authenticate": 'Basic realm="dev"'}
    )
    error.reason = reason
    return error


# Microsoft's answers (on /TENANT/oauth2/v2.0/... routes) where a client is refused:
# reason -> (status, error, AADSTS text), as login.microsoftonline.com words them.
_MICROSOFT_REFUSALS = {
    "unknown_client": (
        400,
        "unauthorized_client",
        "AADSTS700016: Application with identifier '{client}' was not found in the directory "
        "'{tenant}'. This can happen if the application has not been installed by the "
        "administrator of the tenant or consented to by any user in the tenant.",
    ),
    "wrong_secret": (
        401,
        "invalid_client",
        "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the "
        "request is the client secret value, not the client secret ID, for a secret added to "
        "app '{client}'.",
    ),
    "expired_secret": (
        401,
        "invalid_client",
        "AADSTS7000222: The provided client secret keys for app '{client}' are expired. Visit "
        "the Azure portal to create new keys for your app.",
    ),
    "unknown_tenant": (
        400,
        "invalid_request",
        "AADSTS90002: Tenant '{tenant}' not found. Check to make sure you have the correct "
        "tenant ID and are signing into the correct cloud.",
    ),
}
# Microsoft-shaped routes: /TENANT/oauth2/v2.0/token and the like.
_TENANT_ROUTE = re.compile(r"/([^/]+)/oauth2/v2\.0/(token|authorize|devicecode)")
_TENANT_PATHS = {
    "token": "/token",
    "authorize": "/authorize",
    "devicecode": "/device_authorization",
}
DEFAULT_TENANTS = ("common", "organizations", "consumers", "dev-tenant")


def _json(value: object, status: int = 200, headers: Mapping[str, str] | None = None) -> _Response:
    return _Response(status, json.dumps(value).encode(), "application/json", dict(headers or {}))


def _page(status: int, title: str, body_html: str) -> _Response:
    text = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"</head><body><h1>{html.escape(title)}</h1>{body_html}</body></html>"
    )
    return _Response(status, text.encode(), "text/html; charset=utf-8")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _scopes(value: str | None) -> tuple[str, ...]:
    return tuple(value.split()) if value else DEFAULT_SCOPES


def _normal_user_code(code: str) -> str:
    return "".join(c for c in code.upper() if c.isalnum())


def _is_loopback_redirect(uri: str) -> bool:
    parts = urlsplit(uri)
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        return False
    loopback = parts.hostname in ("127.0.0.1", "localhost", "::1")
    return parts.scheme == "http" and loopback and port_ok and not parts.fragment


class _Request:
    def __init__(self, method: str, target: str, headers: Message, body: bytes) -> None:
        split = urlsplit(target)
        self.method, self.path, self.headers, self.body = method, split.path, headers, body
        self.is_form = (
            method == "POST" and headers.get_content_type() == "application/x-www-form-urlencoded"
        )
        source = body.decode("utf-8", "replace") if self.is_form else split.query
        self.params = parse_qs(source, keep_blank_values=True)

    def get(self, name: str) -> str | None:
        values = self.params.get(name)
        if values and len(values) > 1:
            raise _OAuthError("invalid_request", f"parameter {name} given more than once")
        # RFC 6749 §3.1: a parameter without a value is as if omitted.
        return values[0] if values and values[0] else None

    def require(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise _OAuthError("invalid_request", f"missing parameter {name}")
        return value

    def basic_auth(self) -> tuple[str, str] | None:
        header = self.headers.get("Authorization", "")
        if header[:6].lower() != "basic ":
            return None
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
        except ValueError:  # binascii.Error and UnicodeDecodeError both are
            raise _invalid_client("malformed Basic credentials") from None
        client_id, _, secret = decoded.partition(":")
        return client_id, secret

    def first(self, name: str) -> str | None:
        """For the record: never raises."""
        return self.params.get(name, [None])[0]

    def client_hint(self) -> str | None:
        try:
            basic = self.basic_auth()
        except _OAuthError:
            basic = None
        return unquote_plus(basic[0]) if basic else self.first("client_id")

    def json(self) -> dict[str, Any]:
        try:
            value = json.loads(self.body) if self.body else {}
        except ValueError as exc:
            raise ValueError(f"invalid JSON body: {exc}") from None
        if not isinstance(value, dict):
            raise ValueError("the JSON body must be an object")
        return value


class DevProvider:
    """The provider. Every method is thread-safe; state lives behind one lock."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        access_token_lifetime: float = 3600.0,
        refresh_token_rotation: str = "rotate",  # noqa: S107 - a mode, not a secret
        access_token_length: int = 48,
        refresh_token_reuse_interval: float = 0.0,
        clients: Mapping[str, str | None] | None = None,
        clock: Callable[[], float] = time.time,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self._port = port
        self._ssl_context = ssl_context  # serve https with this (a test's certificate)
        self._tenants = set(DEFAULT_TENANTS)  # known on /TENANT/oauth2/v2.0/... routes
        self._expired_secrets: set[str] = set()  # client ids whose secret has expired
        self._clock = clock
        self._clients = dict(DEFAULT_CLIENTS if clients is None else clients)
        self._options = _Options(
            access_token_lifetime,
            refresh_token_rotation,
            access_token_length,
            refresh_token_reuse_interval=refresh_token_reuse_interval,
        )
        self._options.check()
        # Reentrant so that admin routes, which run under it, can call the public methods.
        self._lock = threading.RLock()
        # Woken whenever a request arrives or is recorded: see wait_for().
        self._changed = threading.Condition(self._lock)
        self._received = 0
        self._rotations: list[Rotation] = []
        self._retired: dict[str, tuple[_Grant, float]] = {}  # strict: token -> (grant, until)
        self._issued: list[str] = []  # every secret handed out or seen, for leak checks
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._grants: list[_Grant] = []
        self._refresh: dict[str, _Grant] = {}  # rotated-out (strict) tokens move to _retired
        self._access: dict[str, _AccessToken] = {}
        self._codes: dict[str, _AuthCode] = {}
        self._devices: dict[str, _Device] = {}
        self._user_codes: dict[str, str] = {}
        self._faults: list[_Fault] = []
        # Hostile mode (devprovider_hostile.py): scripted answers no honest provider sends.
        self.hostile = HostileAnswers()
        self._records: list[RequestRecord] = []
        self._deny_next: str | None = None
        self._next_user: str | None = None  # the next /authorize signs in as this user
        self._id_token_claims: dict[str, Any] = {}  # merged into ID tokens; None deletes
        # The `iss` of authorization responses (RFC 9207): ours unless set; None omits it.
        self._response_issuer: tuple[str | None] | None = None
        self._routes: dict[str, tuple[str, Callable[[_Request], _Response]]] = {
            "/token": ("POST", self._token),
            "/authorize": ("GET", self._authorize),
            "/device_authorization": ("POST", self._device_authorization),
            "/device": ("GET", self._device_page),
            "/introspect": ("POST", lambda r: _json(self.introspect(r.get("token") or ""))),
            "/revoke": ("POST", self._revoke_route),
            "/.well-known/openid-configuration": ("GET", self._discovery),
            "/.well-known/oauth-authorization-server": ("GET", self._discovery),
            "/admin/issue": ("POST", self._admin_issue),
            "/admin/revoke": ("POST", self._admin_revoke),
            "/admin/fault": ("POST", self._admin_fault),
            "/admin/clear-faults": ("POST", self._admin_clear_faults),
            "/admin/options": ("POST", self._admin_options),
            "/admin/requests": ("GET", lambda r: _json([asdict(x) for x in self.requests])),
            "/admin/rotations": ("GET", lambda r: _json([asdict(x) for x in self.rotations])),
            "/admin/approve-device": ("POST", self._admin_approve),
        }

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._port == 0:
            raise RuntimeError("the URL is known only after start()")
        scheme = "https" if self._ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self._port}"

    def start(self) -> None:
        """Listen and serve in a daemon thread. After stop(), restarts on the same port."""
        if self._server is not None:
            raise RuntimeError("already started")
        server = _Server((self.host, self._port), _Handler)
        if self._ssl_context is not None:
            server.socket = self._ssl_context.wrap_socket(server.socket, server_side=True)
        server.provider = self
        self._port = server.socket.getsockname()[1]
        self._stopping.clear()
        self._server = server
        # Where stop() cannot wake select() early, it waits up to one poll interval.
        self._thread = threading.Thread(
            target=server.serve_forever, args=(0.05,), name=f"devprovider:{self._port}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping.set()  # wakes hanging and delayed requests
        try:
            # Wakes serve_forever's select() at once (on Linux), so tests don't pay a poll
            # interval per provider.
            server.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join()
        self._server = self._thread = None

    def __enter__(self) -> DevProvider:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def endpoints(self) -> dict[str, str]:
        url = self.url
        return {
            "issuer": url,
            "authorization_endpoint": url + "/authorize",
            "token_endpoint": url + "/token",
            "device_authorization_endpoint": url + "/device_authorization",
            "revocation_endpoint": url + "/revoke",
            "introspection_endpoint": url + "/introspect",
        }

    # -- admin and inspection ----------------------------------------------------------------

    def issue_refresh_token(
        self, user: str, *, client_id: str = "demo-client", scopes: Sequence[str] = DEFAULT_SCOPES
    ) -> str:
        """A refresh token as if `user` had just authorized `client_id`."""
        if not isinstance(user, str) or not user:
            raise ValueError("user must be a non-empty string")
        if client_id not in self._clients:
            raise ValueError(f"unknown client {client_id!r}")
        # A bare string is a space-separated scope list, not a sequence of letters.
        granted = tuple(scopes.split()) if isinstance(scopes, str) else tuple(scopes)
        with self._lock:
            return self._new_refresh_token(self._new_grant(user, client_id, granted))

    def revoke_user(self, user: str) -> None:
        """Revoke every grant of `user`: all its refresh and access tokens stop working."""
        with self._lock:
            for grant in self._grants:
                if grant.user == user:
                    grant.revoked = True

    def revoke_token(self, token: str) -> None:
        """RFC 7009: a refresh token takes its whole grant with it; an access token only itself."""
        with self._lock:
            grant = self._refresh.get(token) or self._retired.get(token, (None, 0.0))[0]
            if grant is not None:
                grant.revoked = True
            elif (access := self._access.get(token)) is not None:
                access.revoked = True

    def add_fault(self, kind: str, *, count: int = 1, path: str = "/token", **params: Any) -> None:
        """Make the next `count` requests on `path` fail as `kind` says; faults queue in order."""
        allowed = FAULT_KINDS.get(kind)
        if allowed is None:
            raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
        if unknown := set(params) - allowed:
            raise ValueError(f"fault {kind!r} takes no {', '.join(sorted(unknown))}")
        if not isinstance(count, int) or count < 1:
            raise ValueError("count must be a positive integer")
        if not isinstance(path, str) or not path.startswith("/") or path.startswith("/admin/"):
            raise ValueError("path must be a provider path like /token (never /admin/...)")
        status = params.get("status", 500)
        if not isinstance(status, int) or not 100 <= status <= 599:
            raise ValueError("status must be an HTTP status code")
        seconds = params.get("seconds", 0.0)
        if not isinstance(seconds, int | float) or not seconds >= 0:
            raise ValueError("seconds must be a number >= 0")
        headers = params.get("headers", {})
        if not isinstance(headers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
        ):
            raise ValueError("headers must map strings to strings")
        with self._lock:
            self._faults.append(_Fault(kind, path, count, dict(params)))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def set_options(self, **kw: Any) -> None:
        """Change access_token_lifetime, refresh_token_rotation, access_token_length,
        refresh_token_reuse_interval, device_interval or device_expires_in; they apply to
        tokens issued (or retired) from now on."""
        with self._lock:
            options = replace(self._options, **kw)  # TypeError for an unknown option
            options.check()
            self._options = options

    def approve_device(self, user_code: str, user: str) -> None:
        """Approve a pending device authorization as `user` (KeyError if unknown)."""
        with self._lock:
            device = self._pending_device(user_code)
            device.grant = self._new_grant(user, device.client_id, device.scopes)
            device.status = "approved"

    def deny_device(self, user_code: str) -> None:
        with self._lock:
            self._pending_device(user_code).status = "denied"

    def deny_next_authorization(self, error: str = "access_denied") -> None:
        """The next /authorize redirects back with this error instead of a code."""
        with self._lock:
            self._deny_next = error

    def expire_client_secret(self, client_id: str) -> None:
        """The client's secret has expired: it is refused (AADSTS7000222 on tenant routes)."""
        with self._lock:
            self._expired_secrets.add(client_id)

    def microsoft_endpoint(self, tenant: str, what: str = "token") -> str:
        """A Microsoft-shaped endpoint, /TENANT/oauth2/v2.0/WHAT, whose refusals carry
        AADSTS codes; an unknown tenant is AADSTS90002 (known: DEFAULT_TENANTS)."""
        return f"{self.url}/{tenant}/oauth2/v2.0/{what}"

    def sign_in_next_as(self, user: str) -> None:
        """The next /authorize signs in as `user`, whatever the login_hint asks for."""
        with self._lock:
            self._next_user = user

    def set_id_token_claims(self, **claims: Any) -> None:
        """Claims merged into every ID token from now on (a None value removes the claim);
        with no arguments, ID tokens are as usual again."""
        with self._lock:
            self._id_token_claims = dict(claims)

    def set_response_issuer(self, iss: str | None) -> None:
        """The `iss` sent back with authorization responses (RFC 9207); None: none at all."""
        with self._lock:
            self._response_issuer = (iss,)

    def introspect(self, token: str) -> dict[str, Any]:
        """RFC 7662, for access tokens; Dovecot reads `active` and `username` or `email`."""
        with self._lock:
            access = self._access.get(token)
            if access is None or not access.active(self._clock()):
                return {"active": False}
            user = access.grant.user
            return {
                "active": True,
                "sub": user,
                "username": user,
                "email": user,
                "scope": " ".join(access.scopes),
                "client_id": access.grant.client_id,
                "iat": int(access.issued_at),
                "exp": int(access.expires_at),
                "token_type": "Bearer",
            }

    @property
    def requests(self) -> list[RequestRecord]:
        """Every request but /admin ones, oldest first."""
        with self._lock:
            return list(self._records)

    def count(self, *, path: str = "/token", grant_type: str | None = None) -> int:
        with self._lock:
            return sum(
                r.path == path and (grant_type is None or r.grant_type == grant_type)
                for r in self._records
            )

    def valid_refresh_tokens(self, user: str) -> list[str]:
        """The refresh tokens of `user` that would work now, oldest first; retired ones not."""
        with self._lock:
            grants = self._refresh.items()
            return [t for t, g in grants if not g.revoked and g.user == user]

    def refresh_token_status(self, token: str) -> str:
        """
        "valid" (current), "reusable" (retired under strict rotation, still inside the
        reuse interval) or "invalid" (unknown, revoked, or retired for good).
        """
        with self._lock:
            grant = self._refresh.get(token)
            if grant is not None:
                return "invalid" if grant.revoked else "valid"
            retired, until = self._retired.get(token, (None, 0.0))
            if retired is not None and not retired.revoked and self._clock() < until:
                return "reusable"
            return "invalid"

    @property
    def rotations(self) -> list[Rotation]:
        """Every answered refresh_token grant, oldest first."""
        with self._lock:
            return list(self._rotations)

    @property
    def received(self) -> int:
        """How many requests (not /admin ones) have arrived, answered or not."""
        with self._lock:
            return self._received

    def wait_for(self, condition: Callable[[], bool], timeout: float) -> bool:
        """
        Block until `condition()` holds, re-checked whenever a request arrives or is
        recorded; False if `timeout` seconds pass first. `condition` runs under the
        provider's lock, so it may call the inspection methods.
        """
        with self._changed:
            return self._changed.wait_for(condition, timeout)

    def issued_secrets(self) -> list[str]:
        """
        Every secret this provider issued or was shown: access, refresh and id tokens,
        authorization codes, device codes, PKCE verifiers, client secrets. For tests that
        check no secret leaks anywhere.
        """
        with self._lock:
            clients = [s for s in self._clients.values() if s]
            return [*clients, *self._issued]

    # -- state helpers (called with the lock held) -------------------------------------------

    def _new_grant(self, user: str, client_id: str, scopes: tuple[str, ...]) -> _Grant:
        grant = _Grant(user, client_id, scopes)
        self._grants.append(grant)
        return grant

    def _new_refresh_token(self, grant: _Grant) -> str:
        token = "dev-rt-" + secrets.token_urlsafe(32)
        self._refresh[token] = grant
        self._issued.append(token)
        return token

    def _pending_device(self, user_code: str) -> _Device:
        device_code = self._user_codes.get(_normal_user_code(user_code))
        if device_code is None:
            raise KeyError(f"unknown user code {user_code!r}")
        device = self._devices[device_code]
        if device.status != "pending" or self._clock() >= device.expires_at:
            raise ValueError(f"user code {user_code} is no longer pending")
        return device

    def _tokens(
        self, grant: _Grant, scopes: tuple[str, ...], *, refresh: bool, nonce: str | None = None
    ) -> dict[str, Any]:
        now, options = self._clock(), self._options
        # Opaque and exactly as long as asked, or (access_token_claims) a JWT like Microsoft's.
        length = options.access_token_length
        access = secrets.token_urlsafe(length)[:length]
        lifetime = options.access_token_lifetime
        if options.access_token_claims is not None:
            payload = {"scp": " ".join(scopes), "upn": grant.user, **options.access_token_claims}
            payload.update(iat=int(now), exp=int(now + lifetime))
            header = {"typ": "JWT", "alg": "none"}
            parts = (_b64url(json.dumps(p).encode()) for p in (header, payload))
            access = ".".join(parts) + "." + access
        self._access[access] = _AccessToken(grant, scopes, now, now + lifetime)
        self._issued.append(access)
        body: dict[str, Any] = {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": int(lifetime),
            "scope": " ".join(scopes),
        }
        if refresh:
            body["refresh_token"] = self._new_refresh_token(grant)
        if "openid" in scopes:
            claims: dict[str, Any] = {
                "iss": self.url,
                "sub": grant.user,
                "aud": grant.client_id,
                "iat": int(now),
                "exp": int(now + lifetime),
                "email": grant.user,
            }
            if nonce is not None:
                claims["nonce"] = nonce
            for name, value in self._id_token_claims.items():
                if value is None:
                    claims.pop(name, None)
                else:
                    claims[name] = value
            header = {"alg": "none", "typ": "JWT"}
            parts = (_b64url(json.dumps(p).encode()) for p in (header, claims))
            body["id_token"] = ".".join(parts) + "."
            self._issued.append(body["id_token"])
        return body

    def _authenticate(self, req: _Request) -> str:
        """The client id, authenticated as RFC 6749 §2.3 says, or invalid_client."""
        basic = req.basic_auth()
        form_id, form_secret = req.get("client_id"), req.get("client_secret")
        if basic is None:
            if form_id is None:
                raise _invalid_client("no client authentication")
            candidates = [(form_id, form_secret)]
        else:
            if form_secret is not None:
                raise _OAuthError("invalid_request", "more than one client authentication method")
            # §2.3.1 form-encodes id and secret inside Basic; many clients don't. Take either.
            raw_id, raw_secret = basic
            candidates = [(unquote_plus(raw_id), unquote_plus(raw_secret)), (raw_id, raw_secret)]
        for client_id, secret in candidates:
            if client_id not in self._clients or form_id not in (None, client_id):
                continue
            expected = self._clients[client_id]
            if expected is None and not secret:
                return client_id
            if expected is not None and secret is not None:
                if secrets.compare_digest(secret.encode(), expected.encode()):
                    if client_id in self._expired_secrets:
                        raise _invalid_client("the client secret has expired", "expired_secret")
                    return client_id
        known = any(client_id in self._clients for client_id, _ in candidates)
        raise _invalid_client(
            "unknown client or wrong secret", "wrong_secret" if known else "unknown_client"
        )

    # -- endpoints (run with the lock held) --------------------------------------------------

    def _token(self, req: _Request) -> _Response:
        if not req.is_form:
            raise _OAuthError("invalid_request", "send application/x-www-form-urlencoded")
        grant_type = req.require("grant_type")
        client_id = self._authenticate(req)
        handlers = {
            "refresh_token": self._grant_refresh,
            "client_credentials": self._grant_client_credentials,
            "authorization_code": self._grant_code,
            DEVICE_GRANT: self._grant_device,
        }
        handler = handlers.get(grant_type)
        if handler is None:
            raise _OAuthError("unsupported_grant_type", f"grant type {grant_type!r}")
        return _json(handler(req, client_id))

    def _grant_refresh(self, req: _Request, client_id: str) -> dict[str, Any]:
        token = req.require("refresh_token")
        grant = self._refresh.get(token)
        retired, until = self._retired.get(token, (None, 0.0))
        if grant is None and retired is not None and self._clock() < until:
            grant = retired  # strict, inside the reuse interval: answered like a current one
        if grant is None or grant.revoked:
            raise _OAuthError("invalid_grant", "the refresh token is invalid, expired or revoked")
        if grant.client_id != client_id:
            raise _OAuthError("invalid_grant", "the refresh token was issued to another client")
        scopes = grant.scopes
        if (asked := req.get("scope")) is not None:
            scopes = tuple(asked.split())
            if not set(scopes) <= set(grant.scopes):
                raise _OAuthError("invalid_scope", "scope exceeds what was granted")
        rotation = self._options.refresh_token_rotation
        body = self._tokens(grant, scopes, refresh=rotation != "none")
        if rotation == "strict" and self._refresh.pop(token, None) is not None:
            # The reuse interval runs from the first use; later reuses do not extend it.
            self._retired[token] = (
                grant,
                self._clock() + self._options.refresh_token_reuse_interval,
            )
        self._rotations.append(
            Rotation(self._clock(), token, body.get("refresh_token"), body["access_token"])
        )
        return body

    def _grant_client_credentials(self, req: _Request, client_id: str) -> dict[str, Any]:
        if self._clients[client_id] is None:
            raise _OAuthError("unauthorized_client", "a public client has no credentials")
        scopes = _scopes(req.get("scope"))
        return self._tokens(
            self._new_grant(f"client:{client_id}", client_id, scopes), scopes, refresh=False
        )

    def _grant_code(self, req: _Request, client_id: str) -> dict[str, Any]:
        code = self._codes.get(req.require("code"))
        if code is None or code.grant.client_id != client_id:
            raise _OAuthError("invalid_grant", "unknown authorization code")
        if code.used:
            # RFC 6749 §4.1.2: a replayed code may be stolen; revoke what it yielded.
            code.grant.revoked = True
            raise _OAuthError("invalid_grant", "code already used; its tokens are revoked")
        if code.grant.revoked or self._clock() >= code.expires_at:
            raise _OAuthError("invalid_grant", "the authorization code expired or was revoked")
        if req.get("redirect_uri") != code.redirect_uri:
            raise _OAuthError("invalid_grant", "redirect_uri differs from the authorization's")
        verifier = req.get("code_verifier")
        if verifier is not None:
            self._issued.append(verifier)
        if code.challenge is None:
            if verifier is not None:
                raise _OAuthError("invalid_grant", "code_verifier without a code_challenge")
        elif verifier is None or _b64url(hashlib.sha256(verifier.encode()).digest()) != (
            code.challenge
        ):
            raise _OAuthError("invalid_grant", "PKCE verification failed")
        code.used = True
        return self._tokens(code.grant, code.grant.scopes, refresh=True, nonce=code.nonce)

    def _grant_device(self, req: _Request, client_id: str) -> dict[str, Any]:
        device = self._devices.get(req.require("device_code"))
        if device is None or device.client_id != client_id or device.status == "done":
            raise _OAuthError("invalid_grant", "unknown or already used device code")
        now = self._clock()
        if now >= device.expires_at:
            raise _OAuthError("expired_token", "the device code expired")
        if device.status == "denied":
            raise _OAuthError("access_denied", "the user denied the authorization")
        if device.status == "approved" and device.grant is not None:
            device.status = "done"
            return self._tokens(device.grant, device.scopes, refresh=True)
        too_soon = device.last_poll is not None and now - device.last_poll < device.interval
        device.last_poll = now
        if too_soon:
            device.interval += 5  # RFC 8628 §3.5
            raise _OAuthError("slow_down", f"poll at most every {device.interval} seconds")
        raise _OAuthError("authorization_pending", "the user has not answered yet")

    def _device_authorization(self, req: _Request) -> _Response:
        if not req.is_form:
            raise _OAuthError("invalid_request", "send application/x-www-form-urlencoded")
        client_id = self._authenticate(req)
        options = self._options
        while True:
            letters = "".join(secrets.choice(USER_CODE_ALPHABET) for _ in range(8))
            if letters not in self._user_codes:
                break
        user_code = f"{letters[:4]}-{letters[4:]}"
        device_code = secrets.token_urlsafe(32)
        self._issued.append(device_code)
        self._devices[device_code] = _Device(
            client_id,
            _scopes(req.get("scope")),
            self._clock() + options.device_expires_in,
            options.device_interval,
        )
        self._user_codes[letters] = device_code
        verification_uri = self.url + "/device"
        return _json(
            {
                "device_code": device_code,
                "user_code": user_code,
                "verification_uri": verification_uri,
                "verification_uri_complete": f"{verification_uri}?user_code={user_code}",
                "expires_in": options.device_expires_in,
                "interval": options.device_interval,
            }
        )

    def _device_page(self, req: _Request) -> _Response:
        try:
            self.approve_device(req.require("user_code"), req.get("user") or DEFAULT_USER)
        except (KeyError, ValueError, _OAuthError):
            hint = (
                "<p>That code is unknown or expired. Open the verification_uri_complete link.</p>"
            )
            return _page(400, "Unknown code", hint)
        return _page(200, "Approved", "<p>You can close this window.</p>")

    def _authorize(self, req: _Request) -> _Response:
        client_id, redirect_uri = req.get("client_id"), req.get("redirect_uri")
        if client_id not in self._clients:
            return _page(400, "Unknown client", "<p>The client_id is not registered.</p>")
        if redirect_uri is None or not _is_loopback_redirect(redirect_uri):
            return _page(
                400, "Bad redirect_uri", "<p>Only http loopback redirects are allowed.</p>"
            )
        assert client_id is not None
        target, state = redirect_uri, req.get("state")

        def back(**params: str) -> _Response:
            if state is not None:
                params["state"] = state
            iss = self.url if self._response_issuer is None else self._response_issuer[0]
            if iss is not None:
                params["iss"] = iss  # RFC 9207
            separator = "&" if "?" in target else "?"
            return _Response(302, headers={"Location": target + separator + urlencode(params)})

        if req.get("response_type") != "code":
            return back(error="unsupported_response_type")
        challenge, method = req.get("code_challenge"), req.get("code_challenge_method")
        if (challenge is None) != (method is None) or method not in (None, "S256"):
            return back(error="invalid_request", error_description="PKCE supports S256 only")
        if self._deny_next is not None:
            error, self._deny_next = self._deny_next, None
            return back(error=error)
        user, self._next_user = self._next_user or req.get("login_hint") or DEFAULT_USER, None
        grant = self._new_grant(user, client_id, _scopes(req.get("scope")))
        code = secrets.token_urlsafe(32)
        self._issued.append(code)
        self._codes[code] = _AuthCode(
            grant, target, challenge, req.get("nonce"), self._clock() + CODE_LIFETIME
        )
        return back(code=code)

    def _revoke_route(self, req: _Request) -> _Response:
        if (token := req.get("token")) is not None:
            self.revoke_token(token)
        return _Response(200)

    def _discovery(self, req: _Request) -> _Response:
        return _json(
            {
                **self.endpoints,
                "grant_types_supported": list(GRANT_TYPES),
                "response_types_supported": ["code"],
                "code_challenge_methods_supported": ["S256"],
                "authorization_response_iss_parameter_supported": True,
                "token_endpoint_auth_methods_supported": [
                    "client_secret_basic",
                    "client_secret_post",
                    "none",
                ],
            }
        )

    def _admin_issue(self, req: _Request) -> _Response:
        body = req.json()
        token = self.issue_refresh_token(
            body["user"],
            client_id=body.get("client_id", "demo-client"),
            scopes=body.get("scopes", DEFAULT_SCOPES),
        )
        return _json({"refresh_token": token})

    def _admin_revoke(self, req: _Request) -> _Response:
        body = req.json()
        if ("user" in body) == ("token" in body):
            raise ValueError("give either user or token")
        if "user" in body:
            self.revoke_user(body["user"])
        else:
            self.revoke_token(body["token"])
        return _json({})

    def _admin_fault(self, req: _Request) -> _Response:
        body = req.json()
        kind = body.pop("kind")
        self.add_fault(kind, count=body.pop("count", 1), path=body.pop("path", "/token"), **body)
        return _json({})

    def _admin_clear_faults(self, req: _Request) -> _Response:
        self.clear_faults()
        return _json({})

    def _admin_options(self, req: _Request) -> _Response:
        self.set_options(**req.json())
        return _json(asdict(self._options))

    def _admin_approve(self, req: _Request) -> _Response:
        body = req.json()
        self.approve_device(body["user_code"], body.get("user", DEFAULT_USER))
        return _json({})

    # -- HTTP plumbing -----------------------------------------------------------------------

    def _route(self, req: _Request) -> _Response:
        path, tenant = req.path, None
        if (match := _TENANT_ROUTE.fullmatch(path)) is not None:
            tenant, path = match.group(1), _TENANT_PATHS[match.group(2)]
        route = self._routes.get(path)
        if route is None:
            return _json({"error": "not_found", "error_description": req.path}, 404)
        method, handler = route
        if req.method != method:
            return _json({"error": "method_not_allowed"}, 405, {"Allow": method})
        try:
            with self._lock:
                if tenant is not None and tenant not in self._tenants:
                    unknown = _OAuthError("invalid_request", "unknown tenant")
                    unknown.reason = "unknown_tenant"
                    raise unknown
                return handler(req)
        except _OAuthError as exc:
            if tenant is not None and exc.reason in _MICROSOFT_REFUSALS:
                status, error, text = _MICROSOFT_REFUSALS[exc.reason]
                client = req.client_hint() or ""
                description = text.format(client=client, tenant=tenant)
                code = int(description[6 : description.index(":")])
                body = {"error": error, "error_description": description, "error_codes": [code]}
                return _json(body, status)
            return exc.response()
        except (KeyError, TypeError, ValueError) as exc:
            if not req.path.startswith("/admin/"):
                raise
            return _OAuthError("invalid_request", f"{type(exc).__name__}: {exc}").response()

    def _take_fault(self, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.path == path:
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def _handle(self, handler: _Handler) -> None:
        try:
            length = int(handler.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            _send(handler, _json({"error": "invalid_request"}, 400))
            return
        req = _Request(handler.command, handler.path, handler.headers, handler.rfile.read(length))
        admin = req.path.startswith("/admin/")
        if not admin:
            with self._changed:
                self._received += 1
                self._changed.notify_all()
        hostile = None if admin else self.hostile.take(req.path)
        if hostile is not None:
            with self._changed:
                record = RequestRecord(
                    self._clock(), req.method, req.path, req.first("grant_type"),
                    req.client_hint(), hostile.status, "hostile",
                )  # fmt: skip
                self._records.append(record)
                self._changed.notify_all()
            self.hostile.send(handler, hostile)
            return
        fault = None if admin else self._take_fault(req.path)
        kind = fault.kind if fault is not None else None
        response: _Response | None = None
        if fault is None:
            response = self._route(req)
        elif kind == "delay":
            # The grant is processed only after the delay, so a client killed meanwhile
            # leaves the provider with, say, a rotated refresh token the client never saw.
            if not self._stopping.wait(fault.params.get("seconds", 1.0)):
                response = self._route(req)
        elif kind not in ("hang", "reset"):
            response = _fault_response(fault, self._options)
        if not admin:
            record = RequestRecord(
                self._clock(),
                req.method,
                req.path,
                req.first("grant_type"),
                req.client_hint(),
                response.status if response is not None else 0,
                kind,
            )
            # Recorded before answering, so a client that has its answer sees the record.
            with self._changed:
                self._records.append(record)
                self._changed.notify_all()
        if fault is not None and kind == "hang":
            self._stopping.wait(fault.params.get("seconds", 3600.0))
        elif kind == "reset":
            handler.close_connection = True
            # Linger 0 turns close() into a TCP RST: an abortive close, not a clean EOF.
            handler.connection.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            handler.rfile.close()
            handler.connection.close()
        elif response is not None:
            _send(handler, response)


def _fault_response(fault: _Fault, options: _Options) -> _Response:
    params = fault.params
    if fault.kind == "status":
        status = params.get("status", 500)
        headers = dict(params.get("headers", {}))
        content_type = "application/json"
        for name in [n for n in headers if n.lower() == "content-type"]:
            content_type = headers.pop(name)
        if "body" in params:
            return _Response(status, str(params["body"]).encode(), content_type, headers)
        default = _STATUS_ERRORS.get(status, "server_error" if status >= 500 else "invalid_request")
        body = {"error": params.get("error", default)}
        if "error_description" in params:
            body["error_description"] = params["error_description"]
        return _Response(status, json.dumps(body).encode(), content_type, headers)
    if fault.kind == "html":
        return _Response(params.get("status", 500), _ERROR_PAGE, "text/html; charset=utf-8")
    if fault.kind == "malformed":
        return _Response(200, b'{"access_token": "eyJ0eXAiOiJKV1QiLCJub25jZSI6', "application/json")
    expires_in = int(options.access_token_lifetime)
    return _json({"token_type": "Bearer", "expires_in": expires_in, "scope": "mail"})


def _send(handler: _Handler, response: _Response) -> None:
    handler.send_response(response.status)
    handler.send_header("Content-Type", response.content_type)
    handler.send_header("Content-Length", str(len(response.body)))
    handler.send_header("Cache-Control", "no-store")
    for name, value in response.headers.items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(response.body)


class _Server(ThreadingHTTPServer):
    provider: DevProvider
    # socketserver's default backlog is 5: a daemon refreshing 8 accounts at once
    # overflows it, and each dropped SYN costs the client a 1 s retransmit,
    # which no real provider would charge (bench/scale.py saw it).
    request_queue_size = 128

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that hang up (timeouts, killed daemons) are routine here; bugs are not.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    # One request per connection: after stop() no kept-alive connection can still be
    # answered, so "the provider is down" is exact.
    protocol_version = "HTTP/1.0"
    timeout = 10  # an idle client must not pin a thread forever

    def version_string(self) -> str:
        return "mailoauthd-devprovider"

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: tests capture stderr, and request lines carry codes."""

    def do_GET(self) -> None:
        self.server.provider._handle(self)

    def do_POST(self) -> None:
        self.server.provider._handle(self)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mailoauthd.devprovider",
        description="Run the development OAuth2 provider until SIGTERM or SIGINT.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--access-token-lifetime", type=float, default=3600.0, metavar="S")
    parser.add_argument("--rotation", choices=ROTATIONS, default="rotate")
    parser.add_argument("--access-token-length", type=int, default=48, metavar="N")
    parser.add_argument(
        "--reuse-interval",
        type=float,
        default=0.0,
        metavar="S",
        help="with --rotation strict: how long a retired refresh token still works",
    )
    args = parser.parse_args(argv)
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    # Blocked before any thread exists, so every thread inherits the mask and
    # sigwait() below is the one place the signals arrive.
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        provider = DevProvider(
            host=args.host,
            port=args.port,
            access_token_lifetime=args.access_token_lifetime,
            refresh_token_rotation=args.rotation,
            access_token_length=args.access_token_length,
            refresh_token_reuse_interval=args.reuse_interval,
        )
        provider.start()
    except (OSError, ValueError) as exc:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        print(f"devprovider: {exc}", file=sys.stderr)
        return 1
    try:
        print(json.dumps({"url": provider.url, **provider.endpoints}), flush=True)
        signal.sigwait(stop_signals)
    finally:
        provider.stop()
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    return 0


if __name__ == "__main__":
    sys.exit(main())
