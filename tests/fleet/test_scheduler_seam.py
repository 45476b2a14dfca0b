"""
The scheduler's side of a fleet, without etcd: may_refresh, save(refresh=True), adopt, poke.

The store is a FilesStore that plays the fleet's part: `leading` is what
may_refresh answers, and a refresh write is refused (Superseded) while this
daemon does not lead, or when the test has another daemon write first.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from pathlib import Path

import trio
import trio.testing

from mailoauthd.errors import TransientGrantError
from mailoauthd.secret import Secret
from mailoauthd.storage import state
from mailoauthd.storage.fleet import Superseded
from mailoauthd.storage.store import FilesStore
from mailoauthd.testing import DevProvider
from tests.conftest import T0, USER, quiet
from tests.test_refresher import running
from tests.test_scheduler import refreshes


class FleetLike(FilesStore):
    """A store that may refresh while `leading`; `other` is written first by another daemon."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.leading = False
        self.other: state.AccountState | None = None

    def may_refresh(self, account: str) -> bool:
        return self.leading

    def save(self, grant: state.AccountState, *, refresh: bool = False) -> None:
        if refresh and self.other is not None and grant.refresh_sent is None:
            super().save(self.other)  # another daemon's write lands first
            self.other = None
            raise Superseded(f"{account_path(grant)}: another daemon changed it since")
        if refresh and not self.leading:
            raise Superseded("this daemon does not lead")
        super().save(grant)


def account_path(grant: state.AccountState) -> str:
    return f"etcd:/t/grants/{grant.account}"


def grant(
    provider_token: str, *, expires_in: float, access: str, **changes: object
) -> state.AccountState:
    st = state.imported("work", Secret(provider_token), T0)
    return dataclasses.replace(
        st,
        access_token=Secret(access),
        expires_at=T0 + timedelta(seconds=expires_in),
        **changes,
    )


def fleet_store(tmp_path: Path, first: state.AccountState) -> FleetLike:
    (tmp_path / "state").mkdir(mode=0o700, exist_ok=True)
    store = FleetLike(tmp_path / "state")
    FilesStore.save(store, first)
    return store


async def test_a_follower_refreshes_nothing_and_serves_the_leaders_grant(
    clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path
) -> None:
    provider = dev
    token = provider.issue_refresh_token(USER)
    store = fleet_store(tmp_path, grant(token, expires_in=300, access="old"))  # due
    async with running(tmp_path, dev, clock, store) as s:
        await quiet(s)
        assert refreshes(provider) == 0
        got: list[str] = []

        async def ask() -> None:
            st = await s.token("work", 400, trio.current_time() + 30)
            assert st.access_token is not None
            got.append(st.access_token.reveal())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            await quiet(s)
            assert got == []  # waiting for the leader's grant
            FilesStore.save(store, grant(token, expires_in=3600, access="from-the-leader"))
            s.adopt("work")
        assert got == ["from-the-leader"]
        assert refreshes(provider) == 0


async def test_a_follower_waits_no_longer_than_the_request_and_says_why(
    clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path
) -> None:
    token = dev.issue_refresh_token(USER)
    store = fleet_store(tmp_path, grant(token, expires_in=-10, access="expired"))
    async with running(tmp_path, dev, clock, store) as s:
        failed: list[TransientGrantError] = []

        async def ask() -> None:
            try:
                await s.token("work", None, trio.current_time() + 5)
            except TransientGrantError as exc:
                failed.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            await quiet(s)
            assert failed == []
            clock.jump(5)
        assert "another mailoauthd refreshes this account" in failed[0].message
        assert refreshes(dev) == 0


async def test_poke_after_an_election_retries_an_interrupted_refresh_at_once(
    clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path
) -> None:
    token = dev.issue_refresh_token(USER)
    # The last leader died with its request in flight; the token is still good for long.
    first = grant(token, expires_in=3000, access="held", refresh_sent=T0)
    store = fleet_store(tmp_path, first)
    async with running(tmp_path, dev, clock, store) as s:
        await quiet(s)
        assert refreshes(dev) == 0
        store.leading = True
        s.poke()
        await quiet(s)
        assert refreshes(dev) == 1
        stored = store.load("work")
        assert stored is not None
        assert stored.refresh_sent is None
        assert stored.access_token != Secret("held")


async def test_a_superseded_refresh_write_drops_the_answer_and_takes_the_stored_grant(
    clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path
) -> None:
    token = dev.issue_refresh_token(USER)
    store = fleet_store(tmp_path, grant(token, expires_in=300, access="old"))
    store.leading = True
    store.other = grant(token, expires_in=3600, access="written-by-another")
    async with running(tmp_path, dev, clock, store) as s:
        await quiet(s)
        assert refreshes(dev) == 1
        held = s.token_now("work", None)
        assert held is not None
        assert held.access_token == Secret("written-by-another")
        stored = store.load("work")
        assert stored is not None
        assert stored.access_token == Secret("written-by-another")
