"""
The periodic check keeps what it concluded of each account (`Slot.quiet`): a
check that finds nothing due reads that instead of working every expiry and
refresh-token age out again (docs/performance.md, the idle check). Kept
conclusions must never change a decision. So, over generated accounts, grants,
phases and clock jumps, a refresher that keeps them decides exactly what one
that forgets them before every check decides: what it schedules and when, when
it wakes early (last call), and which refresh-token age warnings it gives.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import hypothesis.strategies as st
from conftest import T0
from hypothesis import given, settings
from test_refresher import MemoryStore

from mailoauthd.config import Account, DaemonSettings, Provider
from mailoauthd.errors import StateError
from mailoauthd.flows import Flow
from mailoauthd.refresh.accounts import Phase, Shared, Slot
from mailoauthd.refresh.refresher import Refresher
from mailoauthd.secret import Secret
from mailoauthd.storage import state
from mailoauthd.storage.state import AccountState

NAMES = ("a", "b", "c")
HOUR = 3600.0
DAY = 24 * HOUR


def moments(spread: float = 9 * DAY) -> st.SearchStrategy[datetime]:
    """Times around T0, in whole seconds and in the clock's own steps."""
    return st.floats(-spread, spread, allow_nan=False).map(
        lambda s: T0 + timedelta(seconds=round(s))
    )


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


durations = st.sampled_from([0, 30, 60, 600, 3600, 7 * DAY]).map(lambda s: timedelta(seconds=s))

providers = st.builds(
    Provider,
    name=st.just("p"),
    client_id=st.just("c"),
    token_endpoint=st.just("http://127.0.0.1:9/token"),
    testing=st.booleans(),
    refresh_token_max_age=maybe(st.sampled_from([timedelta(days=7), timedelta(days=90)])),
    refresh_token_max_idle=maybe(st.sampled_from([timedelta(days=1), timedelta(days=30)])),
)


def accounts(name: str) -> st.SearchStrategy[Account]:
    return st.builds(
        Account,
        name=st.just(name),
        provider=providers,
        flow=st.sampled_from([Flow.AUTHORIZATION_CODE, Flow.CLIENT_CREDENTIALS]),
        refresh_before=durations,
        min_validity=durations,
    )


def grants(name: str) -> st.SearchStrategy[AccountState]:
    """Mostly what a working account holds; any combination of fields too."""
    working = st.builds(
        AccountState,
        account=st.just(name),
        status=st.just(state.OK),
        access_token=st.just(Secret("at")),
        expires_at=moments(),
        refresh_token=st.just(Secret("rt")),
        refresh_token_issued_at=moments(),
        last_refresh=maybe(moments()),
    )
    anything = st.builds(
        AccountState,
        account=st.just(name),
        status=st.sampled_from(sorted(state.STATUSES)),
        access_token=maybe(st.just(Secret("at"))),
        expires_at=maybe(moments()),
        refresh_token=maybe(st.just(Secret("rt"))),
        refresh_token_issued_at=maybe(moments()),
        last_refresh=maybe(moments()),
        refresh_sent=maybe(moments()),
        refresh_token_expires_at=maybe(moments()),
    )
    return st.one_of(working, working, anything)


# One step of a run: the same change made to both refreshers' records, then a check.
steps = st.one_of(
    st.tuples(st.just("clock"), st.floats(-2 * DAY, 4 * DAY, allow_nan=False)),
    st.tuples(st.just("state"), st.sampled_from(NAMES), st.data()),
    st.tuples(st.just("unsaved"), st.sampled_from(NAMES), st.data()),
    st.tuples(st.just("account"), st.sampled_from(NAMES), st.data()),
    st.tuples(st.just("broken"), st.sampled_from(NAMES), st.booleans()),
    # Only the check sets it today; whatever code may one day, the check must see it.
    st.tuples(st.just("age_warned"), st.sampled_from(NAMES), maybe(moments())),
    st.tuples(
        st.just("phase"),
        st.sampled_from(NAMES),
        st.sampled_from(["start", "finish", "retry", "rest"]),
    ),
)


@dataclass
class Run:
    """One refresher on its own records, on a clock the test moves."""

    forget: bool  # forget every kept conclusion before each check
    now: datetime = T0
    events: list[tuple[str, str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        shared = Shared(
            store=MemoryStore(),
            http=None,  # type: ignore[arg-type] - a check makes no request
            settings=DaemonSettings(refresh_spread=timedelta(seconds=30)),
            secrets={},
            now=lambda: self.now,
            rng=random.Random(7),  # noqa: S311 - the jitter, the same in both runs
            on_event=lambda event, account, message, _action: self.events.append(
                (event, account.name, message)
            ),
            resolve=None,
        )
        self.refresher = Refresher(shared, {})

    def check(self) -> tuple[object, ...]:
        if self.forget:
            for slot in self.refresher.slots.values():
                slot.quiet = None
        started = self.refresher.check(self.now)
        records = tuple(
            (name, s.phase, s.due, s.age_warned) for name, s in self.refresher.slots.items()
        )
        return started, self.refresher._last_call, records, tuple(self.events)


def apply(slot: Slot, step: tuple[Any, ...], drawn: Any, now: datetime) -> None:
    kind = step[0]
    if kind in ("state", "unsaved"):
        setattr(slot, kind, drawn)
    elif kind == "account":
        slot.account = drawn
    elif kind == "age_warned":
        slot.age_warned = step[2]
    elif kind == "broken":
        slot.broken = StateError("unreadable") if step[2] else None
    elif kind == "phase":
        op = step[2]
        if op == "start" and slot.phase is not Phase.REFRESHING:
            slot.start()
        elif op == "finish" and slot.phase is Phase.REFRESHING:
            slot.finish()
        elif op == "retry" and slot.phase in (Phase.REFRESHING, Phase.RETRY_WAIT):
            slot.retry(now + timedelta(minutes=5))
        elif op == "rest":
            slot.rest()


@settings(max_examples=300, deadline=None)
@given(
    first=st.fixed_dictionaries({name: st.tuples(accounts(name), grants(name)) for name in NAMES}),
    plan=st.lists(st.tuples(steps, st.booleans()), max_size=40),
    data=st.data(),
)
def test_kept_conclusions_decide_as_a_fresh_look_does(
    first: dict[str, tuple[Account, AccountState]],
    plan: list[tuple[tuple[Any, ...], bool]],
    data: st.DataObject,
) -> None:
    keep, fresh = Run(forget=False), Run(forget=True)
    for run in (keep, fresh):
        for name, (account, grant) in first.items():
            run.refresher.slots[name] = Slot(account=account, state=grant)
    assert keep.check() == fresh.check()
    for step, check_after in plan:
        drawn: Any = None
        if step[0] == "clock":
            for run in (keep, fresh):
                run.now += timedelta(seconds=round(step[1]))
        else:
            name = step[1]
            if step[0] in ("state", "unsaved"):
                drawn = data.draw(grants(name) if step[0] == "state" else maybe(grants(name)))
            elif step[0] == "account":
                drawn = data.draw(accounts(name))
            for run in (keep, fresh):
                apply(run.refresher.slots[name], step, drawn, run.now)
        if check_after:
            assert keep.check() == fresh.check()
    assert keep.check() == fresh.check()


def test_an_idle_check_keeps_its_conclusions() -> None:
    """The shortcut is taken: a second check at the same moment works nothing out."""
    run = Run(forget=False)
    account = Account(
        name="a", provider=Provider(name="p", client_id="c", token_endpoint="http://x/")
    )
    grant = AccountState(
        account="a",
        status=state.OK,
        access_token=Secret("at"),
        expires_at=T0 + timedelta(hours=1),
        refresh_token=Secret("rt"),
    )
    run.refresher.slots["a"] = slot = Slot(account=account, state=grant)
    run.check()
    kept = slot.quiet
    assert kept is not None
    assert kept.until == T0 + timedelta(minutes=50)  # expires_at - refresh_before
    assert kept.latest == T0 + timedelta(minutes=59)  # expires_at - min_validity
    run.now += timedelta(minutes=49)
    run.check()
    assert slot.quiet is kept
    run.now += timedelta(minutes=1)  # due: the check looks again, and schedules it
    assert run.check()[0] == 1
    assert slot.phase is Phase.SCHEDULED
