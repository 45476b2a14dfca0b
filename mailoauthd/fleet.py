"""
The building blocks of a fleet on etcd: a lease kept alive, and a lease-backed lock with a fence.

Not yet used by the daemon: `[store] backend = "etcd"` is refused by the
configuration until the scheduler runs on them (docs/fleet.md says what is
done and what is not).

- `Lease` grants an etcd lease and renews it every third of its TTL. It
  counts its validity from *before* each renewal was sent, on trio's clock, so
  its `held` is never later than etcd's own expiry: a daemon paused (SIGSTOP)
  or cut off from etcd finds on its next look that it holds nothing.
- `Lock` is one key created with the lease only if it does not exist (a
  transaction on create_revision 0). Its `fence()` is the comparison every
  write of the holder carries: the lock key still exists with the
  create_revision we made. Once the lease is gone, the key is gone, and every
  write of the old holder fails, whatever it believes.
"""

from __future__ import annotations

import math

import trio

from mailoauthd.etcd import Compare, Etcd, Unavailable


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

    @property
    def held(self) -> bool:
        return self.revision != 0 and self.lease.held

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
        return self.held

    def fence(self) -> Compare:
        """The comparison that makes a write conditional on holding this lock."""
        return Compare(self.key, "CREATE", self.revision)
