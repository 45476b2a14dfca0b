"""
mailoauthd.storage.etcd and mailoauthd.storage.fleet against a real 3-member etcd cluster on
loopback.

Lease expiry is etcd's own, in real time: these tests wait seconds, not mock time.
"""

from __future__ import annotations

import time

import httpx
import pytest
import trio

from mailoauthd.storage import etcd as etcd_module
from mailoauthd.storage.etcd import Compare, Etcd, Event, Unavailable
from mailoauthd.storage.fleet import Lease, Lock
from tests.fleet.cluster import ETCD, Cluster
from tests.fleet.conftest import wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(ETCD is None, reason="etcd is not installed (Debian: etcd-server)"),
]
TTL = 2


async def test_keys_round_trip(etcd: Etcd) -> None:
    await etcd.put("/t1/grants/work", b"\x00sealed\xff")
    await etcd.put("/t1/grants/home", b"h")
    await etcd.put("/t1/grantsX", b"neighbour")
    got = await etcd.get("/t1/grants/work")
    assert got is not None
    assert got.value == b"\x00sealed\xff"
    kvs, revision = await etcd.get_prefix("/t1/grants/")
    assert [kv.key for kv in kvs] == ["/t1/grants/home", "/t1/grants/work"]
    assert revision >= got.mod_revision
    assert await etcd.delete("/t1/grants/work")
    assert await etcd.get("/t1/grants/work") is None
    assert not await etcd.delete("/t1/grants/work")


async def test_fenced_write_refuses_a_stale_revision(etcd: Etcd) -> None:
    await etcd.put("/t2/work", b"v1")
    read = await etcd.get("/t2/work")
    assert read is not None
    newer = await etcd.put_if("/t2/work", b"v2", [Compare("/t2/work", "MOD", read.mod_revision)])
    assert newer is not None
    # A second writer that read v1 too is refused, and v2 stays.
    stale = await etcd.put_if("/t2/work", b"v2'", [Compare("/t2/work", "MOD", read.mod_revision)])
    assert stale is None
    now = await etcd.get("/t2/work")
    assert now is not None
    assert now.value == b"v2"


async def test_lock_is_exclusive_and_a_lost_lease_fences_the_old_holder(etcd: Etcd) -> None:
    async with trio.open_nursery() as nursery:
        lease_a, lease_b = Lease(etcd, TTL), Lease(etcd, TTL)
        scope_a = trio.CancelScope()

        async def run_a() -> None:
            with scope_a:
                await lease_a.run()

        nursery.start_soon(run_a)
        await nursery.start(lease_b.run)
        await wait_for(lambda: lease_a.held, 5)
        a = Lock(etcd, "/t3/lock/work", lease_a, "node-a")
        b = Lock(etcd, "/t3/lock/work", lease_b, "node-b")
        assert await a.acquire()
        assert not await b.acquire()
        assert await a.acquire()  # already ours: still held
        assert await etcd.put_if("/t3/grant/work", b"by a", [a.fence()]) is not None
        # Node A stops renewing (paused, or cut off from etcd).
        scope_a.cancel()

        took = await wait_for(b.acquire, TTL + 3)
        assert took <= TTL + 1.5
        # By then A knows, from its own clock, that it holds nothing.
        assert not lease_a.held
        assert not a.held
        # And whatever A still tries to write is refused: the fence.
        assert await etcd.put_if("/t3/grant/work", b"late a", [a.fence()]) is None
        assert await etcd.put_if("/t3/grant/work", b"by b", [b.fence()]) is not None
        grant = await etcd.get("/t3/grant/work")
        assert grant is not None
        assert grant.value == b"by b"
        await lease_b.revoke()
        assert await etcd.get("/t3/lock/work") is None  # the lock went with the lease
        nursery.cancel_scope.cancel()


async def test_calls_survive_the_death_of_a_member(etcd: Etcd, cluster: Cluster) -> None:
    await etcd.put("/t4/k", b"before")
    first = cluster.members[etcd._current]
    first.kill()
    try:
        # Killing the leader costs an election (a second or two here): calls fail with
        # Unavailable meanwhile, and work again without anything being restarted.
        async def put() -> bool:
            try:
                await etcd.put("/t4/k", b"after")
            except Unavailable:
                return False
            return True

        assert await wait_for(put, 10) < 8
        got = await etcd.get("/t4/k")
        assert got is not None
        assert got.value == b"after"
    finally:
        cluster.restart(first)
        cluster.wait_healthy()


async def test_without_quorum_calls_fail_fast_and_leases_are_not_held(
    etcd: Etcd, cluster: Cluster
) -> None:
    async with trio.open_nursery() as nursery:
        lease = Lease(etcd, TTL)
        await nursery.start(lease.run)
        assert lease.held
        down = cluster.members[1:]
        for member in down:
            member.kill()
        try:
            start = time.monotonic()
            with pytest.raises(Unavailable):
                await etcd.put("/t5/k", b"x")
            assert time.monotonic() - start < 3 * etcd.timeout + 1
            await trio.sleep(TTL + 0.5)
            assert not lease.held
            assert lease.unavailable
        finally:
            for member in down:
                cluster.restart(member)
            cluster.wait_healthy()
        await etcd.put("/t5/k", b"back")
        await wait_for(lambda: lease.held, TTL * 3)
        nursery.cancel_scope.cancel()


async def test_watch_sees_every_change_in_order_across_a_member_death(
    etcd: Etcd, cluster: Cluster
) -> None:
    _, revision = await etcd.get_prefix("/t6/")
    seen: list[Event] = []
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            async for event in etcd.watch("/t6/", revision + 1):
                seen.append(event)

        nursery.start_soon(watch)
        await etcd.put("/t6/a", b"1")
        await etcd.put("/t6/b", b"2")
        await etcd.put("/t6-outside", b"no")
        await wait_for(lambda: len(seen) >= 2, 5)
        watched_on = cluster.members[etcd._current]
        watched_on.kill()
        try:
            # When the killed member led, the others elect a new leader first; a write
            # that timed out meanwhile may or may not have landed, so wait for a
            # (linearizable) read to succeed before writing, instead of retrying writes.
            with trio.fail_after(15):
                while True:
                    try:
                        await etcd.get_prefix("/t6/")
                        break
                    except Unavailable:
                        await trio.sleep(0.2)
            await etcd.put("/t6/a", b"3")
            await etcd.delete("/t6/b")
            await wait_for(lambda: len(seen) >= 4, 10)
        finally:
            cluster.restart(watched_on)
            cluster.wait_healthy()
        nursery.cancel_scope.cancel()
    assert [(e.kind, e.kv.key, e.kv.value) for e in seen] == [
        ("put", "/t6/a", b"1"),
        ("put", "/t6/b", b"2"),
        ("put", "/t6/a", b"3"),
        ("delete", "/t6/b", b""),
    ]
    revisions = [e.kv.mod_revision for e in seen]
    assert revisions == sorted(revisions)


@pytest.mark.parametrize(
    ("exc", "endpoint", "certificate", "tls"),
    [
        # A reset after the handshake, with no certificate to show, over TLS: the refusal.
        (httpx.ReadError("reset"), "https://127.0.0.1:2379", False, True),
        (httpx.RemoteProtocolError("closed"), "https://127.0.0.1:2379", False, True),
        # With a certificate, or without TLS, a reset is an outage to wait out.
        (httpx.ReadError("reset"), "https://127.0.0.1:2379", True, False),
        (httpx.ReadError("reset"), "http://127.0.0.1:2379", False, False),
        (httpx.ConnectError("refused"), "https://127.0.0.1:2379", False, False),
    ],
)
def test_a_missing_client_certificate_is_named_however_it_is_refused(
    exc: httpx.HTTPError, endpoint: str, certificate: bool, tls: bool
) -> None:
    why, was_tls = etcd_module._why(exc, endpoint=endpoint, certificate=certificate)
    assert was_tls is tls
    assert ("client certificate" in why) is tls
