"""
A daemon in a fleet: its store in etcd, the leader election, and the watch (docs/fleet.md).

With `[store] backend = "etcd"` the daemon's store is a `FleetStore` (the
grants under `prefix` in etcd, fleet.EtcdStore) and beside the scheduler runs
`run`, which keeps three things going:

- the lease (fleet.Lease), renewed every third of `lease_ttl`;
- the election: every daemon tries, every quarter of the TTL, to create the
  key `prefix`leader with its lease; the one that holds it is the fleet's
  leader and alone refreshes (store.may_refresh). When leadership or etcd's
  reachability changes, the scheduler is told (`poke`): a new leader checks
  every account at once and retries every refresh another left in flight;
- the watch of `prefix`grants/: another daemon's write is handed to the
  scheduler (`adopt`), so every daemon serves the newest grant from memory.

`health` is what `mailoauth status` shows of it.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import httpx
import structlog
import trio

from mailoauthd.config import StoreSettings
from mailoauthd.config.secrets import SecretSource
from mailoauthd.errors import ConfigError, StateError
from mailoauthd.storage import seal
from mailoauthd.storage import store as stores
from mailoauthd.storage.etcd import Etcd, EtcdError, TlsRefused, Unavailable
from mailoauthd.storage.fleet import EtcdStore, Lease, Lock

log = structlog.get_logger(__name__)

# 2 s per etcd call and endpoint: a member that does not answer in that time is
# skipped; a whole call over three members stays well inside a lease's third.
CALL_TIMEOUT_SECONDS = 2.0
# At start, etcd gets this long to answer the first read (a cluster electing a
# leader, a member restarting) before the daemon gives up with a clear error.
START_SECONDS = 30.0
# After a lost watch or an etcd error, the next attempt waits this long: etcd
# gets a moment, and a broken cluster is not hammered.
RETRY_SECONDS = 0.5
# A clean stop gives the lease back (so another daemon leads at once) within this.
REVOKE_SECONDS = 2.0
_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")


class Adopter(Protocol):
    """What `run` tells the scheduler (scheduler.Scheduler)."""

    def adopt(self, name: str) -> None: ...

    def poke(self) -> None: ...


class FleetStore(EtcdStore):
    """The grant store of a daemon in a fleet: EtcdStore with its lease, lock and client."""

    def __init__(
        self,
        etcd: Etcd,
        settings: StoreSettings,
        keyring: seal.Keyring | None,
        http: httpx.AsyncClient,
    ) -> None:
        self.http = http
        self.lease = Lease(etcd, int(settings.lease_ttl.total_seconds()))
        self.me = f"{socket.gethostname()}:{os.getpid()}"
        leader = Lock(etcd, f"{settings.prefix}leader", self.lease, self.me)
        super().__init__(etcd, settings.prefix, keyring, leader)
        self.ttl = self.lease.ttl
        self.reachable = True
        self.problem: str | None = None
        self.leader_name: str | None = None  # who holds the lock, as last read

    @property
    def leading(self) -> bool:
        assert self.leader is not None
        return self.leader.held


async def open_store(
    settings: StoreSettings, state_dir: Path, env: Mapping[str, str]
) -> stores.GrantStore:
    """
    The configured store, opened: the state directory, or the fleet's grants read from etcd.

    Raises:
        ConfigError: the key source, or etcd's TLS files or password, cannot be read.
        StateError: the store cannot be opened (etcd unreachable for START_SECONDS).
    """
    if settings.backend != "etcd":
        return stores.open_store(settings, state_dir, env)
    keyring = seal.load_keyring(settings.encryption_key_file, settings.encryption_key_command, env)
    http = httpx.AsyncClient(verify=_tls(settings, env))
    password = None
    if settings.password_file is not None:
        source = SecretSource(file=settings.password_file)
        password = source.read(where="[store] password_file", env=env)
    etcd = Etcd(
        settings.endpoints,
        http=http,
        timeout=CALL_TIMEOUT_SECONDS,
        username=settings.username,
        password=password,
        certificate=settings.cert_file is not None and settings.key_file is not None,
    )
    store = FleetStore(etcd, settings, keyring, http)
    try:
        await _first_read(store, settings)
    except BaseException:
        await http.aclose()
        raise
    return store


async def _first_read(store: FleetStore, settings: StoreSettings) -> None:
    """Read every grant, waiting up to START_SECONDS for etcd; check the keys against the key."""
    with trio.move_on_after(START_SECONDS):
        while True:
            try:
                await store.start()
                break
            except TlsRefused as exc:  # no wait: a certificate to fix, not an outage
                raise StateError(f"[store] etcd: {exc.message}") from None
            except Unavailable as exc:
                store.problem = exc.message
            except EtcdError as exc:
                raise StateError(f"[store] etcd: {exc.message}") from None
            await trio.sleep(RETRY_SECONDS)
    if store.revision == 0:
        endpoints = ", ".join(settings.endpoints)
        raise StateError(
            f"[store] etcd ({endpoints}) did not answer within {START_SECONDS:g} s: "
            f"{store.problem}",
            hint="check that etcd runs and has quorum, and the endpoints, TLS files and user",
        )
    for name in store.accounts():
        try:
            store.load(name)
        except seal.UnknownKey:
            raise
        except StateError:
            continue  # reported for its account alone when the scheduler loads it


def _tls(settings: StoreSettings, env: Mapping[str, str]) -> ssl.SSLContext | bool:
    """The TLS context for etcd: its CA, and our client certificate for mTLS."""
    if settings.ca_file is None and settings.cert_file is None:
        return True
    try:
        context = ssl.create_default_context(
            cafile=_expand(settings.ca_file, env) if settings.ca_file else None
        )
        if settings.cert_file is not None and settings.key_file is not None:
            context.load_cert_chain(
                _expand(settings.cert_file, env), _expand(settings.key_file, env)
            )
    except (OSError, ssl.SSLError) as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"[store] ca_file/cert_file/key_file: cannot be used: {why}") from None
    return context


def _expand(path: Path, env: Mapping[str, str]) -> str:
    """A path with $VAR and ${VAR} filled in from `env` (systemd's $CREDENTIALS_DIRECTORY)."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in env:
            raise ConfigError(f"[store]: {path} needs ${name}, which is not set")
        return env[name]

    return _VARIABLE.sub(value, str(path))


# --- running -------------------------------------------------------------------------


async def run(
    store: stores.GrantStore,
    scheduler: Adopter,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep the lease, the election and the watch going (nothing for a state directory)."""
    if not isinstance(store, FleetStore):
        task_status.started()
        return
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(_keep_lease, store)
            nursery.start_soon(_follow, store, scheduler)
            await nursery.start(_elect, store, scheduler)
            task_status.started()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(REVOKE_SECONDS):
            try:
                await store.lease.revoke()  # another daemon leads at once
            except EtcdError:
                pass
        with trio.CancelScope(shield=True):
            await store.http.aclose()


async def _keep_lease(store: FleetStore, *, task_status: trio.TaskStatus[None]) -> None:
    """fleet.Lease.run, started again after an error etcd answered (it logs, and goes on)."""
    started = False
    while True:
        try:
            if started:
                await store.lease.run()
            else:
                await store.lease.run(task_status=task_status)
        except EtcdError as exc:
            log.warning("fleet.lease_error", error=exc.message)
        started = True
        await trio.sleep(RETRY_SECONDS)


async def _elect(
    store: FleetStore, scheduler: Adopter, *, task_status: trio.TaskStatus[None]
) -> None:
    """Take the leader lock whenever it is free; tell the scheduler when anything changed."""
    assert store.leader is not None
    was = (False, True)
    task_status.started()
    while True:
        try:
            if store.lease.held and not store.leader.held:
                await store.leader.acquire()
            holder = await store.etcd.get(store.leader.key)
            store.leader_name = holder.value.decode("utf-8", "replace") if holder else None
            store.reachable, store.problem = not store.lease.unavailable, None
        except EtcdError as exc:
            store.reachable, store.problem = False, exc.message
        if store.lease.unavailable:
            store.reachable = False
            store.problem = store.problem or "etcd is unavailable: the lease cannot be renewed"
        now = (store.leading, store.reachable)
        if now != was:
            log.info(
                "fleet.changed",
                leading=store.leading,
                reachable=store.reachable,
                leader=store.leader_name,
            )
            scheduler.poke()
            was = now
        await trio.sleep(store.ttl / 4)


async def _follow(store: FleetStore, scheduler: Adopter) -> None:
    """Hand every other daemon's write to the scheduler; after a lost watch, read all again."""
    while True:
        try:
            await store.follow(scheduler.adopt)
        except EtcdError as exc:
            log.warning("fleet.watch_lost", error=exc.message)
        await trio.sleep(RETRY_SECONDS)
        try:
            for name in await store.resync():
                scheduler.adopt(name)
        except EtcdError as exc:
            store.reachable, store.problem = False, exc.message


def health(store: stores.GrantStore) -> dict[str, object]:
    """
    The store's part of the status reply: {} for a state directory; for a fleet, whether
    etcd answers, who leads, and whether this daemon refreshes.
    """
    if not isinstance(store, FleetStore):
        return {}
    leading = store.leading
    healthy = store.reachable and store.lease.held and store.leader_name is not None
    return {
        "store": {
            "backend": "etcd",
            "healthy": healthy,
            "reachable": store.reachable,
            "lease": store.lease.held,
            "leader": store.leader_name,
            "this_daemon": store.me,
            "refreshing": leading,
            "problem": None if healthy else _problem(store),
        }
    }


def _problem(store: FleetStore) -> str:
    if not store.reachable or not store.lease.held:
        why = store.problem or "etcd is unavailable"
        return f"{why}: refreshing nothing; serving the tokens held while they are valid"
    return "no daemon of the fleet leads yet: nothing is refreshed until one does"
