"""
The building blocks of a fleet on etcd: a lease kept alive, and a lease-backed lock with a fence.

The daemon runs on them with `[store] backend = "etcd"` (fleetd.py starts
them; docs/fleet.md has the design).

- `Lease` grants an etcd lease and renews it every third of its TTL. It
  counts its validity from *before* each renewal was sent, on trio's clock, so
  its `held` is never later than etcd's own expiry: a daemon paused (SIGSTOP)
  or cut off from etcd finds on its next look that it holds nothing.
- `EtcdStore` keeps grants under a prefix: a GrantStore (store.py) whose
  writes compare the revision the daemon read, sealed like state files,
  served from a cache that a watch keeps current; the refresher's writes
  are fenced by the leader's lock as well.
- `Lock` is one key created with the lease only if it does not exist (a
  transaction on create_revision 0). Its `fence()` is the comparison every
  write of the holder carries: the lock key still exists with the
  create_revision we made. Once the lease is gone, the key is gone, and every
  write of the old holder fails, whatever it believes.
"""

from __future__ import annotations

import errno
import math
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial

import trio

from mailoauthd import errors
from mailoauthd.errors import StateError
from mailoauthd.storage import seal, state
from mailoauthd.storage.etcd import Compare, Etcd, Event, Unavailable
from mailoauthd.storage.state import AccountState
from mailoauthd.storage.store import seal_plain, unseal


class Lease:
    """An etcd lease renewed in the background; run `run` in a nursery."""

    def __init__(self, etcd: Etcd, ttl: int) -> None:
        if ttl < 2:
            raise ValueError("a lease TTL must be at least 2 seconds")
        self.etcd = etcd
        self.ttl = ttl
        self.id = 0
        self.valid_until = -math.inf  # trio.current_time()
        self.unavailable = False  # the last renewal found etcd unreachable

    @property
    def held(self) -> bool:
        return self.id != 0 and trio.current_time() < self.valid_until

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold a lease for ever: grant, renew, and grant anew when one is lost."""
        started = False
        while True:
            if not self.held:
                sent = trio.current_time()
                try:
                    self.id = await self.etcd.grant(self.ttl)
                    self.valid_until = sent + self.ttl
                    self.unavailable = False
                except Unavailable:
                    self.unavailable = True
            if not started:
                started = True
                task_status.started()
            await trio.sleep(self.ttl / 3)
            if self.id == 0:
                continue
            sent = trio.current_time()
            try:
                remaining = await self.etcd.keepalive(self.id)
            except Unavailable:
                self.unavailable = True
                continue
            self.unavailable = False
            if remaining <= 0:
                self.id, self.valid_until = 0, -math.inf
            else:
                self.valid_until = sent + remaining

    async def revoke(self) -> None:
        """Give the lease up now (a clean stop): the locks held with it go at once."""
        lease, self.id, self.valid_until = self.id, 0, -math.inf
        if lease:
            await self.etcd.revoke(lease)


class Lock:
    """A lease-backed lock on one key (an account's, or the fleet leader's)."""

    def __init__(self, etcd: Etcd, key: str, lease: Lease, holder: str) -> None:
        self.etcd = etcd
        self.key = key
        self.lease = lease
        self.holder = holder
        self.revision = 0  # the lock key's create_revision while we hold it
        self.lease_id = 0  # the lease it was taken with: a lease granted anew holds nothing

    @property
    def held(self) -> bool:
        return self.revision != 0 and self.lease.held and self.lease.id == self.lease_id

    async def acquire(self) -> bool:
        """Take the lock if it is free (or already ours under this lease); whether we hold it."""
        if not self.lease.held:
            self.revision = 0
            return False
        revision = await self.etcd.create(self.key, self.holder.encode(), lease=self.lease.id)
        if revision is None:
            current = await self.etcd.get(self.key)
            ours = current is not None and current.lease == self.lease.id
            revision = current.create_revision if current is not None and ours else None
        self.revision = revision or 0
        self.lease_id = self.lease.id
        return self.held

    def fence(self) -> Compare:
        """The comparison that makes a write conditional on holding this lock."""
        return Compare(self.key, "CREATE", self.revision)


class Superseded(StateError):
    """A fenced write was refused: another daemon wrote the grant since, or holds its lock."""

    code = errors.STATE_SUPERSEDED


class EtcdStore:
    """
    Grants under `prefix`grants/ in etcd: a GrantStore (store.py).

    `start()` and `follow()` run in trio; the GrantStore methods are called from
    worker threads (trio.to_thread), as the scheduler calls a store, and reach
    etcd through trio.from_thread. `load` reads the cache only, so it may be
    called anywhere. Each write compares the grant's mod_revision with the one
    the daemon last read (`load`) or wrote, and a refresher's write (`refresh`)
    also compares the `leader` lock: a write based on an older grant, or by a
    daemon that does not hold the lock, is refused with Superseded and changes
    nothing. The watch changes the cache, not what a write compares: a grant
    changed underneath is seen (`load`) before it is overwritten. etcd
    unreachable is an OSError, as a full disk is for files: the scheduler holds
    the new tokens in memory and tries again.
    """

    def __init__(
        self,
        etcd: Etcd,
        prefix: str,
        keyring: seal.Keyring | None = None,
        leader: Lock | None = None,
    ) -> None:
        self.etcd = etcd
        self.prefix = prefix
        self.keyring = keyring
        self.leader = leader
        self.revision = 0  # the revision the cache is current to
        self._cache: dict[str, tuple[bytes, int]] = {}  # account -> (stored value, mod_revision)
        # account -> the last revision read or written (deletes too)
        self._seen: dict[str, int] = {}
        # account -> the revision of the grant the daemon last loaded or wrote: what writes compare
        self._based: dict[str, int] = {}
        # Our writes whose answer is not back yet: the watch may report them first.
        self._writing: dict[str, bytes | None] = {}

    def key(self, account: str) -> str:
        return f"{self.prefix}grants/{account}"

    def path(self, account: str) -> str:
        return f"etcd:{self.key(account)}"

    async def start(self) -> None:
        """Read every grant; raises Unavailable when etcd cannot be reached."""
        kvs, self.revision = await self.etcd.get_prefix(f"{self.prefix}grants/")
        base = len(f"{self.prefix}grants/")
        self._cache = {kv.key[base:]: (kv.value, kv.mod_revision) for kv in kvs}
        self._seen = {account: revision for account, (_, revision) in self._cache.items()}
        self._based = dict(self._seen)

    async def follow(self, on_change: Callable[[str], None]) -> None:
        """Keep the cache current from a watch; `on_change(account)` for others' writes."""
        base = len(f"{self.prefix}grants/")
        event: Event
        async for event in self.etcd.watch(f"{self.prefix}grants/", self.revision + 1):
            account = event.kv.key[base:]
            self.revision = max(self.revision, event.kv.mod_revision)
            if event.kv.mod_revision <= self._seen.get(account, 0):
                continue  # our own write, already in the cache
            self._seen[account] = event.kv.mod_revision
            value = None if event.kind == "delete" else event.kv.value
            if account in self._writing and self._writing[account] == value:
                continue  # our own write, its answer still on the way
            if event.kind == "delete":
                self._cache.pop(account, None)
            else:
                self._cache[account] = (event.kv.value, event.kv.mod_revision)
            on_change(account)

    async def resync(self) -> list[str]:
        """
        Read every grant again (after the watch was lost); the accounts another daemon changed.

        What writes compare (the revision loaded) stays: a grant changed underneath is
        taken (`load`) before it is overwritten.
        """
        kvs, revision = await self.etcd.get_prefix(f"{self.prefix}grants/")
        base = len(f"{self.prefix}grants/")
        fresh = {kv.key[base:]: (kv.value, kv.mod_revision) for kv in kvs}
        changed = [
            account
            for account in sorted(set(fresh) | set(self._cache))
            if fresh.get(account) != self._cache.get(account) and account not in self._writing
        ]
        for account in changed:
            self._seen[account] = max(self._seen.get(account, 0), fresh.get(account, (b"", 0))[1])
        self._cache, self.revision = fresh, revision
        return changed

    # --- GrantStore -----------------------------------------------------------------

    def open(self) -> None:
        """Nothing to lock: the fence does it (see `start`)."""

    def close(self) -> None:
        """Nothing held."""

    def accounts(self) -> list[str]:
        return sorted(self._cache)

    def may_refresh(self, account: str) -> bool:
        """While this daemon holds the leader lock with a live lease."""
        return self.leader is not None and self.leader.held

    def load(self, account: str) -> AccountState | None:
        found = self._cache.get(account)
        self._based[account] = found[1] if found is not None else 0
        if found is None:
            return None
        where = self.path(account)
        plain = unseal(self.keyring, account, found[0], where)
        try:
            text = plain.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise StateError(f"{where}: not a valid state (not UTF-8)") from exc
        loaded = state.from_toml(text, source=where)
        if loaded.account != account:
            raise StateError(f"{where}: holds account {loaded.account!r}, not {account!r}")
        return loaded

    def save(self, grant: AccountState, *, refresh: bool = False) -> None:
        trio.from_thread.run(partial(self.save_async, grant, refresh=refresh))

    async def save_async(self, grant: AccountState, *, refresh: bool = False) -> None:
        """Write a grant if nobody wrote it since we read it (and, to refresh, we lead)."""
        account = grant.account
        value = seal_plain(self.keyring, account, state.to_toml(grant).encode("utf-8"))
        await self._write(account, value, fenced=refresh)

    def remove(self, account: str) -> None:
        trio.from_thread.run(self._write, account, None)

    def set_aside(self, account: str, now: datetime) -> str | None:
        found = self._cache.get(account)
        if found is None:
            return None
        stamp = now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
        aside = f"{self.prefix}aside/{account}.corrupt-{stamp}"
        trio.from_thread.run(self._put_aside, aside, found[0])
        trio.from_thread.run(self._write, account, None)
        return f"etcd:{aside}"

    async def _put_aside(self, key: str, value: bytes) -> None:
        try:
            await self.etcd.put(key, value)
        except Unavailable as exc:
            raise OSError(errno.EHOSTUNREACH, exc.message) from None

    async def _write(self, account: str, value: bytes | None, *, fenced: bool = False) -> None:
        key = self.key(account)
        known = self._based.get(account, self._cache.get(account, (b"", 0))[1])
        compares = [Compare(key, "MOD", known)]
        if fenced:
            if self.leader is None or not self.leader.held:
                raise Superseded(f"{self.path(account)}: not written: this daemon does not lead")
            compares.append(self.leader.fence())
        self._writing[account] = value
        try:
            if value is None:
                revision = await self.etcd.delete_if(key, compares)
            else:
                revision = await self.etcd.put_if(key, value, compares)
        except Unavailable as exc:
            raise OSError(errno.EHOSTUNREACH, exc.message) from None
        finally:
            del self._writing[account]
        if revision is None:
            raise Superseded(
                f"{self.path(account)}: not written: another daemon changed it since, "
                "or this one no longer holds its lock"
            )
        if value is None:
            self._cache.pop(account, None)
        else:
            self._cache[account] = (value, revision)
        self._seen[account] = max(self._seen.get(account, 0), revision)
        # A deleted key compares as mod_revision 0, as one never written.
        self._based[account] = 0 if value is None else revision
