"""
Sign-in sessions, the I/O of `mailoauth authorize`: the loopback redirect listener, device polls.

A session lives on the helper's connection (server.Channel): it sends the
helper event lines (the URL to open, or the code to enter; progress), takes
pasted redirect addresses from it, and ends with the final answer, when the
flow fails, after AUTHORIZE_TIMEOUT, or when the helper hangs up. The browser's HTTP
requests are read and answered in signin_listener.py (h11). The pure
parts (PKCE, state, URL, redirect and device answers) are in authorize.py.

Token exchanges are shielded from cancellation, like refreshes: once a code is
on its way to the provider it is spent, so what comes back is stored even if
the helper has gone.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Protocol

import httpx
import structlog
import trio

from mailoauthd import protocol
from mailoauthd.authorization import authorize, signin_listener, signin_page
from mailoauthd.config import Account
from mailoauthd.errors import (
    CANCELLED,
    AuthorizationFailed,
    MailoauthdError,
    Misconfigured,
    ProtocolError,
    ReauthorizationRequired,
    TransientGrantError,
    helper_command,
)
from mailoauthd.flows import Flow
from mailoauthd.lastresort import fault
from mailoauthd.provider import idtoken, oauth, provider_http
from mailoauthd.secret import Secret
from mailoauthd.storage.state import AccountState

log = structlog.get_logger(__name__)

# 10 min: time to find the browser window, sign in and pass MFA; a session
# left open longer holds a port and a connection for nobody.
AUTHORIZE_TIMEOUT = 600.0
# Browser connections served at once on the loopback listener. A browser opens a few;
# any more wait in the listen queue, where they cost the daemon no descriptor (1,500
# connections to an uncapped listener used up the daemon's descriptors).
MAX_BROWSER_CONNECTIONS = 16
# Transient failures while polling for a device code: back off up to this.
MAX_POLL_INTERVAL = 60


class Channel(Protocol):
    """What a session needs of the helper's connection (server.Channel)."""

    async def send(self, message: dict[str, object]) -> None: ...

    async def receive(self) -> dict[str, object] | None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Session:
    """Everything one sign-in needs, handed over by the daemon."""

    account: Account  # with its profile's discovered endpoints filled in
    client: oauth.Client
    http: httpx.AsyncClient
    request_timeout: float
    now: Callable[[], datetime]
    store: Callable[[oauth.TokenSet], Awaitable[AccountState]]  # persists; then they are used


class _HungUp(Exception):
    """The helper closed the connection: the person gave up (Ctrl-C)."""


async def run(session: Session, channel: Channel, flow: str) -> dict[str, object]:
    """
    Run one sign-in to its end.

    Args:
        session: the account and the means.
        channel: the helper's connection.
        flow: one of flows.SIGN_IN_FLOWS.

    Returns:
        The final answer: the account, the access token's expiry, a note.

    Raises:
        MailoauthdError: the sign-in failed; nothing was stored.
    """
    name = session.account.name
    with structlog.contextvars.bound_contextvars(account=name):
        log.info("authorize.started", flow=flow)
        try:
            if flow == Flow.DEVICE_CODE:
                st = await _device_flow(session, channel)
            else:
                st = await _browser_flow(session, channel)
        except (_HungUp, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            # TooSlowError: only Channel.send raises it (a helper that stopped reading).
            log.info("authorize.abandoned", reason="the helper hung up")
            return protocol.error_reply(CANCELLED, f"{name}: cancelled")
        except MailoauthdError as exc:
            log.warning("authorize.failed", flow=flow, error=exc.message)
            raise _for_sign_in(exc, name) from None
    note = None
    if st.refresh_token is None:
        note = (
            "the provider issued no refresh token, so this works only until the access token "
            "expires; ask for offline access (scope 'offline_access' at Microsoft and most "
            "others, access_type=offline at Google)"
        )
    elif st.refresh_token_issued_at != st.last_refresh:
        # RFC 6749 §6: no refresh token in the answer (consent already given): the
        # one held still works and was kept.
        note = "the provider issued no new refresh token; the one held is kept and still used"
    expires_at = st.expires_at
    return {
        "ok": True,
        "account": name,
        "expires_at": expires_at.isoformat(timespec="seconds") if expires_at else None,
        "expires_in": round(st.valid_for(session.now())),
        "note": note,
    }


async def _tell(channel: Channel, message: dict[str, object]) -> None:
    """Send progress; a helper that has gone is noticed by the reader, not here."""
    with contextlib.suppress(
        trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, OSError
    ):
        await channel.send(message)


async def _post(session: Session, request: httpx.Request, what: str) -> httpx.Response:
    try:
        with trio.fail_after(session.request_timeout):
            return await provider_http.send(session.http, request, what=what)
    except trio.TooSlowError:
        raise TransientGrantError(
            f"{what} did not answer within {session.request_timeout:g} s"
        ) from None


def _for_sign_in(exc: MailoauthdError, account: str) -> MailoauthdError:
    """
    A sign-in's failure in true words: it names the account, and says nothing keeps
    retrying (the default hint of a transient error) when nothing does.
    """
    if not exc.message.startswith(f"{account}:"):
        exc.message = f"{account}: {exc.message}"
    if isinstance(exc, TransientGrantError) and (not exc.hint or "keeps retrying" in exc.hint):
        exc.hint = (
            "this is usually temporary, but a sign-in is not retried: "
            f"run {helper_command('authorize', account)} again in a while"
        )
    return exc


def _refused(exc: ReauthorizationRequired, account: str) -> AuthorizationFailed:
    return AuthorizationFailed(
        f"{account}: {exc.message}",
        hint=f"run {helper_command('authorize', account)} again",
        oauth_error=exc.oauth_error,
    )


# --- authorization code with PKCE, loopback redirect and paste-back -------------------------


class _CodeFlow:
    """One authorization request, its answers from the browser or the helper, and the result."""

    def __init__(self, session: Session, channel: Channel, auth: authorize.Authorization) -> None:
        self.session = session
        self.channel = channel
        self.auth = auth
        self.result: AccountState | MailoauthdError | None = None
        self.hung_up = False
        self.done = trio.Event()  # set once the result is known and the browser has its page
        self._lock = trio.Lock()  # one answer at a time: the first good one wins

    async def deliver(self, query: str, *, via: str) -> signin_page.Page:
        """
        Take an answer (the redirect's query, or a pasted address).

        Returns:
            The page for the browser.
        """
        name = self.session.account.name
        async with self._lock:
            if self.result is not None:
                return signin_page.notice(
                    409,
                    "Already finished",
                    f"This sign-in to {name} is already finished. " + signin_page.CLOSE,
                )
            try:
                code = authorize.parse_redirect(query, self.auth, account=name)
            except authorize.ForeignRedirect as exc:
                log.warning("authorize.redirect_rejected", via=via, reason=exc.message)
                await _tell(
                    self.channel, {"event": "rejected", "message": exc.message, "hint": exc.hint}
                )
                return signin_page.notice(400, "Not this sign-in", f"{exc.message}; {exc.hint}.")
            except AuthorizationFailed as exc:
                self.result = exc
                return signin_page.failed(403, "Sign-in refused", name, exc.message, exc.hint)
            log.info("authorize.code_received", via=via)
            await _tell(self.channel, {"event": "exchanging", "via": via})
            try:
                st = await self._exchange(code)
            except MailoauthdError as exc:
                self.result = exc
                return signin_page.failed(400, "Sign-in failed", name, exc.message, exc.hint)
            self.result = st
            return signin_page.signed_in(name, self.session.account.username, st.expires_at)

    async def _exchange(self, code: Secret) -> AccountState:
        s = self.session
        request = oauth.authorization_code_request(
            s.client, code, self.auth.redirect_uri, self.auth.verifier
        )
        with trio.CancelScope(shield=True):
            response = await _post(s, request, "the token endpoint")
            try:
                tokens = oauth.parse_token_response(
                    response, now=s.now(), account=s.account.name, subject="the authorization code"
                )
            except ReauthorizationRequired as exc:
                raise _refused(exc, s.account.name) from None
            idtoken.check_id_token(tokens.id_token, s.account, nonce=self.auth.nonce)
            stored = await s.store(tokens)
        return stored

    async def browser(self, stream: trio.SocketStream) -> None:
        """Serve one connection of the browser on the loopback listener."""
        async with stream:
            if not await signin_listener.serve(stream, partial(self.deliver, via="browser")):
                return
            if self.result is not None:
                self.done.set()

    async def pasted(self) -> None:
        """Take pasted addresses from the helper until the result is known or it hangs up."""
        while True:
            try:
                message = await self.channel.receive()
            except ProtocolError as exc:
                message = {"op": "malformed", "error": exc.message}
            if message is None:
                self.hung_up = True
                self.done.set()
                return
            url = message.get("url")
            if message.get("op") != "redirect" or not isinstance(url, str):
                await _tell(
                    self.channel,
                    {"event": "rejected", "message": "expected a pasted address", "hint": ""},
                )
                continue
            await self.deliver(url, via="paste")
            if self.result is not None:
                self.done.set()


_NO_IPV6 = (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT)


async def _serve_browsers(
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    listeners: list[trio.SocketListener],
) -> None:
    """trio.serve_listeners, with at most MAX_BROWSER_CONNECTIONS accepted at once."""
    slots = trio.Semaphore(MAX_BROWSER_CONNECTIONS)

    async def serve(stream: trio.SocketStream) -> None:
        try:
            await handler(stream)
        except Exception as exc:  # the last resort: one page's fault is not the sign-in's
            fault("authorize.browser_fault", exc)
        finally:
            slots.release()

    async def accept(listener: trio.SocketListener) -> None:
        while True:
            await slots.acquire()
            try:
                stream = await listener.accept()
            except OSError as exc:  # EMFILE and friends: back off, the queue keeps them
                slots.release()
                log.warning("authorize.accept_failed", error=exc.strerror or str(exc))
                await trio.sleep(0.1)
                continue
            nursery.start_soon(serve, stream)

    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(accept, listener)


async def _browser_flow(session: Session, channel: Channel) -> AccountState:
    account = session.account
    port = account.provider.redirect_port or 0
    try:
        listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    except OSError as exc:
        raise MailoauthdError(
            f"{account.name}: cannot listen on 127.0.0.1:{port} for the browser's return: "
            f"{exc.strerror or exc}",
            hint="another sign-in may be using this redirect_port; finish it or try again",
        ) from exc
    try:
        port = listeners[0].socket.getsockname()[1]
        host = authorize.redirect_host(account.provider)
        if host == "localhost":
            # A browser may try ::1 for localhost first: if another user holds that port
            # on ::1, the browser would take the code to them. Only a system without
            # IPv6 loopback (where nobody can hold it) is let off.
            try:
                listeners += await trio.open_tcp_listeners(port, host="::1")
            except OSError as exc:
                if isinstance(exc, socket.gaierror) or exc.errno in _NO_IPV6:
                    log.info("authorize.no_ipv6_loopback", error=exc.strerror or str(exc))
                else:
                    raise MailoauthdError(
                        f"{account.name}: cannot listen on [::1]:{port} for the browser's "
                        f"return: {exc.strerror or exc}",
                        hint="another program holds this port on the IPv6 loopback and could "
                        "receive the sign-in; stop it, or choose another redirect_port",
                    ) from exc
        auth = authorize.start(account, f"http://{host}:{port}/")
        flow = _CodeFlow(session, channel, auth)
        await channel.send(
            {
                "event": "authorize",
                "url": auth.url,
                "redirect_uri": auth.redirect_uri,
                "expires_in": int(AUTHORIZE_TIMEOUT),
            }
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_serve_browsers, flow.browser, listeners)
            nursery.start_soon(flow.pasted)
            with trio.move_on_after(AUTHORIZE_TIMEOUT):
                await flow.done.wait()
            nursery.cancel_scope.cancel()
    finally:
        for listener in listeners:
            await listener.aclose()
    if isinstance(flow.result, MailoauthdError):
        raise flow.result
    if flow.result is not None:
        return flow.result
    if flow.hung_up:
        raise _HungUp
    minutes = AUTHORIZE_TIMEOUT / 60
    raise AuthorizationFailed(
        f"{account.name}: nobody completed the sign-in within {minutes:g} minutes",
        hint=f"run {helper_command('authorize', account.name)} again",
    )


# --- the device authorization grant -----------------------------------------------------


async def _device_flow(session: Session, channel: Channel) -> AccountState:
    account = session.account
    endpoint = account.provider.device_authorization_endpoint
    if not endpoint:
        name = account.provider.name
        raise Misconfigured(
            f"{account.name}: provider {name!r} has no device_authorization_endpoint",
            hint=f"set device_authorization_endpoint (or issuer) in [providers.{name}], "
            "or sign in with a browser: "
            + helper_command("authorize", account.name, "--flow", Flow.AUTHORIZATION_CODE),
        )
    what = "the device authorization endpoint"
    request = oauth.device_authorization_request(session.client, endpoint, account.scopes)
    grant = authorize.parse_device_authorization(
        await _post(session, request, what), now=session.now(), account=account.name
    )
    grant = authorize.shown_device_authorization(grant, account=account.name)
    await channel.send(
        {
            "event": "device",
            "verification_uri": grant.verification_uri,
            "verification_uri_complete": grant.verification_uri_complete,
            "user_code": grant.user_code,
            "expires_in": grant.expires_in,
            "interval": grant.interval,
            "message": grant.message,
        }
    )
    outcome: list[AccountState | MailoauthdError] = []

    async def watch() -> None:
        while True:
            with contextlib.suppress(ProtocolError):  # nothing to paste in this flow
                if await channel.receive() is None:
                    break
        nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        try:
            outcome.append(await _poll(session, channel, grant))
        except MailoauthdError as exc:
            # Raised out of the nursery it would come wrapped in an exception group.
            outcome.append(exc)
        nursery.cancel_scope.cancel()
    if not outcome:
        raise _HungUp
    if isinstance(outcome[0], MailoauthdError):
        raise outcome[0]
    return outcome[0]


async def _poll(
    session: Session, channel: Channel, grant: authorize.DeviceAuthorization
) -> AccountState:
    name = session.account.name
    interval = grant.interval
    deadline = trio.current_time() + grant.expires_in
    while trio.current_time() < deadline:
        await trio.sleep(interval)  # RFC 8628 §3.5: wait the interval before each poll
        request = oauth.device_token_request(session.client, grant.device_code)
        try:
            # Shielded: approved tokens come once, and must be stored even on shutdown.
            with trio.CancelScope(shield=True):
                response = await _post(session, request, "the token endpoint")
                answer = authorize.parse_device_poll(response, now=session.now(), account=name)
                if isinstance(answer, oauth.TokenSet):
                    idtoken.check_id_token(answer.id_token, session.account, nonce=None)
                    return await session.store(answer)
        except TransientGrantError as exc:
            interval = min(interval * 2, MAX_POLL_INTERVAL)
            log.warning("authorize.poll_failed", error=exc.message, retry_in=interval)
            await _tell(channel, {"event": "retrying", "message": exc.message, "in": interval})
            continue
        except ReauthorizationRequired as exc:
            raise _refused(exc, name) from None
        if answer == authorize.SLOW_DOWN:
            interval = min(interval + 5, MAX_POLL_INTERVAL)  # RFC 8628 §3.5
            log.info("authorize.slow_down", interval=interval)
            await _tell(channel, {"event": "slow_down", "interval": interval})
    raise AuthorizationFailed(
        f"{name}: the code expired before anyone signed in with it",
        hint=f"run {helper_command('authorize', name)} again, and enter the new code in time",
    )
