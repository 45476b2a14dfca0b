"""
The refresher's decisions, deterministically: no daemon, no socket of ours, no real time.

The scheduler runs in the test's trio run on a MockClock, against the
development provider on 127.0.0.1, with grants in `MemoryStore`: a second
implementation of store.GrantStore (not a patch of ours), in miniature what a
fleet's store does: it says whether this daemon may refresh an account, and
it can refuse a refresh's save as superseded. After a clock jump, `quiet`
waits for what the refresher started by its events; a check that nothing
happened reads the record's phase, which the refresher's loop sets before it
blocks, so it cannot pass merely because the daemon was slow.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest
import structlog
import trio
import trio.testing
from conftest import T0, USER, make_config, mock_now, quiet

from mailoauthd.errors import StateError, TransientGrantError
from mailoauthd.refresh.accounts import Phase, Slot
from mailoauthd.refresh.scheduler import Scheduler
from mailoauthd.secret import Secret
from mailoauthd.storage import state
from mailoauthd.storage.state import AccountState
from mailoauthd.storage.store import FilesStore, GrantStore
from mailoauthd.testing import DevProvider

FAST = 'refresh_spread = "0s"'


class Superseded(StateError):
    """What a fleet's store raises when a fenced write finds a newer grant."""

    code = "state-superseded"


class MemoryStore:
    """A GrantStore in a dict, that records every save and whether it was a refresh's."""

    def __init__(self) -> None:
        self.grants: dict[str, AccountState] = {}
        self.saves: list[tuple[AccountState, bool]] = []
        self.refresh_allowed = True
        # Refuse the refresh save with this number (1-based), as written by another daemon.
        self.supersede_save: int | None = None
        self.newer: AccountState | None = None
        self.broken_save: int | None = None  # fail that refresh save with a StateError

    def open(self) -> None:
        """Nothing to take."""

    def close(self) -> None:
        """Nothing held."""

    def load(self, account: str) -> AccountState | None:
        return self.grants.get(account)

    def save(self, state: AccountState, *, refresh: bool = False) -> None:
        self.saves.append((state, refresh))
        refreshes = sum(1 for _, flag in self.saves if flag)
        if refresh and refreshes == self.broken_save:
            raise StateError(f"{state.account}: the store answered nonsense")
        if refresh and refreshes == self.supersede_save:
            assert self.newer is not None
            self.grants[state.account] = self.newer
            raise Superseded(f"{state.account}: another daemon wrote a newer grant")
        self.grants[state.account] = state

    def remove(self, account: str) -> None:
        self.grants.pop(account, None)

    def accounts(self) -> list[str]:
        return sorted(self.grants)

    def set_aside(self, account: str, now: datetime) -> object:
        return self.grants.pop(account, None)

    def path(self, account: str) -> object:
        return f"memory:{account}"

    def may_refresh(self, account: str) -> bool:
        return self.refresh_allowed


def grant(
    provider: DevProvider,
    account: str = "work",
    *,
    expires_in: float | None,
    token: str = "seeded",  # noqa: S107 - a test's stand-in access token
) -> AccountState:
    """A grant as an earlier run (or another daemon) stored it, at T0."""
    st = state.imported(account, Secret(provider.issue_refresh_token(USER)), T0)
    if expires_in is None:
        return st
    return dataclasses.replace(
        st, access_token=Secret(token), expires_at=T0 + timedelta(seconds=expires_in)
    )


@asynccontextmanager
async def running(
    tmp: Path,
    provider: DevProvider,
    clock: trio.testing.MockClock,
    store: GrantStore,
    *,
    accounts: tuple[str, ...] = ("work",),
    daemon_keys: str = FAST,
) -> AsyncIterator[Scheduler]:
    """The scheduler, running in this trio run on the MockClock, with `store`."""
    cfg = make_config(tmp, provider, accounts=accounts, daemon_keys=daemon_keys)
    async with httpx.AsyncClient() as http, trio.open_nursery() as nursery:
        scheduler = Scheduler(
            store=store,
            http=http,
            settings=cfg.daemon,
            accounts=cfg.accounts,
            secrets={"dev": Secret("demo-secret")},
            now=mock_now(clock),
            rng=random.Random(7),  # noqa: S311 - the jitter, made repeatable
        )
        await nursery.start(scheduler.run)
        yield scheduler
        nursery.cancel_scope.cancel()


def refreshes(provider: DevProvider) -> int:
    return provider.count(grant_type="refresh_token")


def slot(scheduler: Scheduler, name: str = "work") -> Slot:
    return scheduler.refresher.slots[name]


class TestPhase:
    def test_a_refresh_goes_through_the_phases(self, provider: DevProvider, tmp_path: Path) -> None:
        """IDLE → SCHEDULED → REFRESHING → RETRY_WAIT → REFRESHING → IDLE, events set on the way."""
        account = make_config(tmp_path, provider).accounts["work"]
        record = Slot(account=account, state=AccountState(account="work"))
        record.schedule(T0)
        assert (record.phase, record.due) == (Phase.SCHEDULED, T0)
        done = record.start()
        assert (record.phase, record.due, record.in_flight) == (Phase.REFRESHING, None, done)
        record.retry(T0 + timedelta(seconds=10))  # asked during the attempt: after it ends
        assert record.phase is Phase.REFRESHING
        record.finish()
        assert done.is_set()
        assert (record.phase, record.in_flight) == (Phase.RETRY_WAIT, None)
        record.start()
        record.finish()
        assert (record.phase, record.due) == (Phase.IDLE, None)

    def test_a_replaced_grant_drops_what_was_pending(
        self, provider: DevProvider, tmp_path: Path
    ) -> None:
        """A scheduled refresh or a retry of the old grant is dropped; one in flight runs on."""
        account = make_config(tmp_path, provider).accounts["work"]
        record = Slot(account=account, state=AccountState(account="work"))
        record.retry(T0)
        record.replace_grant(AccountState(account="work"))
        assert (record.phase, record.due) == (Phase.IDLE, None)
        record.start()
        record.replace_grant(AccountState(account="work"))
        assert record.phase is Phase.REFRESHING

    @pytest.mark.parametrize(
        "illegal",
        [
            lambda r: r.finish(),  # nothing in flight
            lambda r: (r.schedule(T0), r.schedule(T0)),  # scheduled twice
            lambda r: (r.schedule(T0), r.retry(T0)),  # a retry of nothing that failed
        ],
    )
    def test_other_transitions_are_refused(
        self, provider: DevProvider, tmp_path: Path, illegal: Callable[[Slot], object]
    ) -> None:
        account = make_config(tmp_path, provider).accounts["work"]
        record = Slot(account=account, state=AccountState(account="work"))
        with pytest.raises(AssertionError):
            illegal(record)


class TestDecisions:
    async def test_each_check_refreshes_only_what_is_due(
        self, clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path
    ) -> None:
        """Due within refresh_before: refreshed at this check; the others stay idle."""
        store = MemoryStore()
        for name, expires_in in (("soon", 300), ("later", 660), ("far", 3600)):
            store.grants[name] = grant(dev, name, expires_in=expires_in)
        async with running(
            tmp_path, dev, clock, store, accounts=("soon", "later", "far")
        ) as scheduler:
            await quiet(scheduler)
            assert refreshes(dev) == 1
            assert store.grants["soon"].last_refresh == T0
            clock.jump(179)
            await quiet(scheduler)
            assert [slot(scheduler, n).phase for n in ("later", "far")] == [Phase.IDLE] * 2
            assert refreshes(dev) == 1
            clock.jump(1)  # the next check: "later" expires in 8 min
            await quiet(scheduler)
            assert refreshes(dev) == 2
            assert store.grants["later"].last_refresh == T0 + timedelta(seconds=180)
            assert store.grants["far"].last_refresh is None

    async def test_a_request_takes_over_a_scheduled_refresh(
        self, clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path
    ) -> None:
        """A request that refreshes during the spread leaves nothing for the schedule to do."""
        store = MemoryStore()
        store.grants["work"] = grant(dev, expires_in=500)
        async with running(
            tmp_path, dev, clock, store, daemon_keys='refresh_spread = "60s"'
        ) as scheduler:
            await quiet(scheduler)
            assert slot(scheduler).phase is Phase.SCHEDULED
            st = await scheduler.token("work", 600, trio.current_time() + 15)
            assert st.valid_for(mock_now(clock)()) > 600
            assert slot(scheduler).phase is Phase.IDLE
            clock.jump(61)
            await quiet(scheduler)
            assert refreshes(dev) == 1

    async def test_a_transient_failure_is_retried_after_its_backoff(
        self, clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path
    ) -> None:
        """A 503 waits 5 to 10 s (10 s × [0.5, 1)), not a second less, then retries."""
        store = MemoryStore()
        store.grants["work"] = grant(dev, expires_in=300)
        dev.add_fault("status", status=503)
        async with running(tmp_path, dev, clock, store) as scheduler:
            await quiet(scheduler)
            record = slot(scheduler)
            assert record.phase is Phase.RETRY_WAIT
            assert record.due is not None
            wait = (record.due - mock_now(clock)()).total_seconds()
            assert 5 <= wait <= 10
            clock.jump(wait - 0.5)
            await quiet(scheduler)
            assert (record.phase, refreshes(dev)) == (Phase.RETRY_WAIT, 1)
            clock.jump(1)
            await quiet(scheduler)
            assert (record.phase, refreshes(dev)) == (Phase.IDLE, 2)
            assert store.grants["work"].status == state.OK

    async def test_after_a_suspend_one_refresh_serves_request_and_check(
        self, clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path
    ) -> None:
        """The clock jumps past expiry: the request's refresh is the check's too."""
        store = MemoryStore()
        store.grants["work"] = grant(dev, expires_in=3600)
        async with running(tmp_path, dev, clock, store) as scheduler:
            await quiet(scheduler)
            clock.jump(7200)
            st = await scheduler.token("work", None, trio.current_time() + 15)
            assert st.access_token != Secret("seeded")
            await quiet(scheduler)
            assert (slot(scheduler).phase, refreshes(dev)) == (Phase.IDLE, 1)


class TestStoreSeam:
    def test_files_may_always_refresh(self, tmp_path: Path) -> None:
        """One daemon holds a state directory: it refreshes everything in it."""
        assert FilesStore(tmp_path).may_refresh("work") is True

    async def test_the_refreshers_saves_say_so(
        self, clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path
    ) -> None:
        """The refresh_sent note and the answer are refresh saves; an import is not."""
        store = MemoryStore()
        async with running(tmp_path, dev, clock, store) as scheduler:
            await scheduler.import_token("work", Secret(dev.issue_refresh_token(USER)))
        kinds = [(st.refresh_sent is not None, refresh) for st, refresh in store.saves]
        assert kinds == [(False, False), (True, True), (False, True)]

    async def test_without_the_right_nothing_is_refreshed(
        self, clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path
    ) -> None:
        """A due grant another daemon refreshes: no check refreshes it; its token is served."""
        store = MemoryStore()
        store.grants["work"] = grant(dev, expires_in=300)
        store.refresh_allowed = False
        async with running(tmp_path, dev, clock, store) as scheduler:
            for _ in range(2):
                await quiet(scheduler)
                assert slot(scheduler).phase is Phase.IDLE
                served = scheduler.token_now("work", 60)
                assert served is not None
                assert served.access_token == Secret("seeded")
                clock.jump(180)  # the next check
            assert refreshes(dev) == 0

    async def test_a_request_waits_for_the_grant_another_daemon_stores(
        self, clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path
    ) -> None:
        """Not ours to refresh: a request for a longer-lived token waits until `adopt`
        brings the grant the other daemon stored."""
        store = MemoryStore()
        store.grants["work"] = grant(dev, expires_in=300)
        store.refresh_allowed = False
        got: list[AccountState] = []
        async with running(tmp_path, dev, clock, store) as scheduler:
            async with trio.open_nursery() as nursery:

                async def ask() -> None:
                    got.append(await scheduler.token("work", 600, trio.current_time() + 15))

                nursery.start_soon(ask)
                await trio.testing.wait_all_tasks_blocked()
                assert got == []
                store.grants["work"] = grant(dev, expires_in=3600, token="from-leader")
                scheduler.adopt("work")
        assert [st.access_token for st in got] == [Secret("from-leader")]
        assert refreshes(dev) == 0

    async def test_a_forced_refresh_is_refused_at_once_naming_the_leader(
        self, clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path
    ) -> None:
        """`mailoauth refresh` on a daemon that may not refresh: told where to ask, at
        once (the leader's next refresh may be most of an hour away), and nothing sent."""
        store = MemoryStore()
        store.grants["work"] = grant(dev, expires_in=300)
        store.refresh_allowed = False
        async with running(tmp_path, dev, clock, store) as scheduler:
            with pytest.raises(TransientGrantError, match="another daemon of the fleet"):
                await scheduler.refresh("work")
        assert refreshes(dev) == 0

    async def test_an_import_on_a_follower_leaves_the_refresh_to_the_leader(
        self, clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path
    ) -> None:
        """`mailoauth import` on a daemon that may not refresh: the grant is stored (not as
        a refresh's write), nothing is sent, and the answer is the grant the leader
        stores after refreshing with it."""
        store = MemoryStore()
        store.refresh_allowed = False
        token = Secret(dev.issue_refresh_token(USER))
        got: list[AccountState] = []
        async with running(tmp_path, dev, clock, store) as scheduler:
            async with trio.open_nursery() as nursery:

                async def ask() -> None:
                    got.append(await scheduler.import_token("work", token))

                nursery.start_soon(ask)
                # The save runs in a worker thread, which trio counts as blocked: wait
                # until the import holds its grant (it then waits for the leader's).
                while slot(scheduler).state.refresh_token != token:
                    await trio.testing.wait_all_tasks_blocked()
                assert got == []
                assert [(st.refresh_token, refresh) for st, refresh in store.saves] == [
                    (token, False)
                ]
                store.grants["work"] = grant(dev, expires_in=3600, token="from-leader")
                scheduler.adopt("work")
        assert [st.access_token for st in got] == [Secret("from-leader")]
        assert refreshes(dev) == 0

    async def test_a_request_gives_up_at_its_deadline(
        self, clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path
    ) -> None:
        """No newer grant in time: a clear error, not a refresh."""
        store = MemoryStore()
        store.grants["work"] = grant(dev, expires_in=300)
        store.refresh_allowed = False
        async with running(tmp_path, dev, clock, store) as scheduler:
            async with trio.open_nursery() as nursery:

                async def ask() -> None:
                    with pytest.raises(TransientGrantError, match="another mailoauthd"):
                        await scheduler.token("work", 600, trio.current_time() + 15)

                nursery.start_soon(ask)
                await trio.testing.wait_all_tasks_blocked()
                clock.jump(15)
        assert refreshes(dev) == 0

    async def test_a_poke_refreshes_an_interrupted_refresh_at_once(
        self, clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path
    ) -> None:
        """Given the right (a new leader), a refresh that died in flight is retried now."""
        store = MemoryStore()
        store.grants["work"] = state.refresh_sent(grant(dev, expires_in=3000), T0)
        store.refresh_allowed = False
        async with running(tmp_path, dev, clock, store) as scheduler:
            await quiet(scheduler)
            assert refreshes(dev) == 0
            store.refresh_allowed = True
            scheduler.poke()
            await quiet(scheduler)
            assert refreshes(dev) == 1
            assert store.grants["work"].refresh_sent is None

    async def test_a_superseded_answer_is_dropped_for_the_newer_grant(
        self, clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path
    ) -> None:
        """Another daemon stored a newer grant meanwhile: ours is not served; theirs is."""
        store = MemoryStore()
        store.grants["work"] = grant(dev, expires_in=None)
        store.supersede_save = 2  # the answer; the refresh_sent note went first
        store.newer = grant(dev, expires_in=3600, token="from-leader")
        with structlog.testing.capture_logs() as logs:
            async with running(tmp_path, dev, clock, store) as scheduler:
                await quiet(scheduler)
                served = scheduler.token_now("work", None)
        assert served is not None
        assert served.access_token == Secret("from-leader")
        assert refreshes(dev) == 1
        assert store.saves[0][0].refresh_sent is not None
        assert [e["event"] for e in logs].count("token.refresh_superseded") == 1
        superseded = next(e for e in logs if e["event"] == "token.refresh_superseded")
        assert superseded["log_level"] == "info"

    async def test_adopt_leaves_a_refresh_in_flight_alone(
        self, clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path
    ) -> None:
        """A refresh in flight here ends in a save that finds the newer grant, if there is one."""
        store = MemoryStore()
        store.grants["work"] = grant(dev, expires_in=None)
        dev.add_fault("delay", seconds=0.2)
        async with running(tmp_path, dev, clock, store) as scheduler:
            await trio.testing.wait_all_tasks_blocked()
            record = slot(scheduler)
            assert record.phase is Phase.REFRESHING
            generation = record.generation
            store.grants["work"] = grant(dev, expires_in=3600, token="from-leader")
            scheduler.adopt("work")
            assert record.generation == generation
            await quiet(scheduler)
            assert record.state.access_token != Secret("from-leader")

    async def test_another_store_error_is_retried_as_a_transient_failure(
        self, clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path
    ) -> None:
        """A store's error other than 'superseded': the old token is served, and retried."""
        store = MemoryStore()
        store.grants["work"] = grant(dev, expires_in=300)
        store.broken_save = 1  # the refresh_sent note
        async with running(tmp_path, dev, clock, store) as scheduler:
            await quiet(scheduler)
            record = slot(scheduler)
            assert record.phase is Phase.RETRY_WAIT
            assert "internal error" in str(record.last_error())
            served = scheduler.token_now("work", None)
            assert served is not None
            assert served.access_token == Secret("seeded")
            assert refreshes(dev) == 0
            clock.jump(10)
            await quiet(scheduler)
            assert (record.phase, refreshes(dev)) == (Phase.IDLE, 1)
