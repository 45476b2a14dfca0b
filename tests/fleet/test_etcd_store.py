"""
fleet.EtcdStore against a real 3-member etcd cluster: sealed values, fenced writes, the watch.

The GrantStore methods are called from worker threads, as the scheduler calls a store.
"""

from __future__ import annotations

import os
import subprocess
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import pytest
import trio

from mailoauthd.secret import Secret
from mailoauthd.storage import seal
from mailoauthd.storage.etcd import Etcd
from mailoauthd.storage.fleet import EtcdStore, Lease, Lock, Superseded
from tests.fleet.cluster import Cluster
from tests.fleet.conftest import wait_for
from tests.test_state import ACCESS, REFRESH, full_state

pytestmark = pytest.mark.slow
SEALED_ACCESS = "at-sealed-5e1f-do-not-print"
SEALED_REFRESH = "rt-sealed-9a0d-do-not-print"


def etcdctl(endpoints: list[str], *args: str) -> bytes:
    done = subprocess.run(
        ["etcdctl", f"--endpoints={','.join(endpoints)}", *args],
        capture_output=True,
        timeout=30,
        check=True,
        env={**os.environ, "ETCDCTL_API": "3"},
    )
    return done.stdout


async def started(etcd: Etcd, prefix: str, keyring: seal.Keyring | None = None) -> EtcdStore:
    store = EtcdStore(etcd, prefix, keyring)
    await store.start()
    return store


async def test_sealed_grants_never_show_in_etcdctl_or_a_snapshot(
    etcd: Etcd, cluster: Cluster, tmp_path: Path
) -> None:
    keyring = seal.Keyring((os.urandom(32),), "test")
    sealed = await started(etcd, "/s1/", keyring)
    plain = await started(etcd, "/s1-plain/")
    secrets = {"access_token": Secret(SEALED_ACCESS), "refresh_token": Secret(SEALED_REFRESH)}
    for name in ("work", "home"):
        await trio.to_thread.run_sync(sealed.save, full_state(account=name, **secrets))
        await trio.to_thread.run_sync(plain.save, full_state(account=name))
    assert sealed.load("home") == full_state(account="home", **secrets)
    listing = await trio.to_thread.run_sync(etcdctl, cluster.endpoints, "get", "--prefix", "/s1")
    assert b"/s1/grants/home" in listing
    assert SEALED_ACCESS.encode() not in listing
    assert SEALED_REFRESH.encode() not in listing
    assert REFRESH.encode() in listing  # the plain prefix's: the search works
    snapshot = tmp_path / "snap.db"
    await trio.to_thread.run_sync(etcdctl, cluster.endpoints[:1], "snapshot", "save", str(snapshot))
    data = snapshot.read_bytes()
    assert REFRESH.encode() in data
    assert ACCESS.encode() in data
    assert SEALED_REFRESH.encode() not in data
    assert SEALED_ACCESS.encode() not in data


async def test_a_write_based_on_an_older_grant_is_refused(etcd: Etcd) -> None:
    a = await started(etcd, "/s2/")
    b = await started(etcd, "/s2/")
    await trio.to_thread.run_sync(a.save, full_state(refresh_token=None))
    # b has not seen a's write: its write would overwrite a newer grant.
    with pytest.raises(Superseded, match="another daemon changed it"):
        await trio.to_thread.run_sync(b.save, full_state(failures=7))
    assert b.load("work") is None  # and nothing of it is kept as if written
    changed: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(b.follow, changed.append)
        await wait_for(lambda: b.load("work") is not None, 10)
        assert b.load("work") == full_state(refresh_token=None)
        assert changed == ["work"]
        # Now current, b may write; a, in turn, is behind and refused.
        await trio.to_thread.run_sync(b.save, full_state(failures=7))
        with pytest.raises(Superseded):
            await trio.to_thread.run_sync(a.save, full_state(failures=8))
        await trio.to_thread.run_sync(b.remove, "work")
        await trio.sleep(0.5)
        assert changed == ["work"]  # its own writes are not reported as others'
        nursery.cancel_scope.cancel()
    fresh = await started(etcd, "/s2/")
    assert fresh.accounts() == []


async def test_the_lock_fences_every_write(etcd: Etcd) -> None:
    async with trio.open_nursery() as nursery:
        lease_a, lease_b = Lease(etcd, 2), Lease(etcd, 2)
        await nursery.start(lease_a.run)
        await nursery.start(lease_b.run)
        lock_a = Lock(etcd, "/s3/leader", lease_a, "a")
        lock_b = Lock(etcd, "/s3/leader", lease_b, "b")
        a = EtcdStore(etcd, "/s3/", leader=lock_a)
        b = EtcdStore(etcd, "/s3/", leader=lock_b)
        refresh = partial(
            trio.to_thread.run_sync, lambda store, grant: store.save(grant, refresh=True)
        )
        await a.start()
        await b.start()
        assert await lock_a.acquire()
        assert not await lock_b.acquire()
        assert a.may_refresh("work")
        assert not b.may_refresh("work")
        await refresh(a, full_state())
        await b.start()  # b is current, but holds no lock
        with pytest.raises(Superseded):
            await refresh(b, full_state(failures=1))
        # A person's write (import, sign-in) needs no lock, only the revision read.
        await trio.to_thread.run_sync(b.save, full_state(failures=5))
        await a.start()
        await lease_a.revoke()
        assert not a.may_refresh("work")
        assert await lock_b.acquire()
        await refresh(b, full_state(failures=1))
        await a.start()
        with pytest.raises(Superseded):
            await refresh(a, full_state(failures=2))
        # Even if a believed it still held its lock (it cannot: its clock runs
        # ahead of etcd's), etcd's transaction refuses the old fence.
        with pytest.raises(Superseded):
            await etcd_refused(a, full_state(failures=3))
        nursery.cancel_scope.cancel()


async def etcd_refused(store: EtcdStore, grant: object) -> None:
    """A fenced write whose lock looks held locally: etcd's transaction is what refuses it."""
    assert store.leader is not None
    store.leader.lease.valid_until = trio.current_time() + 60
    store.leader.lease.id = store.leader.lease.id or 1
    await trio.to_thread.run_sync(lambda: store.save(grant, refresh=True))  # type: ignore[arg-type]


async def test_a_value_swapped_between_accounts_is_refused(etcd: Etcd, cluster: Cluster) -> None:
    keyring = seal.Keyring((os.urandom(32),), "test")
    store = await started(etcd, "/s4/", keyring)
    await trio.to_thread.run_sync(store.save, full_state(account="work"))
    work = await etcd.get("/s4/grants/work")
    assert work is not None
    await etcd.put("/s4/grants/home", work.value)
    await store.start()
    with pytest.raises(seal.SealError, match=r"etcd:/s4/grants/home.*another account"):
        store.load("home")
    assert store.load("work") == full_state(account="work")
    aside = await trio.to_thread.run_sync(store.set_aside, "home", datetime(2026, 1, 2, tzinfo=UTC))
    assert aside == "etcd:/s4/aside/home.corrupt-20260102T000000Z"
    kept = await etcd.get("/s4/aside/home.corrupt-20260102T000000Z")
    assert kept is not None
    assert kept.value == work.value
    assert store.accounts() == ["work"]


async def test_etcd_unreachable_is_a_failed_write_and_nothing_changes(
    etcd: Etcd, cluster: Cluster
) -> None:
    store = await started(etcd, "/s5/")
    await trio.to_thread.run_sync(store.save, full_state())
    down = cluster.members[1:]
    for member in down:
        member.kill()
    try:
        with pytest.raises(OSError, match="etcd is unavailable"):
            await trio.to_thread.run_sync(store.save, full_state(failures=3))
        assert store.load("work") == full_state()  # what it holds, it still serves
    finally:
        for member in down:
            cluster.restart(member)
        cluster.wait_healthy()
    fresh = await started(etcd, "/s5/")
    assert fresh.load("work") == full_state()
