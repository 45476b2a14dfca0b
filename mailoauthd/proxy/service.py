"""
The proxy as the daemon runs it: its listeners, the local login, the token, the upstream
login, and the counters `mailoauth status` shows.

A client names an account (its name or its `username`) and gives the account's local
proxy password. That is checked here, in constant time, before anything else happens:
a wrong one never reaches the provider or the mail server, waits a growing delay per
source address (common.Penalties) and is logged. A right one gets a token the way
`mailoauth token` does (the scheduler's single-flight refresh, the account's
min_validity), and the upstream login with it (upstream.py).
"""

from __future__ import annotations

import contextlib
import hmac
import ssl
import traceback
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import structlog
import trio

from mailoauthd import hostport
from mailoauthd.config import Account, ProxySettings
from mailoauthd.errors import ConfigError, MailoauthdError, ReauthorizationRequired, helper_command
from mailoauthd.proxy import upstream
from mailoauthd.proxy.common import (
    LOGIN_DEADLINE,
    READ_TIMEOUT,
    Closed,
    Denied,
    Limits,
    LineReader,
    LineTooLong,
    Outcome,
    Penalties,
    raise_open_files_limit,
    source_of,
    splice,
)
from mailoauthd.secret import Secret
from mailoauthd.storage.state import AccountState

log = structlog.get_logger(__name__)

# How long a login may wait for a token: as `mailoauth token`'s default.
TOKEN_TIMEOUT = 15.0
UPSTREAM_TIMEOUT = 30.0
KINDS = ("imap", "pop3", "smtp")


class Tokens(Protocol):
    """What the proxy needs of the scheduler."""

    @property
    def names(self) -> list[str]: ...
    def account(self, name: str) -> Account: ...
    def token_now(self, name: str, min_validity: float | None) -> AccountState | None: ...
    async def token(
        self, name: str, min_validity: float | None, deadline: float
    ) -> AccountState: ...


@dataclass
class Counter:
    open: int = 0
    total: int = 0


@dataclass
class Client:
    """One client connection, as a protocol handler sees it."""

    proxy: Proxy
    kind: str
    stream: trio.abc.Stream
    source: str
    tls: ssl.SSLContext | None
    must_encrypt: bool  # a listener others can reach: no password before STARTTLS
    encrypted: bool = False

    @property
    def read_timeout(self) -> float:
        return self.proxy.read_timeout

    async def command(self, reader: LineReader, too_long: str) -> str | None:
        """
        The next line before login, decoded; None when the connection is to end: the
        client left, or sent a line over the bound (and was told `too_long`).
        """
        try:
            raw = await reader.line(self.read_timeout)
        except LineTooLong:
            await self.send(too_long)
            return None
        except Closed:
            return None
        return raw.decode("utf-8", "replace").rstrip("\r\n")

    async def starttls(self, reader: LineReader) -> LineReader | None:
        """
        TLS with the client, once it was told to begin; the reader of the encrypted
        stream, or None when plaintext followed the command (a command injection
        attempt: the connection ends).
        """
        if reader.take_rest():
            return None
        assert self.tls is not None
        tls = trio.SSLStream(self.stream, self.tls, server_side=True)
        with trio.fail_after(self.read_timeout):
            await tls.do_handshake()
        self.stream = tls
        self.encrypted = True
        return LineReader(self.stream)

    async def relay(
        self, reader: LineReader, name: str, session: upstream.Session, success: str
    ) -> None:
        """Logged in: say `success`, pass on what either side sent ahead, then splice."""
        with self.proxy.session(name):
            await self.send(success)
            if pending := reader.take_rest():
                await session.stream.send_all(pending)
            if held := session.reader.take_rest():
                await self.stream.send_all(held)
            await splice(self.stream, session.stream)

    async def send(self, text: str) -> None:
        await self.stream.send_all(text.encode("utf-8") + b"\r\n")


Handler = Callable[[Client], Awaitable[None]]


def _one_line(text: str) -> str:
    """Text for a protocol answer: one line, printable, bounded."""
    return " ".join(text.split())[:400]


@dataclass
class Proxy:
    """The listeners, the local logins, and per-account session counters."""

    settings: ProxySettings
    tokens: Tokens
    passwords: Mapping[str, Secret]
    penalties: Penalties = field(default_factory=Penalties)
    read_timeout: float = READ_TIMEOUT
    upstream_timeout: float = UPSTREAM_TIMEOUT
    sessions: dict[str, Counter] = field(default_factory=dict)
    limits: dict[str, Limits] = field(default_factory=dict)
    listening: dict[str, str] = field(default_factory=dict)

    # --- the listeners -------------------------------------------------------------

    def tls_context(self) -> ssl.SSLContext | None:
        cert, key = self.settings.tls_certificate_file, self.settings.tls_key_file
        if cert is None or key is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(cert), str(key))
        return context

    async def serve(
        self, handlers: Mapping[str, Handler], *, task_status: trio.TaskStatus[None]
    ) -> None:
        """Bind every configured listener, then serve them until cancelled."""
        tls = self.tls_context()
        raise_open_files_limit()
        async with trio.open_nursery() as nursery:
            for kind, handler in handlers.items():
                where = getattr(self.settings, kind)
                if where is None:
                    continue
                host, port = hostport.parse(where)
                try:
                    listeners = await trio.open_tcp_listeners(port, host=host)
                except OSError as exc:
                    why = exc.strerror or str(exc)
                    raise ConfigError(
                        f"[proxy] {kind}: cannot listen on {where}: {why}",
                        hint="choose a free port, or stop what listens there",
                    ) from None
                bound = listeners[0].socket.getsockname()
                shown = hostport.join(bound[0], bound[1])
                self.listening[kind] = shown
                self.limits[kind] = Limits()
                serve = partial(
                    self._connection, kind, handler, tls, not hostport.is_loopback(host)
                )
                nursery.start_soon(trio.serve_listeners, serve, listeners)
                log.info("proxy.listening", protocol=kind, address=shown, starttls=tls is not None)
            task_status.started()

    async def _connection(
        self,
        kind: str,
        handler: Handler,
        tls: ssl.SSLContext | None,
        remote: bool,
        stream: trio.SocketStream,
    ) -> None:
        source = source_of(stream)
        limits = self.limits[kind]
        client = Client(self, kind, stream, source, tls, must_encrypt=remote)
        if not limits.admit(source):
            log.warning("proxy.busy", protocol=kind, source=source, open=limits.open)
            with contextlib.suppress(Exception), trio.move_on_after(5):
                await client.send(_BUSY[kind])
            await trio.aclose_forcefully(stream)
            return
        try:
            await handler(client)
        except (Closed, LineTooLong, trio.TooSlowError):
            pass  # the client hung up, sent too long a line, or went quiet
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError):
            pass
        except Exception as exc:  # a bug must end one connection, never the daemon
            log.error(
                "proxy.connection_failed",
                protocol=kind,
                source=source,
                error=f"{type(exc).__name__}: {exc}"[:500],
                where=traceback.format_tb(exc.__traceback__)[-1].strip()[:500],
            )
        finally:
            limits.release(source)
            with trio.move_on_after(1) as scope:
                scope.shield = True
                await trio.aclose_forcefully(client.stream)

    # --- logins --------------------------------------------------------------------

    def _account(self, user: str, password: str) -> Account | None:
        """The account this user and password name; every candidate compared in full."""
        given = password.encode("utf-8")
        found = None
        for name in self.tokens.names:
            account = self.tokens.account(name)
            if user != name and user.casefold() != (account.username or "").casefold():
                continue
            secret = self.passwords.get(name)
            if secret is None:
                continue
            if hmac.compare_digest(given, secret.reveal().encode("utf-8")) and found is None:
                found = account
        return found

    async def login(
        self, client: Client, user: str, password: str, *, helo: str = "localhost"
    ) -> tuple[str, upstream.Session]:
        """
        Check the local password, get a token, log in upstream.

        Raises:
            Denied: with the outcome and a text for the client (never a secret).
        """
        kind = client.kind
        account = self._account(user, password)
        if account is None:
            delay = self.penalties.failed(client.source)
            log.warning(
                "proxy.login_refused",
                protocol=kind,
                source=client.source,
                user=user[:200],
                failures=self.penalties.count(client.source),
                delay=delay,
            )
            await trio.sleep(delay)
            raise Denied(Outcome.BAD_PASSWORD, "invalid user name or password")
        name = account.name
        where = getattr(account, f"{kind}_server")
        if where is None or not account.username:
            missing = f"{kind}_server" if where is None else "username"
            raise Denied(Outcome.UNAVAILABLE, f"{name}: set {missing} in [accounts.{name}]")
        with trio.move_on_after(LOGIN_DEADLINE):
            token = await self._token(name)
            server = upstream.Server.parse(
                where, getattr(account, f"{kind}_security"), account.tls_ca_file
            )
            try:
                if kind == "imap":
                    session = await upstream.imap(
                        server, account.username, token.reveal(), wait=self.upstream_timeout
                    )
                elif kind == "pop3":
                    session = await upstream.pop3(
                        server, account.username, token.reveal(), wait=self.upstream_timeout
                    )
                else:
                    session = await upstream.smtp(
                        server,
                        account.username,
                        token.reveal(),
                        helo=helo,
                        wait=self.upstream_timeout,
                    )
            except upstream.Unavailable as exc:
                log.warning(
                    "proxy.upstream_unavailable", protocol=kind, account=name, error=str(exc)
                )
                raise Denied(Outcome.UNAVAILABLE, f"{name}: {exc}") from None
            except upstream.Refused as exc:
                log.warning(
                    "proxy.upstream_refused",
                    protocol=kind,
                    account=name,
                    reply=_one_line(exc.reply),
                )
                hint = (
                    f"the mail server refused a current token for {account.username}: "
                    f"check that {kind.upper()} access is enabled for the mailbox and the app "
                    "has the mail scopes"
                )
                raise Denied(Outcome.REFUSED, f"{_one_line(exc.reply)} ({hint})") from None
            log.info("proxy.login", protocol=kind, account=name, source=client.source)
            return name, session
        raise Denied(
            Outcome.UNAVAILABLE, f"{name}: the login took longer than {LOGIN_DEADLINE:g} s"
        )

    async def _token(self, name: str) -> Secret:
        try:
            state = self.tokens.token_now(name, None)
            if state is None:
                deadline = trio.current_time() + TOKEN_TIMEOUT
                with trio.move_on_at(deadline):
                    state = await self.tokens.token(name, None, deadline)
            if state is None:
                raise Denied(
                    Outcome.UNAVAILABLE, f"{name}: no valid token within {TOKEN_TIMEOUT:g} s"
                )
        except ReauthorizationRequired as exc:
            raise Denied(
                Outcome.NEEDS_AUTH, f"{exc.message}; run {helper_command('authorize', name)}"
            ) from None
        except MailoauthdError as exc:
            raise Denied(Outcome.UNAVAILABLE, _one_line(exc.message)) from None
        assert state.access_token is not None
        return state.access_token

    @contextlib.contextmanager
    def session(self, name: str) -> Iterator[None]:
        counter = self.sessions.setdefault(name, Counter())
        counter.open += 1
        counter.total += 1
        try:
            yield
        finally:
            counter.open -= 1

    # --- status --------------------------------------------------------------------

    def row(self, name: str) -> dict[str, object]:
        counter = self.sessions.get(name, Counter())
        return {"proxy_sessions_open": counter.open, "proxy_sessions_total": counter.total}

    def status(self) -> dict[str, object]:
        return {"listeners": dict(self.listening)}


_BUSY = {
    "imap": "* BYE [UNAVAILABLE] too many connections; try again later",
    "pop3": "-ERR [SYS/TEMP] too many connections; try again later",
    "smtp": "421 4.7.0 too many connections; try again later",
}
