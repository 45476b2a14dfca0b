"""
The scheduler end to end, driven by trio's MockClock: the daemon runs in-process
against the development provider over real HTTP; time moves only when a test
jumps the clock. After a jump, `quiet` waits for what the daemon started (every
task blocked, every refresh's event set), never for real time.

The refresher's decisions alone, and the fleet's store seam, are in test_refresher.py.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import trio
import trio.testing
from conftest import T0, USER, in_process_daemon, make_config, mock_now, quiet

from mailoauthd.errors import ReauthorizationRequired, StateError
from mailoauthd.secret import Secret
from mailoauthd.storage import state
from mailoauthd.storage.state import TokenStore
from mailoauthd.testing import DevProvider

FAST = 'refresh_spread = "0s"'


def seed(tmp: Path, provider: DevProvider, account: str, *, expires_in: float | None) -> str:
    """Store `account`'s state as an earlier run would have left it; returns its refresh token."""
    refresh_token = provider.issue_refresh_token(USER)
    st = state.imported(account, Secret(refresh_token), T0)
    if expires_in is not None:
        st = dataclasses.replace(
            st,
            access_token=Secret(f"seeded-{account}"),
            expires_at=T0 + timedelta(seconds=expires_in),
        )
    store = TokenStore(tmp / "state")
    store.open()
    store.save(st)
    store.close()
    return refresh_token


def refreshes(provider: DevProvider) -> int:
    return provider.count(grant_type="refresh_token")


def stored(tmp: Path, account: str) -> state.AccountState:
    st = state.from_toml((tmp / "state" / f"{account}.toml").read_text(), source=account)
    return st


class TestScheduledCheck:
    async def test_refreshes_only_tokens_inside_refresh_before(
        self, clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path
    ) -> None:
        """Each check refreshes exactly the accounts whose token expires within refresh_before."""
        cfg = make_config(tmp_path, dev, accounts=("soon", "later", "far"), daemon_keys=FAST)
        seed(tmp_path, dev, "soon", expires_in=300)  # inside 10 min: due now
        seed(tmp_path, dev, "later", expires_in=660)  # due after the next check (3 min)
        seed(tmp_path, dev, "far", expires_in=3600)
        async with in_process_daemon(cfg, now=mock_now(clock)) as d:
            await quiet(d.scheduler)  # the start-up check's refresh, answered and stored
            assert refreshes(dev) == 1
            assert stored(tmp_path, "soon").last_refresh == T0
            assert stored(tmp_path, "later").last_refresh is None
            clock.jump(179)  # not yet the next check
            await quiet(d.scheduler)
            assert refreshes(dev) == 1
            clock.jump(1)  # the second check: "later" now expires in 8 min
            await quiet(d.scheduler)
            assert refreshes(dev) == 2
            assert stored(tmp_path, "later").last_refresh == T0 + timedelta(seconds=180)
            assert stored(tmp_path, "far").last_refresh is None
            clock.jump(180)
            await quiet(d.scheduler)
            assert refreshes(dev) == 2  # "far" is still 54 min from expiry

    async def test_spread_delays_but_never_past_expiry(
        self, clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path
    ) -> None:
        """With refresh_spread, due refreshes start within the spread window, not at once."""
        cfg = make_config(tmp_path, dev, daemon_keys='refresh_spread = "60s"')
        seed(tmp_path, dev, "work", expires_in=500)
        async with in_process_daemon(cfg, now=mock_now(clock)) as d:
            await quiet(d.scheduler)
            waited = 0
            while refreshes(dev) == 0:
                assert waited <= 60
                clock.jump(1)
                waited += 1
                await quiet(d.scheduler)
            assert stored(tmp_path, "work").last_refresh is not None


class TestSingleFlight:
    async def test_concurrent_requests_cause_one_refresh(
        self, clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path
    ) -> None:
        """Twenty requests for an expired token, with a slow provider, cause one refresh."""
        cfg = make_config(tmp_path, dev, daemon_keys=FAST)
        seed(tmp_path, dev, "work", expires_in=None)
        dev.add_fault("delay", seconds=0.3)
        async with in_process_daemon(cfg, now=mock_now(clock)) as d:
            results: list[str] = []

            async def ask() -> None:
                st = await d.scheduler.token("work", None, trio.current_time() + 15)
                assert st.access_token is not None
                results.append(st.access_token.reveal())

            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(ask)
            assert len(results) == 20
            assert len(set(results)) == 1
            assert refreshes(dev) == 1


class TestRotation:
    async def test_rotated_refresh_token_is_persisted_before_use(
        self, clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path
    ) -> None:
        """Under strict rotation the stored refresh token is always the one the provider accepts."""
        dev.set_options(refresh_token_rotation="strict", access_token_lifetime=600)
        cfg = make_config(tmp_path, dev, daemon_keys=FAST)
        first = seed(tmp_path, dev, "work", expires_in=None)
        async with in_process_daemon(cfg, now=mock_now(clock)) as d:
            await quiet(d.scheduler)  # the start-up check's refresh
            assert refreshes(dev) == 1
            for _ in range(3):
                before = refreshes(dev)
                st = await d.scheduler.refresh("work")
                assert refreshes(dev) == before + 1
                on_disk = stored(tmp_path, "work")
                assert on_disk.refresh_token is not None
                assert dev.valid_refresh_tokens(USER) == [on_disk.refresh_token.reveal()]
                assert on_disk.access_token == st.access_token
        assert stored(tmp_path, "work").refresh_token != Secret(first)

    async def test_provider_that_does_not_rotate_keeps_the_old_token(
        self, clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path
    ) -> None:
        """A response without refresh_token keeps the stored one."""
        dev.set_options(refresh_token_rotation="none")
        cfg = make_config(tmp_path, dev, daemon_keys=FAST)
        first = seed(tmp_path, dev, "work", expires_in=None)
        async with in_process_daemon(cfg, now=mock_now(clock)) as d:
            await d.scheduler.refresh("work")
        assert stored(tmp_path, "work").refresh_token == Secret(first)


class TestPermanentFailure:
    async def test_revoked_grant_needs_authorization_and_stops_retrying(
        self, clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path
    ) -> None:
        """invalid_grant moves the account to needs_authorization; nothing is retried after.

        The access token in hand is served until it gets within min_validity of
        its expiry: the mail server may well accept it that long.
        """
        cfg = make_config(tmp_path, dev, daemon_keys=FAST)
        seed(tmp_path, dev, "work", expires_in=120)
        dev.revoke_user(USER)
        async with in_process_daemon(cfg, now=mock_now(clock)) as d:
            await quiet(d.scheduler)
            assert refreshes(dev) == 1
            assert stored(tmp_path, "work").status == state.NEEDS_AUTHORIZATION
            st = await d.scheduler.token("work", None, trio.current_time() + 15)
            assert st.access_token == Secret("seeded-work")
            clock.jump(61)
            with pytest.raises(ReauthorizationRequired) as caught:
                await d.scheduler.token("work", None, trio.current_time() + 15)
            assert "mailoauth authorize work" in caught.value.hint
            for _ in range(5):
                clock.jump(180)
                await quiet(d.scheduler)
            assert refreshes(dev) == 1


class TestTransientFailure:
    async def test_backoff_and_retry_after_while_old_token_is_served(
        self, clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path
    ) -> None:
        """5xx are retried with growing waits, 429's Retry-After honoured, the old token served."""
        cfg = make_config(tmp_path, dev, daemon_keys=FAST)
        seed(tmp_path, dev, "work", expires_in=500)
        dev.add_fault("status", status=503)
        dev.add_fault("status", status=502)
        dev.add_fault(
            "status", status=429, headers={"Retry-After": "120"}, body='{"error":"slow_down"}'
        )
        attempts: list[float] = []
        async with in_process_daemon(cfg, now=mock_now(clock)) as d:
            for _ in range(3):
                await quiet(d.scheduler)
                assert refreshes(dev) == len(attempts) + 1
                attempts.append(clock.current_time())
                st = await d.scheduler.token("work", None, trio.current_time() + 15)
                assert st.access_token == Secret("seeded-work")  # still valid: still served
                assert stored(tmp_path, "work").status == state.FAILING
                retry_at = d.scheduler.status()[0]["next_check"]
                assert isinstance(retry_at, str)
                gap = (
                    datetime.fromisoformat(retry_at)
                    - (T0 + timedelta(seconds=clock.current_time()))
                ).total_seconds()
                clock.jump(max(0.0, gap - 1))
                await quiet(d.scheduler)
                assert refreshes(dev) == len(attempts)  # not before its time
                clock.jump(2)
            await quiet(d.scheduler)
            assert refreshes(dev) == 4
            attempts.append(clock.current_time())
            assert stored(tmp_path, "work").status == state.OK
        gaps = [b - a for a, b in zip(attempts, attempts[1:], strict=False)]
        assert 5 <= gaps[0] <= 11  # 10 s × [0.5, 1)
        assert 10 <= gaps[1] <= 21  # 20 s × [0.5, 1)
        assert gaps[2] >= 120  # Retry-After
        times = [r.time for r in dev.requests if r.path == "/token"]
        assert [round(t - times[0]) for t in times] == [round(a - attempts[0]) for a in attempts]


class TestTiming:
    async def test_short_refresh_before_is_caught_before_min_validity(
        self, clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path
    ) -> None:
        """A token not due at one check is refreshed before it drops under min_validity."""
        cfg = make_config(
            tmp_path,
            dev,
            daemon_keys=FAST + '\nrefresh_before = "30s"\nmin_validity = "10s"',
        )
        seed(tmp_path, dev, "work", expires_in=100)
        async with in_process_daemon(cfg, now=mock_now(clock)) as d:
            await quiet(d.scheduler)
            assert refreshes(dev) == 0
            clock.jump(89)
            await quiet(d.scheduler)
            assert refreshes(dev) == 0
            clock.jump(1)  # 10 s before expiry, long before the next 3-minute check
            await quiet(d.scheduler)
            assert refreshes(dev) == 1

    async def test_after_a_suspend_the_next_request_refreshes(
        self, clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path
    ) -> None:
        """After the clock jumps past expiry (suspend/resume), a request gets a fresh token."""
        cfg = make_config(tmp_path, dev, daemon_keys=FAST)
        seed(tmp_path, dev, "work", expires_in=3600)
        async with in_process_daemon(cfg, now=mock_now(clock)) as d:
            await quiet(d.scheduler)
            clock.jump(7200)
            st = await d.scheduler.token("work", None, trio.current_time() + 15)
            assert st.access_token != Secret("seeded-work")
            assert st.valid_for(mock_now(clock)()) > 3000
            await quiet(d.scheduler)
            assert refreshes(dev) == 1  # the request's refresh and the check's were one

    async def test_at_most_max_concurrent_refreshes(
        self, clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path
    ) -> None:
        """With six accounts due and a slow provider, two refreshes run and the others wait."""
        names = tuple(f"a{i}" for i in range(6))
        cfg = make_config(
            tmp_path, dev, accounts=names, daemon_keys=FAST + "\nmax_concurrent_refreshes = 2"
        )
        for name in names:
            seed(tmp_path, dev, name, expires_in=None)
        dev.add_fault("delay", count=6, seconds=0.2)
        async with in_process_daemon(cfg, now=mock_now(clock)) as d:
            # Every task has run until it blocks: two refreshes wait for the slow
            # provider, the other four for the limiter.
            await trio.testing.wait_all_tasks_blocked()
            stats = d.scheduler.refresher.limiter.statistics()
            assert stats.borrowed_tokens == 2
            assert stats.tasks_waiting >= 1
            await quiet(d.scheduler)
            assert refreshes(dev) == 6


class TestClientCredentials:
    async def test_app_only_account_gets_tokens_without_authorization(
        self, clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path
    ) -> None:
        """A client_credentials account is served from the start, with no refresh token."""
        cfg = make_config(tmp_path, dev, account_keys='flow = "client_credentials"')
        async with in_process_daemon(cfg, now=mock_now(clock)) as d:
            st = await d.scheduler.token("work", None, trio.current_time() + 15)
            assert st.access_token is not None
            assert st.refresh_token is None
            assert dev.count(grant_type="client_credentials") == 1
            assert stored(tmp_path, "work").status == state.OK


class TestBrokenState:
    async def test_unreadable_state_is_reported_kept_and_set_aside_on_import(
        self, clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path
    ) -> None:
        """A garbage state file is reported by name, never overwritten, and kept on import."""
        cfg = make_config(tmp_path, dev, accounts=("work", "home"), daemon_keys=FAST)
        seed(tmp_path, dev, "home", expires_in=3600)
        garbage = b"\x00\xff not toml"
        (tmp_path / "state").mkdir(exist_ok=True)
        (tmp_path / "state" / "work.toml").write_bytes(garbage)
        async with in_process_daemon(cfg, now=mock_now(clock)) as d:
            rows = {row["account"]: row for row in d.scheduler.status()}
            assert rows["work"]["status"] == "state_error"
            assert str(tmp_path / "state" / "work.toml") in str(rows["work"]["last_error"])
            assert rows["home"]["status"] == "ok"  # the others carry on
            with pytest.raises(StateError):
                await d.scheduler.token("work", None, trio.current_time() + 15)
            clock.jump(600)
            await quiet(d.scheduler)
            assert (tmp_path / "state" / "work.toml").read_bytes() == garbage
            await d.scheduler.import_token("work", Secret(dev.issue_refresh_token(USER)))
            aside = list((tmp_path / "state").glob("work.toml.corrupt-*"))
            assert [p.read_bytes() for p in aside] == [garbage]
            assert stored(tmp_path, "work").status == state.OK
