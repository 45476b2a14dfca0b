"""
Three real daemons on a real 3-member etcd cluster, against the development provider in
strict rotation with a short reuse window: one leader refreshes, every node serves, and
faults (kill -9 of a daemon or an etcd member, a daemon paused past its lease, a daemon
cut off from etcd) never cost a token, a refresh token refused as reused, or an account.

MAILOAUTHD_SOAK=1 runs 300 fault cycles instead of 30.
"""

from __future__ import annotations

import base64
import json
import os
import random
import subprocess
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import httpx
import pytest

from mailoauthd.errors import EXIT_TEMPORARY
from mailoauthd.testing import DevProvider
from tests.conftest import USER
from tests.fleet.cluster import Cluster
from tests.fleet.nodes import Node, wait_until

pytestmark = pytest.mark.slow

ACCOUNTS = ("work", "home", "shared")
# 2 s: the shortest lease etcd grants with renewals every third; failover in ~3 s.
LEASE_TTL = 2
# Tokens live 20 s and are refreshed 12 s before they expire: a follower always
# holds one valid for more than min_validity (3 s) through a failover (≤ TTL + a
# quarter TTL + a check) and a cut of TTL + 1 s. Refreshes come every ~8 s.
LIFETIME = 20
ACCOUNT_KEYS = 'refresh_before = "12s"\nmin_validity = "3s"'
DAEMON_KEYS = 'refresh_interval = "1s"\nrefresh_spread = "0s"\nrequest_timeout = "5s"'
# 15 s: a refresh that died with its leader is retried by the next one within
# TTL + a check; far inside this (Okta's default grace period is 30 s).
REUSE_INTERVAL = 15
CYCLES = 300 if os.environ.get("MAILOAUTHD_SOAK") == "1" else 30
FAULTS = ("kill daemon", "kill etcd member", "pause daemon", "cut daemon")


class Fleet:
    def __init__(self, base: Path, cluster: Cluster, provider: DevProvider, prefix: str) -> None:
        self.cluster = cluster
        self.provider = provider
        ports = [m.client_port for m in cluster.members]
        self.nodes = [
            Node(
                base,
                i,
                provider,
                ports,
                accounts=ACCOUNTS,
                lease_ttl=LEASE_TTL,
                account_keys=ACCOUNT_KEYS,
                daemon_keys=DAEMON_KEYS,
                prefix=prefix,
            )
            for i in range(3)
        ]
        self.refresh_tokens: dict[str, str] = {}

    def start(self) -> None:
        for node in self.nodes:
            node.start(wait=False)
        for node in self.nodes:
            assert node.proc is not None
            node.proc.wait_ready(60)

    def leader(self) -> Node | None:
        for node in self.nodes:
            if node.paused or node.proc is None or node.proc.proc.poll() is not None:
                continue
            done = node.status()
            if done.returncode == 0 and json.loads(done.stdout).get("store", {}).get("refreshing"):
                return node
        return None

    def refused_as_reused(self) -> int:
        return sum(
            1
            for r in self.provider.requests
            if r.path == "/token" and r.grant_type == "refresh_token" and r.status == 400
        )

    def close(self) -> None:
        for node in self.nodes:
            node.close()


@pytest.fixture
def fleet(cluster: Cluster, tmp_path: Path) -> Iterator[Fleet]:
    cluster.wait_healthy()
    with DevProvider(
        access_token_lifetime=LIFETIME,
        refresh_token_rotation="strict",
        refresh_token_reuse_interval=REUSE_INTERVAL,
    ) as provider:
        f = Fleet(tmp_path, cluster, provider, f"/chaos-{tmp_path.name}/")
        try:
            f.start()
            for account in ACCOUNTS:
                token = provider.issue_refresh_token(f"{account}-{USER}")
                # Imported on any node: the leader refreshes it.
                node = f.nodes[ACCOUNTS.index(account)]
                done = subprocess.run(
                    [*_helper(node), "import", account],
                    input=token + "\n",
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=False,
                )
                assert done.returncode == 0, done.stderr + node.logs()
            yield f
        finally:
            f.close()
            cluster.wait_healthy()


def _helper(node: Node) -> list[str]:
    from tests.conftest import MAILOAUTH

    return [str(MAILOAUTH), "--socket", str(node.socket)]


def assert_valid_token(fleet: Fleet, node: Node, account: str) -> None:
    done = node.token(account)
    assert done.returncode == 0, f"{node.name} {account}: {done.stderr}\n{node.logs()}"
    token = done.stdout.strip()
    assert fleet.provider.introspect(token)["active"], f"{node.name} {account}: inactive token"


def test_one_leader_refreshes_every_node_serves(fleet: Fleet) -> None:
    leader = fleet.leader()
    assert leader is not None, [n.status().stdout for n in fleet.nodes] + [fleet.nodes[0].logs()]
    for node in fleet.nodes:
        reply = json.loads(node.status().stdout)
        assert reply["store"]["healthy"], reply
        assert reply["store"]["refreshing"] == (node is leader)
        for account in ACCOUNTS:
            assert_valid_token(fleet, node, account)
    # Through a rotation or two, every node serves the newest token.
    time.sleep(LIFETIME - 12 + 2)
    for node in fleet.nodes:
        for account in ACCOUNTS:
            assert_valid_token(fleet, node, account)
    assert fleet.refused_as_reused() == 0
    # kill -9 of the leader: another takes over within TTL + a check.
    leader.kill()
    started = time.monotonic()
    wait_until(lambda: fleet.leader() is not None, LEASE_TTL + 5, "a new leader")
    took = time.monotonic() - started
    assert took <= LEASE_TTL + 5
    text = subprocess.run(
        [*_helper(fleet.nodes[(fleet.nodes.index(leader) + 1) % 3]), "status"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    assert "store: etcd" in text


def test_a_leader_paused_mid_refresh_is_fenced_out(fleet: Fleet) -> None:
    """
    The leader's request has left (its note `refresh_sent` is in etcd) when it is paused
    past its lease: the next leader retries with the same refresh token inside the reuse
    window, and the old leader's answer, when it wakes, is refused by the fence and dropped.
    """
    leader = fleet.leader()
    assert leader is not None
    before = fleet.provider.received
    fleet.provider.add_fault("delay", seconds=1.0)
    wait_until(lambda: fleet.provider.received > before, LIFETIME, "a refresh")
    leader.pause()
    try:
        wait_until(
            lambda: (new := fleet.leader()) is not None and new is not leader,
            LEASE_TTL + 5,
            "a new leader",
        )
        # The new leader retried the interrupted refresh with the spent token, at once.
        wait_until(lambda: _retried(fleet), LEASE_TTL + 5, "the interrupted refresh retried")
    finally:
        time.sleep(1)
        leader.resume()
    wait_until(
        lambda: "token.refresh_superseded" in _full_log(leader),
        10,
        "the old leader's answer dropped",
    )
    for node in fleet.nodes:
        for account in ACCOUNTS:
            assert_valid_token(fleet, node, account)
    assert fleet.refused_as_reused() == 0


def test_a_node_cut_from_etcd_serves_refreshes_nothing_and_says_so(fleet: Fleet) -> None:
    leader = fleet.leader()
    assert leader is not None
    leader.cut()
    try:
        wait_until(
            lambda: (new := fleet.leader()) is not None and new is not leader,
            LEASE_TTL + 5,
            "a new leader on the majority side",
        )
        wait_until(lambda: _check(leader).returncode != 0, LEASE_TTL + 5, "status --check fails")
        done = _check(leader)
        assert done.returncode == EXIT_TEMPORARY, done.stdout
        assert "store: etcd UNHEALTHY" in done.stdout
        assert "refreshing nothing; serving the tokens held" in done.stdout
        reply = json.loads(leader.status().stdout)
        assert not reply["store"]["refreshing"]
        assert not reply["store"]["reachable"]
        for account in ACCOUNTS:
            assert_valid_token(fleet, leader, account)  # what it holds, it serves
        assert _check(fleet.leader()).returncode == 0  # type: ignore[arg-type]
    finally:
        leader.restore()
    wait_until(lambda: _check(leader).returncode == 0, LEASE_TTL + 10, "healthy again")
    assert fleet.refused_as_reused() == 0


def test_a_tampered_or_swapped_grant_in_etcd_is_refused_and_reported(fleet: Fleet) -> None:
    prefix = fleet.nodes[0].prefix
    endpoint = fleet.cluster.endpoints[0]
    work = _etcd_get(endpoint, f"{prefix}grants/work")
    tampered = bytearray(_etcd_get(endpoint, f"{prefix}grants/home"))
    tampered[-5] ^= 1
    _etcd_put(endpoint, f"{prefix}grants/home", bytes(tampered))
    _etcd_put(endpoint, f"{prefix}grants/shared", work)  # another account's sealed grant
    for node in fleet.nodes:
        for account, why in (("home", "home"), ("shared", "another account")):
            refused = partial(lambda n, a: n.token(a).returncode != 0, node, account)
            wait_until(refused, 10, f"{account} refused")
            done = node.token(account)
            assert f"etcd:{prefix}grants/{account}" in done.stderr, done.stderr
            assert why in done.stderr
            rows = json.loads(node.status().stdout)["accounts"]
            row = next(r for r in rows if r["account"] == account)
            assert row["status"] != "ok" or row.get("last_error"), row
        assert_valid_token(fleet, node, "work")
    assert fleet.refused_as_reused() == 0


def _etcd_get(endpoint: str, key: str) -> bytes:
    answer = httpx.post(f"{endpoint}/v3/kv/range", json={"key": _b64(key.encode())})
    return base64.b64decode(answer.json()["kvs"][0]["value"])


def _etcd_put(endpoint: str, key: str, value: bytes) -> None:
    body = {"key": _b64(key.encode()), "value": _b64(value)}
    httpx.post(f"{endpoint}/v3/kv/put", json=body).raise_for_status()


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _check(node: Node) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_helper(node), "status", "--check"], capture_output=True, text=True, check=False
    )


def _retried(fleet: Fleet) -> bool:
    """Whether a refresh token was used twice (the retry of a refresh that died in flight)."""
    used = [r.used for r in fleet.provider.rotations]
    return len(used) != len(set(used))


def _full_log(node: Node) -> str:
    return "".join(path.read_text(errors="replace") for path in node.dir.glob("*.log"))


class Asker(threading.Thread):
    """Asks every reachable node for every account's token, checking each one."""

    def __init__(self, fleet: Fleet) -> None:
        super().__init__(daemon=True)
        self.fleet = fleet
        self.skip: set[str] = set()
        self.failures: list[str] = []
        self.served = 0
        self.stop = False

    def run(self) -> None:
        while not self.stop:
            for node in self.fleet.nodes:
                for account in ACCOUNTS:
                    if node.name in self.skip or self.stop:
                        continue
                    done = node.token(account, timeout=30)
                    if node.name in self.skip:
                        continue  # a fault began meanwhile
                    if done.returncode != 0:
                        self.failures.append(f"{node.name} {account}: {done.stderr.strip()}")
                    elif not self.fleet.provider.introspect(done.stdout.strip())["active"]:
                        self.failures.append(f"{node.name} {account}: an inactive token")
                    else:
                        self.served += 1
            time.sleep(0.05)


def test_chaos(fleet: Fleet) -> None:
    rng = random.Random(int(os.environ.get("MAILOAUTHD_SEED", "13")))  # noqa: S311 - a schedule
    asker = Asker(fleet)
    asker.start()
    counts: dict[str, int] = {}
    try:
        for cycle in range(CYCLES):
            fault = rng.choice(FAULTS)
            counts[fault] = counts.get(fault, 0) + 1
            # Half the faults hit the leader: its death or isolation is what must not cost a token.
            leader = fleet.leader()
            node = leader if leader is not None and rng.random() < 0.5 else rng.choice(fleet.nodes)
            if fault == "kill daemon":
                asker.skip.add(node.name)
                node.kill()
                time.sleep(rng.uniform(0, 1))
                node.start()
                asker.skip.discard(node.name)
            elif fault == "kill etcd member":
                member = rng.choice(fleet.cluster.members)
                member.kill()
                time.sleep(rng.uniform(0, 1))
                fleet.cluster.restart(member)
                fleet.cluster.wait_healthy()
            elif fault == "pause daemon":
                asker.skip.add(node.name)
                node.pause()
                time.sleep(LEASE_TTL + 1)
                node.resume()
                time.sleep(0.3)
                asker.skip.discard(node.name)
            else:
                node.cut()
                time.sleep(LEASE_TTL + 1)
                node.restore()
            wait_until(
                lambda: fleet.leader() is not None, LEASE_TTL + 10, f"a leader, cycle {cycle}"
            )
            assert not asker.failures, f"cycle {cycle} ({fault}): {asker.failures[:5]}"
            assert fleet.refused_as_reused() == 0, f"cycle {cycle} ({fault}): refused as reused"
    finally:
        asker.stop = True
        asker.join(60)
    assert asker.served > CYCLES
    # No account lost: every node serves every account, fresh from the provider.
    for node in fleet.nodes:
        for account in ACCOUNTS:
            assert_valid_token(fleet, node, account)
    assert fleet.refused_as_reused() == 0
    assert not asker.failures, asker.failures[:5]
    refreshes = fleet.provider.count(grant_type="refresh_token")
    logs = [path.read_text(errors="replace") for n in fleet.nodes for path in n.dir.glob("*.log")]
    became_leader = sum(text.count('"leading": true') for text in logs)
    dropped = sum(text.count("token.refresh_superseded") for text in logs)
    print(
        f"fault cycles: {counts}; tokens served and checked: {asker.served}; "
        f"refreshes: {refreshes}; a daemon became leader {became_leader} times; "
        f"refresh writes refused (fence or newer grant): {dropped}"
    )
