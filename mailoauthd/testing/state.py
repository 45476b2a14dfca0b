"""
The development provider's state: clients, grants, tokens, codes, devices, and what it saw.

`ProviderState` is everything the endpoint modules read and change, behind one
reentrant lock, plus the minting of tokens and the queries tests make
(`introspect`, `requests`, `count`, `refresh_token_status`, `wait_for`, ...).
Endpoints run with the lock held (provider.py takes it); the public queries take
it themselves. Expiry follows the injected clock, so tests never sleep.
"""

from __future__ import annotations

import json
import secrets
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mailoauthd.flows import GrantType
from mailoauthd.testing.faults import Fault
from mailoauthd.testing.hostile import HostileAnswers
from mailoauthd.testing.wire import b64url

DEFAULT_CLIENTS: Mapping[str, str | None] = {"demo-client": "demo-secret", "public-client": None}
DEFAULT_USER = "demo@example.com"
DEFAULT_SCOPES = ("mail",)
ROTATIONS = ("none", "rotate", "strict")
# Every grant type the daemon sends, the provider answers (and its metadata lists).
GRANT_TYPES = tuple(GrantType)


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
class Options:
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
class Grant:
    """One authorization by a user (or a client, for client_credentials)."""

    user: str
    client_id: str
    scopes: tuple[str, ...]
    revoked: bool = False


@dataclass(eq=False)
class AccessToken:
    grant: Grant
    scopes: tuple[str, ...]
    issued_at: float
    expires_at: float
    revoked: bool = False

    def active(self, now: float) -> bool:
        return not self.revoked and not self.grant.revoked and now < self.expires_at


@dataclass(eq=False)
class AuthCode:
    grant: Grant
    redirect_uri: str
    challenge: str | None
    nonce: str | None
    expires_at: float
    used: bool = False


@dataclass(eq=False)
class Device:
    client_id: str
    scopes: tuple[str, ...]
    expires_at: float
    interval: int
    last_poll: float | None = None
    status: str = "pending"  # then "approved" or "denied"; "done" once tokens went out
    grant: Grant | None = None


def scopes_of(value: str | None) -> tuple[str, ...]:
    return tuple(value.split()) if value else DEFAULT_SCOPES


class ProviderState:
    """What the provider holds. Every public method is thread-safe; state lives behind one lock."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        options: Options,
        clients: Mapping[str, str | None] | None,
        clock: Callable[[], float] = time.time,
        ssl_context: ssl.SSLContext | None = None,
        tenants: tuple[str, ...] = (),
    ) -> None:
        self.host = host
        self.port = port
        self.ssl_context = ssl_context  # serve https with this (a test's certificate)
        self.tenants = set(tenants)  # known on /TENANT/oauth2/v2.0/... routes
        self.expired_secrets: set[str] = set()  # client ids whose secret has expired
        self.clock = clock
        self.clients = dict(DEFAULT_CLIENTS if clients is None else clients)
        options.check()
        self.options = options
        # Reentrant so that admin routes, which run under it, can call the public methods.
        self.lock = threading.RLock()
        # Woken whenever a request arrives or is recorded: see wait_for().
        self.changed = threading.Condition(self.lock)
        self.arrived = 0
        self.rotation_log: list[Rotation] = []
        self.retired: dict[str, tuple[Grant, float]] = {}  # strict: token -> (grant, until)
        self.issued: list[str] = []  # every secret handed out or seen, for leak checks
        self.stopping = threading.Event()
        self.grants: list[Grant] = []
        # Rotated-out (strict) tokens move to `retired`.
        self.refresh_tokens: dict[str, Grant] = {}
        self.access_tokens: dict[str, AccessToken] = {}
        self.auth_codes: dict[str, AuthCode] = {}
        self.devices: dict[str, Device] = {}
        self.user_codes: dict[str, str] = {}
        self.faults: list[Fault] = []
        # Hostile mode (hostile.py): scripted answers no honest provider sends.
        self.hostile = HostileAnswers()
        self.records: list[RequestRecord] = []
        self.deny_next: str | None = None
        self.next_user: str | None = None  # the next /authorize signs in as this user
        self.id_token_claims: dict[str, Any] = {}  # merged into ID tokens; None deletes
        # The `iss` of authorization responses (RFC 9207): ours unless set; None omits it.
        self.response_issuer: tuple[str | None] | None = None

    @property
    def url(self) -> str:
        if self.port == 0:
            raise RuntimeError("the URL is known only after start()")
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    # -- inspection --------------------------------------------------------------------------

    def introspect(self, token: str) -> dict[str, Any]:
        """RFC 7662, for access tokens; Dovecot reads `active` and `username` or `email`."""
        with self.lock:
            access = self.access_tokens.get(token)
            if access is None or not access.active(self.clock()):
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
        with self.lock:
            return list(self.records)

    def count(self, *, path: str = "/token", grant_type: str | None = None) -> int:
        with self.lock:
            return sum(
                r.path == path and (grant_type is None or r.grant_type == grant_type)
                for r in self.records
            )

    def valid_refresh_tokens(self, user: str) -> list[str]:
        """The refresh tokens of `user` that would work now, oldest first; retired ones not."""
        with self.lock:
            grants = self.refresh_tokens.items()
            return [t for t, g in grants if not g.revoked and g.user == user]

    def refresh_token_status(self, token: str) -> str:
        """
        "valid" (current), "reusable" (retired under strict rotation, still inside the
        reuse interval) or "invalid" (unknown, revoked, or retired for good).
        """
        with self.lock:
            grant = self.refresh_tokens.get(token)
            if grant is not None:
                return "invalid" if grant.revoked else "valid"
            retired, until = self.retired.get(token, (None, 0.0))
            if retired is not None and not retired.revoked and self.clock() < until:
                return "reusable"
            return "invalid"

    @property
    def rotations(self) -> list[Rotation]:
        """Every answered refresh_token grant, oldest first."""
        with self.lock:
            return list(self.rotation_log)

    @property
    def received(self) -> int:
        """How many requests (not /admin ones) have arrived, answered or not."""
        with self.lock:
            return self.arrived

    def wait_for(self, condition: Callable[[], bool], timeout: float) -> bool:
        """
        Block until `condition()` holds, re-checked whenever a request arrives or is
        recorded; False if `timeout` seconds pass first. `condition` runs under the
        provider's lock, so it may call the inspection methods.
        """
        with self.changed:
            return self.changed.wait_for(condition, timeout)

    def issued_secrets(self) -> list[str]:
        """
        Every secret this provider issued or was shown: access, refresh and id tokens,
        authorization codes, device codes, PKCE verifiers, client secrets. For tests that
        check no secret leaks anywhere.
        """
        with self.lock:
            clients = [s for s in self.clients.values() if s]
            return [*clients, *self.issued]

    # -- bookkeeping of requests -------------------------------------------------------------

    def note_arrival(self) -> None:
        with self.changed:
            self.arrived += 1
            self.changed.notify_all()

    def record(self, record: RequestRecord) -> None:
        with self.changed:
            self.records.append(record)
            self.changed.notify_all()

    def take_fault(self, path: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.path == path:
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self.faults.remove(fault)
                    return fault
        return None

    # -- minting (called with the lock held) -------------------------------------------------

    def new_grant(self, user: str, client_id: str, scopes: tuple[str, ...]) -> Grant:
        grant = Grant(user, client_id, scopes)
        self.grants.append(grant)
        return grant

    def new_refresh_token(self, grant: Grant) -> str:
        token = "dev-rt-" + secrets.token_urlsafe(32)
        self.refresh_tokens[token] = grant
        self.issued.append(token)
        return token

    def tokens(
        self, grant: Grant, scopes: tuple[str, ...], *, refresh: bool, nonce: str | None = None
    ) -> dict[str, Any]:
        now, options = self.clock(), self.options
        # Opaque and exactly as long as asked, or (access_token_claims) a JWT like Microsoft's.
        length = options.access_token_length
        access = secrets.token_urlsafe(length)[:length]
        lifetime = options.access_token_lifetime
        if options.access_token_claims is not None:
            payload = {"scp": " ".join(scopes), "upn": grant.user, **options.access_token_claims}
            payload.update(iat=int(now), exp=int(now + lifetime))
            header = {"typ": "JWT", "alg": "none"}
            parts = (b64url(json.dumps(p).encode()) for p in (header, payload))
            access = ".".join(parts) + "." + access
        self.access_tokens[access] = AccessToken(grant, scopes, now, now + lifetime)
        self.issued.append(access)
        body: dict[str, Any] = {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": int(lifetime),
            "scope": " ".join(scopes),
        }
        if refresh:
            body["refresh_token"] = self.new_refresh_token(grant)
        if "openid" in scopes:
            body["id_token"] = self._id_token(grant, now, lifetime, nonce)
            self.issued.append(body["id_token"])
        return body

    def _id_token(self, grant: Grant, now: float, lifetime: float, nonce: str | None) -> str:
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
        for name, value in self.id_token_claims.items():
            if value is None:
                claims.pop(name, None)
            else:
                claims[name] = value
        header = {"alg": "none", "typ": "JWT"}
        parts = (b64url(json.dumps(p).encode()) for p in (header, claims))
        return ".".join(parts) + "."
