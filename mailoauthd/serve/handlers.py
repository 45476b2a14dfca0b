"""
The answers to socket requests: one method per row of ops.OPS, and the access gate.

The server hands every checked request (request.parse) here: `handle` for most,
`converse` for a conversation (`authorize`), `answer_now` for a token that can be
served from memory in the accept loop, and `gate` before any of them. Which
method answers which operation is the table's `handler` column; this module
knows the daemon's parts (scheduler, policy, configuration) through `Parts`, which
the Daemon that owns it is (a protocol, so handlers never imports daemon), and
nothing of sockets beyond the Channel a conversation gets.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from datetime import datetime
from functools import partial
from typing import Any, Protocol

import httpx
import structlog
import trio

from mailoauthd import __version__, config, protocol
from mailoauthd.errors import (
    Busy,
    ConfigError,
    MailoauthdError,
    ReauthorizationRequired,
    TimedOut,
    UnknownAccount,
    UsageError,
    helper_command,
)
from mailoauthd.flows import SIGN_IN_FLOWS, Flow
from mailoauthd.provider.discovery import Discovery
from mailoauthd.provider.provider_input import is_b64token
from mailoauthd.refresh.scheduler import Scheduler
from mailoauthd.serve.access import Policy
from mailoauthd.serve.channel import Channel
from mailoauthd.serve.limits import LogLimit
from mailoauthd.serve.ops import OPS
from mailoauthd.serve.peers import Peer
from mailoauthd.serve.request import Request, shown
from mailoauthd.storage import fleetd
from mailoauthd.storage.state import AccountState
from mailoauthd.storage.store import GrantStore

log = structlog.get_logger(__name__)

# Bounds on what a request may ask us to wait: a mail program should never
# hang for minutes on a password command.
MAX_REQUEST_TIMEOUT = 300.0
DEFAULT_REQUEST_TIMEOUT = 15.0
# `refresh` and `import` are run by people, who can wait for a slow provider.
DEFAULT_ADMIN_TIMEOUT = 60.0
# `token --wait`: an hour is long enough for a person to notice and sign in,
# and bounds a mail program's hang if nobody does.
MAX_AUTHORIZATION_WAIT = 3600.0


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


class ProxyCounters(Protocol):
    """What the status reply reads of the mail proxy when it runs (proxy.Proxy)."""

    def row(self, name: str) -> dict[str, object]:
        """One account's session counters, joined to its status row."""
        ...

    def status(self) -> dict[str, object]:
        """The proxy's own part of the reply (its listeners)."""
        ...


class Parts(Protocol):
    """What the handlers use of the daemon that owns them (daemon.Daemon)."""

    config: config.Config
    http: httpx.AsyncClient  # for sign-ins
    now: Callable[[], datetime]
    scheduler: Scheduler
    policy: Policy
    discovery: Discovery
    last_reload_error: str | None
    store: GrantStore  # a fleet's store: its health joins the status

    @property
    def proxy(self) -> ProxyCounters | None:
        """The mail proxy when [proxy] runs one: its counters join the status."""
        ...

    async def reload(self) -> bool:
        """Read the configuration again; False (and last_reload_error) if it was refused."""
        ...


class Handlers:
    """What the daemon answers to each operation; the methods are named in ops.OPS."""

    def __init__(self, daemon: Parts) -> None:
        self.daemon = daemon
        self._signing_in: set[str] = set()  # accounts with a sign-in in progress
        self._refusals = LogLimit()  # refusals logged per uid: a refused loop must not flood
        # Fixed for the process (the CLI configures logging once), and asked for
        # every token served: looking it up through structlog's proxy costs more.
        self._debug = log.is_enabled_for(logging.DEBUG)
        # op -> bound method; a row naming no method fails here, at start-up.
        self._by_op: dict[str, Any] = {name: getattr(self, op.handler) for name, op in OPS.items()}

    # --- dispatch ---------------------------------------------------------------

    async def handle(self, request: Request, peer: Peer) -> dict[str, object]:
        """Answer one request (checked by request.parse); errors propagate as MailoauthdError."""
        try:
            answer: dict[str, object] = await self._by_op[request.op](request, peer)
        except UnknownAccount as exc:
            # The names this caller may use, for the helper's "did you mean".
            policy = self.daemon.policy
            names = [name for name in self.daemon.config.accounts if policy.visible(peer, name)]
            return {
                **protocol.error_reply(exc.code, exc.message, exc.hint),
                "account": request.account or "",
                "accounts": names,
            }
        return answer

    async def converse(self, request: Request, peer: Peer, channel: Channel) -> dict[str, object]:
        """Run a conversation (a row with `conversation`); returns its final answer."""
        answer: dict[str, object] = await self._by_op[request.op](request, peer, channel)
        return answer

    def gate(self, request: Request, peer: Peer) -> None:
        """The server asks before every request; raises AccessDenied to refuse (system mode)."""
        refusal = self.daemon.policy.refusal(request.op, request.account, peer)
        if refusal is not None:
            if self._refusals.allow(peer.uid, trio.current_time()):
                log.info(
                    "request.refused",
                    uid=peer.uid,
                    pid=peer.pid,
                    exe=exe(peer.pid),
                    op=request.op,
                    # request.parse let through only names as the configuration
                    # allows them: at most 64 characters, nothing to escape.
                    account=request.account,
                    reason=refusal.reason,
                    **self._refusals.suppressed(peer.uid),
                )
            raise refusal.error

    def answer_now(self, request: Request, peer: Peer) -> dict[str, object] | None:
        """The answer to a token request that needs no waiting; None when `handle` must wait."""
        if request.op != "token":
            return None
        name = request.name
        if not self.daemon.policy.may_use(peer, name):
            return None  # `gate` refuses it, and logs that, on the general path
        min_validity = request.min_validity  # negative: the account's own, as None
        if min_validity is not None and min_validity < 0:
            min_validity = None
        st = self.daemon.scheduler.token_now(name, min_validity)
        return None if st is None else self._token_reply(name, st, peer)

    # --- one method per operation (ops.OPS) ----------------------------------------

    async def token(self, request: Request, peer: Peer) -> dict[str, object]:
        """A valid access token, refreshed first if needed; with `wait`, waits for a sign-in."""
        scheduler = self.daemon.scheduler
        name = request.name
        min_validity = _or(request.min_validity, -1.0)
        timeout = min(_or(request.timeout, DEFAULT_REQUEST_TIMEOUT), MAX_REQUEST_TIMEOUT)
        # `token --wait`: an account that needs a person is waited for, not failed at once.
        wait = min(max(0.0, _or(request.wait, 0.0)), MAX_AUTHORIZATION_WAIT)
        give_up = trio.current_time() + wait
        while True:
            deadline = trio.current_time() + max(0.0, timeout)
            try:
                with trio.move_on_at(deadline):
                    st = await scheduler.token(
                        name, None if min_validity < 0 else min_validity, deadline
                    )
                    return self._token_reply(name, st, peer)
            except ReauthorizationRequired:
                if trio.current_time() >= give_up:
                    raise
                with trio.move_on_at(give_up):
                    await scheduler.wait_changed(name)
                continue
            raise self._timed_out(name, timeout)

    async def status(self, request: Request, peer: Peer) -> dict[str, object]:
        """Every account this peer may see, and the proxy's counters when it runs."""
        daemon = self.daemon
        rows = [
            r for r in daemon.scheduler.status() if daemon.policy.visible(peer, str(r["account"]))
        ]
        reply: dict[str, object] = {"ok": True, "version": __version__, "accounts": rows}
        if daemon.proxy is not None:
            for row in rows:
                row.update(daemon.proxy.row(str(row["account"])))
            reply.update(daemon.proxy.status())
        return {**reply, **fleetd.health(daemon.store)}

    async def reload(self, request: Request, peer: Peer) -> dict[str, object]:
        """Re-read the configuration, as SIGHUP does; refused with its problems."""
        if not await self.daemon.reload():
            raise ConfigError(self.daemon.last_reload_error or "the configuration was not reloaded")
        return {"ok": True, "accounts": len(self.daemon.config.accounts)}

    async def refresh(self, request: Request, peer: Peer) -> dict[str, object]:
        """Refresh now, whatever the schedule says."""
        scheduler = self.daemon.scheduler
        name = request.name
        st = await self._bounded(name, request, partial(scheduler.refresh, name))
        return {"ok": True, "account": name, **_expiry(st.expires_at, self.daemon.now())}

    async def import_token(self, request: Request, peer: Peer) -> dict[str, object]:
        """Store a refresh token got elsewhere, then refresh with it."""
        scheduler = self.daemon.scheduler
        name = request.name
        token = request.refresh_token
        assert token is not None  # ops.OPS makes request.parse require it for `import`
        if not is_b64token(token.reveal()):
            raise UsageError(
                f"{name}: that is not a refresh token: it has characters RFC 6750 does "
                "not allow in one, or is too long (not shown)",
                hint="paste only the token itself",
            )
        if request.client_id is not None:  # `import --from`: the client the other tool used
            self._same_client(name, request.client_id)
        st = await self._bounded(name, request, partial(scheduler.import_token, name, token))
        return {"ok": True, "account": name, **_expiry(st.expires_at, self.daemon.now())}

    async def revoke(self, request: Request, peer: Peer) -> dict[str, object]:
        """Revoke at the provider where it can, and forget the account's tokens."""
        name = request.name
        return {"ok": True, "account": name, "note": await self.daemon.scheduler.forget(name)}

    async def ping(self, request: Request, peer: Peer) -> dict[str, object]:
        """Whether the daemon answers, and which one."""
        return {"ok": True, "version": __version__, "pid": os.getpid()}

    async def servers(self, request: Request, peer: Peer) -> dict[str, object]:
        """What `mailoauth test` needs to log in as the account."""
        return _servers(self.daemon.scheduler.account(request.name))

    async def authorize(self, request: Request, peer: Peer, channel: Channel) -> dict[str, object]:
        """`mailoauth authorize`: a conversation that runs one sign-in (signin.py)."""
        scheduler = self.daemon.scheduler
        name = request.name
        account = scheduler.account(name)
        if account.flow == Flow.CLIENT_CREDENTIALS:
            return {
                "ok": True,
                "account": name,
                "note": "this account uses client_credentials: mailoauthd gets its tokens "
                "with the client secret, and nobody needs to sign in",
            }
        flow = request.flow or account.flow
        if flow not in SIGN_IN_FLOWS:
            raise UsageError(
                f"--flow must be one of {', '.join(SIGN_IN_FLOWS)} (got {shown(flow)})"
            )
        if name in self._signing_in:
            raise Busy(
                f"{name}: a sign-in is already in progress",
                hint="finish it, or stop its 'mailoauth authorize' (Ctrl-C), first",
            )
        # Loaded at the first sign-in, not at start: with h11 and the sign-in page, it is
        # a share of every start's imports that most starts never use (docs/performance.md).
        from mailoauthd.authorization import signin

        self._signing_in.add(name)
        try:
            log.info("authorize.requested", account=name, flow=flow, uid=peer.uid, pid=peer.pid)
            account = await self.daemon.discovery.account(account)
            session = signin.Session(
                account=account,
                client=scheduler.client(account),
                http=self.daemon.http,
                request_timeout=self.daemon.config.daemon.request_timeout.total_seconds(),
                now=self.daemon.now,
                store=partial(scheduler.authorized, name),
            )
            return await signin.run(session, channel, str(flow))
        finally:
            self._signing_in.discard(name)

    # --- helpers ----------------------------------------------------------------

    def _same_client(self, name: str, client_id: str) -> None:
        """A refresh token works only with the client that got it: refuse another's."""
        provider = self.daemon.scheduler.account(name).provider
        if client_id != provider.client_id:
            raise UsageError(
                f"{name}: the refresh token was issued to client {client_id!r}, but "
                f"[providers.{provider.name}] has client_id {provider.client_id!r}; a refresh "
                "token works only with the client that got it",
                hint=f"set client_id = {client_id!r} and that client's secret in a provider "
                f"for {name}, or sign in afresh with {helper_command('authorize', name)}",
            )

    async def _bounded(
        self,
        name: str,
        request: Request,
        work: Callable[[], Awaitable[AccountState]],
    ) -> AccountState:
        timeout = min(_or(request.timeout, DEFAULT_ADMIN_TIMEOUT), MAX_REQUEST_TIMEOUT)
        with trio.move_on_after(max(0.0, timeout)):
            return await work()
        raise self._timed_out(name, timeout)

    def _token_reply(self, name: str, st: AccountState, peer: Peer) -> dict[str, object]:
        assert st.access_token is not None
        if self._debug:
            log.debug("token.served", account=name, uid=peer.uid, pid=peer.pid, exe=exe(peer.pid))
        return {
            "ok": True,
            "token": st.access_token.reveal(),
            "expires_at": int(st.expires_at.timestamp()) if st.expires_at else None,
            "username": self.daemon.scheduler.account(name).username or "",
        }

    def _timed_out(self, name: str, timeout: float) -> MailoauthdError:
        last = self.daemon.scheduler.last_error(name)
        why = f"; last error: {last}" if last else ""
        return TimedOut(f"{name}: no valid token within {timeout:g} s{why}")


def exe(pid: int) -> str | None:
    """
    The peer's executable, for the log: its path, or else its name (/proc/PID/comm).

    Only root may read the path of another user's process; a system daemon under its
    own uid still sees the name, as `ps` does.
    """
    with contextlib.suppress(OSError):
        return os.readlink(f"/proc/{pid}/exe")
    with contextlib.suppress(OSError, UnicodeDecodeError):
        with open(f"/proc/{pid}/comm", encoding="utf-8") as comm:
            return comm.read().strip() or None
    return None


def _servers(account: config.Account) -> dict[str, object]:
    """What `mailoauth test` needs to log in as the account: servers, TLS, user."""
    ca_file = account.tls_ca_file
    return {
        "ok": True,
        "account": account.name,
        "username": account.username or "",
        "imap_server": account.imap_server,
        "imap_security": account.imap_security,
        "smtp_server": account.smtp_server,
        "smtp_security": account.smtp_security,
        "tls_ca_file": str(ca_file) if ca_file is not None else None,
    }


def _expiry(expires_at: datetime | None, now: datetime) -> dict[str, object]:
    if expires_at is None:
        return {"expires_at": None, "expires_in": None}
    return {
        "expires_at": expires_at.isoformat(timespec="seconds"),
        "expires_in": round((expires_at - now).total_seconds()),
    }
