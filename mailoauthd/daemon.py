"""
The composition root: opens the store and the socket, starts server and scheduler, handles signals.

The only module that knows everyone. `server` reaches the scheduler through
the handler defined here; `scheduler` knows nothing of sockets.

    run:    config → store.open (lock) → bind → schedule → serve → READY=1
    reload: SIGHUP → RELOADING=1 → config.load → keep the old one on error → READY=1
    stop:   SIGTERM/SIGINT → STOPPING=1 → cancel → in-flight refreshes finish → socket removed
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from functools import partial
from pathlib import Path

import httpx
import structlog
import trio

from mailoauthd import __version__, config, fleetd, oauth, paths, protocol, proxy, signin, tokenfile
from mailoauthd.access import Policy
from mailoauthd.alerts import NEEDS_AUTHORIZATION, REFRESH_TOKEN_EXPIRING, Reminders
from mailoauthd.discovery import Discovery
from mailoauthd.errors import (
    Busy,
    ConfigError,
    GrantError,
    MailoauthdError,
    ProtocolError,
    ReauthorizationRequired,
    TimedOut,
    UnknownAccount,
    UsageError,
)
from mailoauthd.lastresort import guarded
from mailoauthd.limits import LogLimit
from mailoauthd.provider_input import is_b64token
from mailoauthd.request import Request, shown
from mailoauthd.scheduler import Scheduler
from mailoauthd.secret import Secret
from mailoauthd.server import Channel, Peer, Server, bind, inherited, listen_fds
from mailoauthd.state import AccountState
from mailoauthd.store import GrantStore
from mailoauthd.systemd import Notifier

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
SIGN_IN_FLOWS = ("authorization_code", "device_code")
# STATUS= is recomputed this often for `systemctl status`, and sent when it changed:
# a state change shows within seconds, at the cost of a cheap string compare.
STATUS_INTERVAL = 5.0


def read_secrets(
    cfg: config.Config, env: Mapping[str, str] | None = None
) -> dict[str, Secret | None]:
    """Every provider's client secret, read now (files, commands); `env` for $VAR in paths."""
    secrets: dict[str, Secret | None] = {}
    for name, provider in cfg.providers.items():
        source = provider.client_secret
        secrets[name] = (
            source.read(where=f"{cfg.source}: [providers.{name}] {source.key}", env=env)
            if source is not None
            else None
        )
    return secrets


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


class Daemon:
    """A running daemon: its configuration, store, scheduler and server."""

    def __init__(
        self,
        cfg: config.Config,
        *,
        config_path: Path | None,
        store: GrantStore,
        scheduler: Scheduler,
        notifier: Notifier,
        socket_path: Path,
        system: bool,
        policy: Policy,
        discovery: Discovery,
        reminders: Reminders,
    ) -> None:
        self.config = cfg
        self.config_path = config_path
        self.store = store
        self.scheduler = scheduler
        self.notifier = notifier
        self.socket_path = socket_path
        self.policy = policy
        self.last_reload_error: str | None = None
        self.discovery = discovery
        self.reminders = reminders
        self._signing_in: set[str] = set()  # accounts with a sign-in in progress
        self.proxy: proxy.Proxy | None = None  # [proxy]: listeners and session counters
        self._refusals = LogLimit()  # refusals logged per uid: a refused loop must not flood
        # Fixed for the process (the CLI configures logging once), and asked for
        # every token served: looking it up through structlog's proxy costs more.
        self._debug = log.is_enabled_for(logging.DEBUG)
        self.server = Server(
            self.handle,
            allowed_uids=None if system else {os.geteuid(), 0},
            gate=self._gate,
            peer_groups=system,
            quick=self.answer_now,
            conversations={"authorize": self._authorize},
            privileged=lambda peer: self.policy.is_admin(peer),
        )

    # --- requests ----------------------------------------------------------------

    async def handle(self, request: Request, peer: Peer) -> dict[str, object]:
        """Answer one request (checked by request.parse); errors propagate as MailoauthdError."""
        try:
            return await self._handle(request, peer)
        except UnknownAccount as exc:
            # The names this caller may use, for the helper's "did you mean".
            names = [name for name in self.config.accounts if self.policy.visible(peer, name)]
            return {
                **protocol.error_reply(exc.code, exc.message, exc.hint),
                "account": request.account or "",
                "accounts": names,
            }

    async def _handle(self, request: Request, peer: Peer) -> dict[str, object]:
        op = request.op
        if op == "token":
            return await self._token(request, peer)
        if op == "status":
            rows = [
                r for r in self.scheduler.status() if self.policy.visible(peer, str(r["account"]))
            ]
            if self.proxy is not None:
                for row in rows:
                    row.update(self.proxy.row(str(row["account"])))
                return {
                    "ok": True,
                    "version": __version__,
                    "accounts": rows,
                    **self.proxy.status(),
                    **fleetd.health(self.store),
                }
            return {
                "ok": True,
                "version": __version__,
                "accounts": rows,
                **fleetd.health(self.store),
            }
        if op == "reload":
            if not await self.reload():
                raise ConfigError(self.last_reload_error or "the configuration was not reloaded")
            return {"ok": True, "accounts": len(self.config.accounts)}
        if op == "refresh":
            name = request.name
            st = await self._bounded(name, request, partial(self.scheduler.refresh, name))
            return {"ok": True, "account": name, **_expiry(st.expires_at, self.scheduler.now())}
        if op == "import":
            name = request.name
            token = request.refresh_token
            assert token is not None  # request.parse requires it for `import`
            if not is_b64token(token.reveal()):
                raise UsageError(
                    f"{name}: that is not a refresh token: it has characters RFC 6750 does "
                    "not allow in one, or is too long (not shown)",
                    hint="paste only the token itself",
                )
            if request.client_id is not None:  # `import --from`: the client the other tool used
                self._same_client(name, request.client_id)
            st = await self._bounded(
                name, request, partial(self.scheduler.import_token, name, token)
            )
            return {"ok": True, "account": name, **_expiry(st.expires_at, self.scheduler.now())}
        if op == "revoke":
            name = request.name
            return {"ok": True, "account": name, "note": await self.scheduler.forget(name)}
        if op == "ping":
            return {"ok": True, "version": __version__, "pid": os.getpid()}
        if op == "servers":
            return _servers(self.scheduler.account(request.name))
        # `authorize` is a conversation; any other name was refused by request.parse.
        raise ProtocolError(f"operation '{op}' is not served this way")

    def _same_client(self, name: str, client_id: str) -> None:
        """A refresh token works only with the client that got it: refuse another's."""
        provider = self.scheduler.account(name).provider
        if client_id != provider.client_id:
            raise UsageError(
                f"{name}: the refresh token was issued to client {client_id!r}, but "
                f"[providers.{provider.name}] has client_id {provider.client_id!r}; a refresh "
                "token works only with the client that got it",
                hint=f"set client_id = {client_id!r} and that client's secret in a provider "
                f"for {name}, or sign in afresh with 'mailoauth authorize {name}'",
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

    def answer_now(self, request: Request, peer: Peer) -> dict[str, object] | None:
        """The answer to a token request that needs no waiting; None when `handle` must wait."""
        if request.op != "token":
            return None
        name = request.name
        if not self.policy.may_use(peer, name):
            return None  # `gate` refuses it, and logs that, on the general path
        min_validity = _or(request.min_validity, -1.0)
        st = self.scheduler.token_now(name, None if min_validity < 0 else min_validity)
        return None if st is None else self._token_reply(name, st, peer)

    async def _token(self, request: Request, peer: Peer) -> dict[str, object]:
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
                    st = await self.scheduler.token(
                        name, None if min_validity < 0 else min_validity, deadline
                    )
                    return self._token_reply(name, st, peer)
            except ReauthorizationRequired:
                if trio.current_time() >= give_up:
                    raise
                with trio.move_on_at(give_up):
                    await self.scheduler.wait_changed(name)
                continue
            raise self._timed_out(name, timeout)

    def _token_reply(self, name: str, st: AccountState, peer: Peer) -> dict[str, object]:
        assert st.access_token is not None
        if self._debug:
            log.debug("token.served", account=name, uid=peer.uid, pid=peer.pid, exe=_exe(peer.pid))
        return {
            "ok": True,
            "token": st.access_token.reveal(),
            "expires_at": int(st.expires_at.timestamp()) if st.expires_at else None,
            "username": self.scheduler.account(name).username or "",
        }

    def _gate(self, request: Request, peer: Peer) -> None:
        """The server asks before every request; raises AccessDenied to refuse (system mode)."""
        refusal = self.policy.refusal(request.op, request.account, peer)
        if refusal is not None:
            if self._refusals.allow(peer.uid, trio.current_time()):
                log.info(
                    "request.refused",
                    uid=peer.uid,
                    pid=peer.pid,
                    exe=_exe(peer.pid),
                    op=request.op,
                    # request.parse let through only names as the configuration
                    # allows them: at most 64 characters, nothing to escape.
                    account=request.account,
                    reason=refusal.reason,
                    **self._refusals.suppressed(peer.uid),
                )
            raise refusal.error

    async def _authorize(self, request: Request, peer: Peer, channel: Channel) -> dict[str, object]:
        """`mailoauth authorize`: a conversation that runs one sign-in (signin.py)."""
        name = request.name
        account = self.scheduler.account(name)
        if account.flow == "client_credentials":
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
        self._signing_in.add(name)
        try:
            log.info("authorize.requested", account=name, flow=flow, uid=peer.uid, pid=peer.pid)
            account = await self.discovery.account(account)
            session = signin.Session(
                account=account,
                client=self.scheduler.client(account),
                http=self.scheduler.http,
                request_timeout=self.scheduler.settings.request_timeout.total_seconds(),
                now=self.scheduler.now,
                store=partial(self.scheduler.authorized, name),
            )
            return await signin.run(session, channel, str(flow))
        finally:
            self._signing_in.discard(name)

    def _timed_out(self, name: str, timeout: float) -> MailoauthdError:
        last = self.scheduler.last_error(name)
        why = f"; last error: {last}" if last else ""
        return TimedOut(f"{name}: no valid token within {timeout:g} s{why}")

    # --- operations ----------------------------------------------------------------

    async def reload(self) -> bool:
        """Re-read the configuration; on any error keep running the old one."""
        if self.config_path is None:
            log.warning("config.reload_skipped", reason="no config file")
            return False
        self.notifier.reloading()
        try:
            cfg = await trio.to_thread.run_sync(config.load, self.config_path)
            secrets = await trio.to_thread.run_sync(read_secrets, cfg)
            passwords = await trio.to_thread.run_sync(
                proxy.read_passwords, cfg.accounts, cfg.source
            )
        except ConfigError as exc:
            log.error("config.reload_failed", error=exc.message, kept="the running configuration")
            self.last_reload_error = exc.message
            self.notifier.ready(self.scheduler.summary())
            return False
        policy, access_warnings = await trio.to_thread.run_sync(
            partial(Policy.build, cfg, system=self.policy.system, own_uid=self.policy.own_uid)
        )
        for warning in (*cfg.warnings, *access_warnings):
            log.warning("config.warning", warning=warning)
        if self.proxy is not None:
            self.proxy.passwords = passwords
        if cfg.proxy != self.config.proxy:
            log.warning("config.restart_needed", key="[proxy]", reason="takes effect on restart")
        for key in ("socket", "state_dir"):
            if getattr(cfg.daemon, key) != getattr(self.config.daemon, key):
                log.warning("config.restart_needed", key=key, reason="takes effect on restart")
        if cfg.store != self.config.store:
            log.warning("config.restart_needed", key="[store]", reason="takes effect on restart")
        if policy.shared != self.policy.shared:
            log.warning(
                "config.restart_needed",
                key="allow_users, allow_groups, admin_group",
                reason="who may connect to the socket changes on restart",
            )
        self.config = cfg
        self.policy = policy
        self.last_reload_error = None
        self.discovery.clear()  # an issuer's endpoints are fetched again when next needed
        self.scheduler.reconfigure(cfg.daemon, cfg.accounts, secrets)
        self.reminders.reconfigure(cfg.accounts)
        log.info("config.reloaded", accounts=len(cfg.accounts))
        self.notifier.ready(self.scheduler.summary())
        return True

    async def discover(self) -> None:
        """Fetch every issuer's endpoints now, so that a broken one is reported at once."""
        for name, provider in self.config.providers.items():
            if provider.issuer:
                try:
                    await self.discovery.provider(provider)
                except GrantError as exc:
                    log.error("discovery.failed", provider=name, error=exc.message, hint=exc.hint)
                except Exception as exc:  # noqa: BLE001 - a background task's last resort
                    log.error("discovery.internal_error", provider=name, error=type(exc).__name__)

    def remind_at_start(self) -> None:
        """Accounts that lost their grant before a restart are reminded of at once."""
        for row in self.scheduler.status():
            name = str(row["account"])
            if row["status"] == NEEDS_AUTHORIZATION and row["last_error"]:
                self.reminders.raise_alert(
                    self.scheduler.account(name),
                    NEEDS_AUTHORIZATION,
                    message=str(row["last_error"]),
                    action=str(row["hint"] or f"run 'mailoauth authorize {name}'"),
                    repeat=True,
                )

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.notifier.watchdog()
            await trio.sleep(interval)

    async def _status_updates(self) -> None:
        sent = self.scheduler.summary()
        while True:
            await trio.sleep(STATUS_INTERVAL)
            if (summary := self.scheduler.summary()) != sent:
                self.notifier.status(summary)
                sent = summary

    async def _signals(
        self, cancel: trio.CancelScope, *, task_status: trio.TaskStatus[None]
    ) -> None:
        with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGHUP:
                    await guarded("reload", self.reload)
                    continue
                log.info("daemon.stopping", signal=signal.Signals(signum).name)
                self.notifier.stopping()
                cancel.cancel()
                return


def on_event(
    reminders: Reminders, event: str, account: config.Account, message: str, action: str
) -> None:
    """The scheduler's events of note, for the person who has to act (notify_command)."""
    if event == NEEDS_AUTHORIZATION:
        reminders.raise_alert(account, event, message=message, action=action, repeat=True)
    elif event in (REFRESH_TOKEN_EXPIRING, "scope_lost"):
        reminders.raise_alert(account, event, message=message, action=action, repeat=False)
    elif event in ("authorized", "imported", "refreshed", "revoked"):
        reminders.clear(account.name)


def _identity(path: Path) -> tuple[int, int] | None:
    """The (device, inode) of a file, not following links; None if it is gone."""
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _exe(pid: int) -> str | None:
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


async def run(
    cfg: config.Config,
    *,
    config_path: Path | None,
    env: Mapping[str, str],
    system: bool,
    now: Callable[[], datetime] = oauth.now_utc,
    handle_signals: bool = True,
    task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED,
) -> None:
    """
    Run the daemon until cancelled or told to stop by a signal.

    Args:
        cfg: the parsed configuration.
        config_path: the file it came from, for reloads (None: no reloads).
        env: the environment (socket and state defaults, NOTIFY_SOCKET).
        system: system mode (root, or --system): the system's default paths.
        now: the wall clock.
        handle_signals: install SIGHUP/SIGTERM/SIGINT handlers (main thread only).
        task_status: receives the Daemon once READY=1 has been sent.
    """
    plain_env = dict(env)
    state_dir = cfg.daemon.state_dir or Path(paths.state_dir(plain_env, system=system))
    socket_path = cfg.daemon.socket or Path(
        paths.daemon_socket(plain_env, os.getuid(), system=system)
    )
    notifier = Notifier(env)
    policy, access_warnings = Policy.build(cfg, system=system, own_uid=os.geteuid())
    for warning in (*cfg.warnings, *access_warnings):
        log.warning("config.warning", warning=warning)
    secrets = read_secrets(cfg)
    store = await fleetd.open_store(cfg.store, state_dir, plain_env)
    # The start-up builds the long-lived heap: an account, a slot and a state per
    # account. The cyclic GC would traverse it again and again as it grows (0.4 to
    # 0.8 s of CPU with 10,000 accounts, docs/performance.md), and every full
    # collection after would traverse it again. None of it is garbage: collect
    # nothing until READY=1, then move it out of the collector's sight (gc.freeze).
    gc.disable()
    listener = None
    ours: tuple[int, int] | None = None
    activated = False
    try:
        # httpx's timeout is a backstop: the scheduler bounds each attempt itself.
        backstop = cfg.daemon.request_timeout.total_seconds() + 5
        async with httpx.AsyncClient(timeout=backstop, follow_redirects=False) as http:
            discovery = Discovery(http, timeout=cfg.daemon.request_timeout.total_seconds())
            reminders = Reminders(env=env, now=now)
            scheduler = Scheduler(
                store=store,
                http=http,
                settings=cfg.daemon,
                accounts=cfg.accounts,
                secrets=secrets,
                now=now,
                on_event=partial(on_event, reminders),
                resolve=discovery.account,
            )
            fds = listen_fds(env, os.getpid())
            if fds:
                # Socket activation: systemd owns the socket file and keeps it across our
                # restarts, so that clients queue instead of failing meanwhile.
                if len(fds) > 1:
                    log.warning("socket.extra_fds", passed=len(fds), using=fds[0])
                listener = inherited(fds[0])
                activated = True
                socket_path = Path(listener.getsockname())
            else:
                # Open to every local user only when the configuration grants them something.
                listener = bind(socket_path, public=policy.shared)
                ours = _identity(socket_path)
            # No token_file may be put among our state files or next to our socket.
            tokenfile.protect(state_dir, socket_path.parent)
            daemon = Daemon(
                cfg,
                config_path=config_path,
                store=store,
                scheduler=scheduler,
                notifier=notifier,
                socket_path=socket_path,
                system=system,
                policy=policy,
                discovery=discovery,
                reminders=reminders,
            )
            async with trio.open_nursery() as root:
                if handle_signals:
                    # Before READY=1: systemd may send SIGHUP the moment it sees it,
                    # and SIGHUP's default action would end the process.
                    await root.start(daemon._signals, root.cancel_scope)
                await root.start(reminders.run)
                daemon.remind_at_start()
                await root.start(scheduler.run)
                await root.start(fleetd.run, store, scheduler)  # a fleet's election and watch
                # Only now: a token request may start a refresh, which needs the
                # scheduler running. Clients that connect earlier wait in the backlog.
                await root.start(daemon.server.serve, listener)
                if proxy.enabled(cfg.proxy):
                    daemon.proxy = await root.start(
                        partial(proxy.run, cfg, scheduler, lambda: daemon.policy)
                    )
                root.start_soon(guarded, "discovery", daemon.discover)
                gc.freeze()
                gc.enable()
                notifier.ready(scheduler.summary())
                log.info(
                    "daemon.ready",
                    version=__version__,
                    socket=str(socket_path),
                    socket_activated=activated,
                    mode="system" if system else "per-user",
                    state_dir=str(state_dir),
                    accounts=len(cfg.accounts),
                )
                if notifier.watchdog_interval:
                    root.start_soon(
                        guarded, "watchdog", daemon._watchdog, notifier.watchdog_interval
                    )
                if notifier.enabled:
                    root.start_soon(
                        partial(guarded, "status", daemon._status_updates, restart=True)
                    )
                task_status.started(daemon)
    finally:
        gc.enable()
        if listener is not None:
            listener.close()
            # Only the socket file we made: another daemon may have replaced it
            # since (a stale one ends after a new one started), and its clients
            # must not lose their way to it.
            if not activated and ours is not None and _identity(socket_path) == ours:
                with contextlib.suppress(OSError):
                    socket_path.unlink()
        store.close()
        notifier.close()
        log.info("daemon.stopped")
