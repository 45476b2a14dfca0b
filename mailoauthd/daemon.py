"""
The composition root: opens the store and the socket, starts server and scheduler, handles signals.

The only module that knows everyone. `server` reaches the scheduler through
the request handlers made here (handlers.py, one per row of ops.OPS);
`scheduler` knows nothing of sockets.

    run:    config → store.open (lock) → bind → schedule → serve → READY=1
    reload: SIGHUP → RELOADING=1 → config.load → keep the old one on error → READY=1
    stop:   SIGTERM/SIGINT → STOPPING=1 → cancel → in-flight refreshes finish → socket removed
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
from collections.abc import Callable, Mapping
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import structlog
import trio

from mailoauthd import __version__, config, paths
from mailoauthd.errors import ConfigError, GrantError, helper_command
from mailoauthd.lastresort import guarded
from mailoauthd.provider import oauth
from mailoauthd.provider.discovery import Discovery
from mailoauthd.refresh.alerts import REFRESH_TOKEN_EXPIRING, Reminders
from mailoauthd.refresh.scheduler import Scheduler
from mailoauthd.secret import Secret
from mailoauthd.serve.access import Policy
from mailoauthd.serve.handlers import Handlers
from mailoauthd.serve.server import Server, bind, inherited, listen_fds
from mailoauthd.storage import fleetd, tokenfile
from mailoauthd.storage.state import NEEDS_AUTHORIZATION
from mailoauthd.storage.store import GrantStore
from mailoauthd.systemd import Notifier

if TYPE_CHECKING:
    from mailoauthd import proxy

log = structlog.get_logger(__name__)

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
        http: httpx.AsyncClient,
        now: Callable[[], datetime],
    ) -> None:
        self.config = cfg
        self.http = http  # for sign-ins; the scheduler's refreshes share it
        self.now = now
        self.config_path = config_path
        self.store = store
        self.scheduler = scheduler
        self.notifier = notifier
        self.socket_path = socket_path
        self.policy = policy
        self.last_reload_error: str | None = None
        self.discovery = discovery
        self.reminders = reminders
        self.proxy: proxy.Proxy | None = None  # [proxy]: listeners and session counters
        self.handlers = Handlers(self)  # the answer to each socket operation (ops.OPS)
        self.server = Server(
            self.handlers.handle,
            allowed_uids=None if system else {os.geteuid(), 0},
            gate=self.handlers.gate,
            peer_groups=system,
            quick=self.handlers.answer_now,
            converse=self.handlers.converse,
            privileged=lambda peer: self.policy.is_admin(peer),
        )

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
            passwords = await trio.to_thread.run_sync(cfg.proxy_passwords)
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
                    action=str(row["hint"] or f"run {helper_command('authorize', name)}"),
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
                http=http,
                now=now,
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
                if cfg.proxy.enabled:
                    # Loaded only when configured: most daemons run no proxy, and start sooner.
                    from mailoauthd import proxy

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
