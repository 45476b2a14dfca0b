"""
One account's live record in the daemon: its configuration, the grant on disk,
the refresh in flight or scheduled, the last failure and what to tell a person.

The scheduler alone changes a record; status rows (accountstatus.py) read it.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime

import trio

from mailoauthd import oauth, state
from mailoauthd.alerts import refresh_token_deadline
from mailoauthd.config import Account
from mailoauthd.errors import MailoauthdError, StateError
from mailoauthd.state import AccountState


@dataclasses.dataclass(eq=False)
class Slot:
    """One account's live state; only the scheduler changes it."""

    account: Account
    state: AccountState  # what is on disk, and so what may be served
    broken: StateError | None = None  # the state file is unreadable: never served or written
    unsaved: AccountState | None = None  # a token response not yet on disk
    generation: int = 0  # bumped by import/revoke: results of older refreshes are dropped
    in_flight: trio.Event | None = None
    scheduled: bool = False  # a scheduled refresh is waiting out its jitter
    retry_at: datetime | None = None
    not_before: datetime | None = None  # the provider's Retry-After
    last_exc: MailoauthdError | None = None
    write_lock: trio.Lock = dataclasses.field(default_factory=trio.Lock)
    # Set and replaced whenever a person changes the grant (authorize, import, revoke).
    changed: trio.Event = dataclasses.field(default_factory=trio.Event)
    age_warned: datetime | None = None  # refresh_token_issued_at of the token warned about
    bare_refusals: int = 0  # 4xx answers without an OAuth error in a row (oauth.BareRefusal)
    last_on_demand: float | None = None  # trio time of the last refresh a request started
    scope_warning: str | None = None  # a refresh answer dropped a mail scope (until sign-in)

    def bump(self) -> None:
        """A new grant (or none): drop older refreshes' results, wake who waits for it."""
        self.generation += 1
        self.changed.set()
        self.changed = trio.Event()

    def replace_grant(self, new: AccountState) -> None:
        """A person replaced the grant (import, authorize, revoke): `new` is on disk."""
        self.bump()
        self.state = new
        self.unsaved = None
        self.retry_at = self.not_before = None
        self.last_exc = None
        self.scope_warning = None

    def last_error(self) -> str | None:
        return self.last_exc.message if self.last_exc else self.state.last_error

    def hint(self) -> str | None:
        """What to do, also after a restart: the provider's error explained again."""
        if self.last_exc is not None:
            return self.last_exc.hint or None
        if self.state.status == state.NEEDS_AUTHORIZATION and self.state.last_error:
            name = self.account.name
            testing = self.account.provider.testing
            _, hint = oauth.explain("invalid_grant", self.state.last_error, name, testing=testing)
            return hint or f"run 'mailoauth authorize {name}' and sign in again"
        return None

    def deadline(self) -> datetime | None:
        """When the refresh token stops working: the profile's limits, or the provider's word."""
        st = self.state
        try:
            known = refresh_token_deadline(
                self.account.provider, st.refresh_token_issued_at, st.last_refresh
            )
        except OverflowError:  # dates near the end of the calendar in a damaged file
            known = None
        said = st.refresh_token_expires_at
        if said is None:
            return known
        return said if known is None else min(known, said)


def iso(when: datetime | None) -> str | None:
    return when.isoformat(timespec="seconds") if when is not None else None
