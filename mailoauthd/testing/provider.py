"""
The development provider itself: `DevProvider`, what tests start, script and inspect.

It composes the rest of the package: the state it inherits (state.py), the
endpoints it routes to (endpoints.py, device.py, discovery.py, with the
Microsoft-shaped tenant routes of microsoft.py in front), the /admin/... JSON
routes that scripts and subprocess tests drive it with, and the listener
(server.py). The methods here are the controls a test turns: issue or revoke
tokens, queue faults, change options, approve devices, shape the next sign-in.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from typing import Any

from mailoauthd.testing import device, discovery, endpoints, faults, microsoft
from mailoauthd.testing.server import Listener, answer
from mailoauthd.testing.state import DEFAULT_SCOPES, DEFAULT_USER, Options, ProviderState
from mailoauthd.testing.wire import OAuthError, Request, Response, json_response

# -- /admin/...: the controls over HTTP, for scripts and subprocess tests ----------------------


def _admin_issue(provider: DevProvider, req: Request) -> Response:
    body = req.json()
    token = provider.issue_refresh_token(
        body["user"],
        client_id=body.get("client_id", "demo-client"),
        scopes=body.get("scopes", DEFAULT_SCOPES),
    )
    return json_response({"refresh_token": token})


def _admin_revoke(provider: DevProvider, req: Request) -> Response:
    body = req.json()
    if ("user" in body) == ("token" in body):
        raise ValueError("give either user or token")
    if "user" in body:
        provider.revoke_user(body["user"])
    else:
        provider.revoke_token(body["token"])
    return json_response({})


def _admin_fault(provider: DevProvider, req: Request) -> Response:
    body = req.json()
    kind = body.pop("kind")
    provider.add_fault(kind, count=body.pop("count", 1), path=body.pop("path", "/token"), **body)
    return json_response({})


def _admin_clear_faults(provider: DevProvider, req: Request) -> Response:
    provider.clear_faults()
    return json_response({})


def _admin_options(provider: DevProvider, req: Request) -> Response:
    provider.set_options(**req.json())
    return json_response(asdict(provider.options))


def _admin_approve(provider: DevProvider, req: Request) -> Response:
    body = req.json()
    provider.approve_device(body["user_code"], body.get("user", DEFAULT_USER))
    return json_response({})


def _admin_requests(provider: DevProvider, req: Request) -> Response:
    return json_response([asdict(x) for x in provider.requests])


def _admin_rotations(provider: DevProvider, req: Request) -> Response:
    return json_response([asdict(x) for x in provider.rotations])


_Route = tuple[str, Callable[["DevProvider", Request], Response]]
_ROUTES: dict[str, _Route] = {
    "/token": ("POST", endpoints.token),
    "/authorize": ("GET", endpoints.authorize),
    "/device_authorization": ("POST", device.device_authorization),
    "/device": ("GET", device.device_page),
    "/introspect": ("POST", endpoints.introspect),
    "/revoke": ("POST", endpoints.revoke),
    "/.well-known/openid-configuration": ("GET", discovery.document),
    "/.well-known/oauth-authorization-server": ("GET", discovery.document),
    "/admin/issue": ("POST", _admin_issue),
    "/admin/revoke": ("POST", _admin_revoke),
    "/admin/fault": ("POST", _admin_fault),
    "/admin/clear-faults": ("POST", _admin_clear_faults),
    "/admin/options": ("POST", _admin_options),
    "/admin/requests": ("GET", _admin_requests),
    "/admin/rotations": ("GET", _admin_rotations),
    "/admin/approve-device": ("POST", _admin_approve),
}


class DevProvider(ProviderState):
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
        options = Options(
            access_token_lifetime,
            refresh_token_rotation,
            access_token_length,
            refresh_token_reuse_interval=refresh_token_reuse_interval,
        )
        super().__init__(
            host=host,
            port=port,
            options=options,
            clients=clients,
            clock=clock,
            ssl_context=ssl_context,
            tenants=microsoft.DEFAULT_TENANTS,
        )
        self._listener = Listener(lambda handler: answer(self, self._route, handler))

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Listen and serve in a daemon thread. After stop(), restarts on the same port."""
        if self._listener.running:
            raise RuntimeError("already started")
        self.stopping.clear()
        self.port = self._listener.start(self.host, self.port, self.ssl_context)

    def stop(self) -> None:
        if not self._listener.running:
            return
        self.stopping.set()  # wakes hanging and delayed requests
        self._listener.stop()

    def __enter__(self) -> DevProvider:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def endpoints(self) -> dict[str, str]:
        return discovery.endpoints(self.url)

    def microsoft_endpoint(self, tenant: str, what: str = "token") -> str:
        """A Microsoft-shaped endpoint, /TENANT/oauth2/v2.0/WHAT, whose refusals carry
        AADSTS codes; an unknown tenant is AADSTS90002 (known: DEFAULT_TENANTS)."""
        return f"{self.url}/{tenant}/oauth2/v2.0/{what}"

    # -- controls ----------------------------------------------------------------------------

    def issue_refresh_token(
        self, user: str, *, client_id: str = "demo-client", scopes: Sequence[str] = DEFAULT_SCOPES
    ) -> str:
        """A refresh token as if `user` had just authorized `client_id`."""
        if not isinstance(user, str) or not user:
            raise ValueError("user must be a non-empty string")
        if client_id not in self.clients:
            raise ValueError(f"unknown client {client_id!r}")
        # A bare string is a space-separated scope list, not a sequence of letters.
        granted = tuple(scopes.split()) if isinstance(scopes, str) else tuple(scopes)
        with self.lock:
            return self.new_refresh_token(self.new_grant(user, client_id, granted))

    def revoke_user(self, user: str) -> None:
        """Revoke every grant of `user`: all its refresh and access tokens stop working."""
        with self.lock:
            for grant in self.grants:
                if grant.user == user:
                    grant.revoked = True

    def revoke_token(self, token: str) -> None:
        """RFC 7009: a refresh token takes its whole grant with it; an access token only itself."""
        endpoints.revoke_token(self, token)

    def add_fault(self, kind: str, *, count: int = 1, path: str = "/token", **params: Any) -> None:
        """Make the next `count` requests on `path` fail as `kind` says; faults queue in order."""
        fault = faults.checked(kind, count, path, params)
        with self.lock:
            self.faults.append(fault)

    def clear_faults(self) -> None:
        with self.lock:
            self.faults.clear()

    def set_options(self, **kw: Any) -> None:
        """Change access_token_lifetime, refresh_token_rotation, access_token_length,
        refresh_token_reuse_interval, device_interval or device_expires_in; they apply to
        tokens issued (or retired) from now on."""
        with self.lock:
            options = replace(self.options, **kw)  # TypeError for an unknown option
            options.check()
            self.options = options

    def approve_device(self, user_code: str, user: str) -> None:
        """Approve a pending device authorization as `user` (KeyError if unknown)."""
        device.approve(self, user_code, user)

    def deny_device(self, user_code: str) -> None:
        with self.lock:
            device.pending_device(self, user_code).status = "denied"

    def deny_next_authorization(self, error: str = "access_denied") -> None:
        """The next /authorize redirects back with this error instead of a code."""
        with self.lock:
            self.deny_next = error

    def expire_client_secret(self, client_id: str) -> None:
        """The client's secret has expired: it is refused (AADSTS7000222 on tenant routes)."""
        with self.lock:
            self.expired_secrets.add(client_id)

    def sign_in_next_as(self, user: str) -> None:
        """The next /authorize signs in as `user`, whatever the login_hint asks for."""
        with self.lock:
            self.next_user = user

    def set_id_token_claims(self, **claims: Any) -> None:
        """Claims merged into every ID token from now on (a None value removes the claim);
        with no arguments, ID tokens are as usual again."""
        with self.lock:
            self.id_token_claims = dict(claims)

    def set_response_issuer(self, iss: str | None) -> None:
        """The `iss` sent back with authorization responses (RFC 9207); None: none at all."""
        with self.lock:
            self.response_issuer = (iss,)

    # -- routing -----------------------------------------------------------------------------

    def _route(self, req: Request) -> Response:
        tenant, path = microsoft.split_tenant(req.path)
        route = _ROUTES.get(path)
        if route is None:
            return json_response({"error": "not_found", "error_description": req.path}, 404)
        method, handler = route
        if req.method != method:
            return json_response({"error": "method_not_allowed"}, 405, {"Allow": method})
        try:
            with self.lock:
                if tenant is not None and tenant not in self.tenants:
                    raise microsoft.unknown_tenant()
                return handler(self, req)
        except OAuthError as exc:
            if tenant is not None and (refusal := microsoft.refusal(exc, req, tenant)) is not None:
                return refusal
            return exc.response()
        except (KeyError, TypeError, ValueError) as exc:
            if not req.path.startswith("/admin/"):
                raise
            return OAuthError("invalid_request", f"{type(exc).__name__}: {exc}").response()
