"""The fleet tests' fixtures: one real 3-member etcd cluster on loopback for the session."""

from __future__ import annotations

import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import httpx
import pytest
import trio

from mailoauthd.storage.etcd import Etcd
from tests.fleet.cluster import ETCD, Cluster


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    if ETCD is None:
        pytest.skip("etcd is not installed (Debian: etcd-server)")
    with Cluster(3) as c:
        yield c


@pytest.fixture
async def etcd(cluster: Cluster) -> AsyncIterator[Etcd]:
    cluster.wait_healthy()  # a test before may have killed and restarted members
    async with httpx.AsyncClient() as http:
        yield Etcd(cluster.endpoints, http=http, timeout=2.0)


async def wait_for(condition: Callable[[], bool | Awaitable[bool]], seconds: float) -> float:
    """Poll a condition (sync or async) in real time; the seconds it took."""
    start = time.monotonic()
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            break
        if time.monotonic() - start > seconds:
            raise AssertionError("condition not reached in time")
        await trio.sleep(0.05)
    return time.monotonic() - start
