"""
The account registry: one live record per account (`Slot`), its refresh phase,
and what the parts that work on the records share (`Shared`).

A record holds the account's configuration, the grant in the store, the last
failure and what to tell a person. Where it stands in the refresh machinery is
one explicit `Phase`, changed only through the record's methods, which assert
the transition. Whether a person must act is not a phase: it is the stored
grant's status (state.status), which outlives the process.

The refresher (refresher.py, attempt.py, ondemand.py) and the grant operations
(grants.py) change records; status rows (accountstatus.py) read them.
"""

from __future__ import annotations

import dataclasses
import enum
import random
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import httpx
import structlog
import trio

from mailoauthd.config import Account, DaemonSettings
from mailoauthd.errors import MailoauthdError, Misconfigured, StateError, helper_command
from mailoauthd.flows import Flow
from mailoauthd.provider import oauth
from mailoauthd.refresh.alerts import refresh_token_deadline
from mailoauthd.secret import Secret
from mailoauthd.storage import state
from mailoauthd.storage.state import AccountState
from mailoauthd.storage.store import GrantStore

log = structlog.get_logger(__name__)

# (event, account, message, action): authorized, imported, refreshed,
# needs_authorization, refresh_token_expiring, scope_lost, revoked.
EventHook = Callable[[str, Account, str, str], None]


class Phase(enum.Enum):
    """Where an account stands in the refresh machinery."""

    IDLE = "idle"  # nothing pending: the periodic check decides
    SCHEDULED = "scheduled"  # due at `due`, spread over refresh_spread
    REFRESHING = "refreshing"  # one refresh in flight (`in_flight`), whoever asked for it
    RETRY_WAIT = "retry_wait"  # after a transient failure or a failed write: again at `due`


_ALLOWED: dict[Phase, frozenset[Phase]] = {
    # RETRY_WAIT from IDLE: a reload retries a misconfigured account.
    Phase.IDLE: frozenset({Phase.SCHEDULED, Phase.REFRESHING, Phase.RETRY_WAIT}),
    # IDLE from waiting: the grant was replaced (import, revoke, another daemon), or
    # this daemon may no longer refresh it.
    Phase.SCHEDULED: frozenset({Phase.REFRESHING, Phase.IDLE}),
    Phase.REFRESHING: frozenset({Phase.IDLE, Phase.RETRY_WAIT}),
    Phase.RETRY_WAIT: frozenset({Phase.REFRESHING, Phase.IDLE, Phase.RETRY_WAIT}),
}


# A record with nothing to wait for: a Quiet that lasts until its inputs change.
FOREVER = datetime.max.replace(tzinfo=UTC)


@dataclasses.dataclass(frozen=True, slots=True)
class Quiet:
    """
    What the periodic check concluded of a record that needs nothing yet.

    It holds while `until` has not come and the record still has the very objects
    the check read (`holds`): no refresh to schedule, no warning to give. So the
    check reads this instead of working it out again, and a check that finds
    nothing due costs about what a bare loop over the expiries does
    (docs/performance.md), not the arithmetic of every record's expiry and
    refresh-token age.
    """

    until: datetime  # the token falls due, or its refresh token's age warning comes
    latest: datetime | None  # the last moment before min_validity (Refresher._last_call)
    # What the check read: whatever replaces one of them makes this stale.
    account: Account
    state: AccountState
    phase: Phase
    broken: StateError | None
    unsaved: AccountState | None
    age_warned: datetime | None

    def holds(self, slot: Slot, now: datetime) -> bool:
        return (
            now < self.until
            and self.state is slot.state
            and self.phase is slot.phase
            and self.account is slot.account
            and self.unsaved is slot.unsaved
            and self.broken is slot.broken
            and self.age_warned is slot.age_warned
        )


@dataclasses.dataclass(eq=False)
class Slot:
    """One account's live state; only the refresher and the grant operations change it."""

    account: Account
    state: AccountState  # what is in the store, and so what may be served
    broken: StateError | None = None  # the stored grant is unreadable: never served or written
    unsaved: AccountState | None = None  # a token response not yet stored
    generation: int = 0  # bumped when the grant is replaced: older refreshes' results are dropped
    phase: Phase = Phase.IDLE
    due: datetime | None = None  # SCHEDULED, RETRY_WAIT: when the refresh starts
    in_flight: trio.Event | None = None  # REFRESHING: set when it ends
    not_before: datetime | None = None  # the provider's Retry-After
    last_exc: MailoauthdError | None = None
    write_lock: trio.Lock = dataclasses.field(default_factory=trio.Lock)
    # Set and replaced whenever the grant is replaced (authorize, import, revoke, adopt).
    changed: trio.Event = dataclasses.field(default_factory=trio.Event)
    age_warned: datetime | None = None  # refresh_token_issued_at of the token warned about
    bare_refusals: int = 0  # 4xx answers without an OAuth error in a row (oauth.BareRefusal)
    last_on_demand: float | None = None  # trio time of the last refresh a request started
    scope_warning: str | None = None  # a refresh answer dropped a mail scope (until sign-in)
    quiet: Quiet | None = None  # what the last check concluded, while it holds

    # --- the phase --------------------------------------------------------------

    def _enter(self, phase: Phase) -> None:
        assert phase in _ALLOWED[self.phase], f"{self.phase.name} -> {phase.name}"
        self.phase = phase

    def schedule(self, due: datetime) -> None:
        """IDLE → SCHEDULED: the periodic check found the token due."""
        self._enter(Phase.SCHEDULED)
        self.due = due

    def retry(self, due: datetime) -> None:
        """Try again at `due`: after the refresh in flight ends, or from now on."""
        self.due = due
        if self.phase is not Phase.REFRESHING:
            self._enter(Phase.RETRY_WAIT)

    def start(self) -> trio.Event:
        """→ REFRESHING; the event the refresh sets when it ends."""
        self._enter(Phase.REFRESHING)
        self.due = None
        self.in_flight = trio.Event()
        return self.in_flight

    def finish(self) -> None:
        """REFRESHING → RETRY_WAIT if the attempt asked for a retry (`retry`), else IDLE."""
        assert self.in_flight is not None
        self._enter(Phase.RETRY_WAIT if self.due is not None else Phase.IDLE)
        done, self.in_flight = self.in_flight, None
        done.set()

    def rest(self) -> None:
        """Drop a scheduled refresh or retry: → IDLE (a refresh in flight runs on)."""
        if self.phase in (Phase.SCHEDULED, Phase.RETRY_WAIT):
            self._enter(Phase.IDLE)
            self.due = None

    # --- the grant ----------------------------------------------------------------

    def bump(self) -> None:
        """A new grant (or none): drop older refreshes' results, wake who waits for it."""
        self.generation += 1
        self.changed.set()
        self.changed = trio.Event()

    def replace_grant(self, new: AccountState) -> None:
        """The grant was replaced (import, authorize, revoke, another daemon): `new` is stored."""
        self.bump()
        self.state = new
        self.unsaved = None
        self.rest()
        self.not_before = None
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
            return hint or f"run {helper_command('authorize', name)} and sign in again"
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


def load_slot(store: GrantStore, account: Account) -> Slot:
    """A new record from the store: unreadable is `broken`, nothing stored a fresh start."""
    try:
        stored = store.load(account.name)
    except StateError as exc:
        log.error("state.unreadable", account=account.name, error=exc.message)
        slot = Slot(account=account, state=AccountState(account=account.name), broken=exc)
        slot.last_exc = StateError(
            f"{exc.message}; the file is kept as it is",
            hint=f"inspect or remove it, or run {helper_command('import', account.name)}",
        )
        return slot
    return Slot(account=account, state=stored or fresh(account))


def fresh(account: Account) -> AccountState:
    """The state of an account with nothing stored: app-only accounts need no sign-in."""
    initial = state.OK if account.flow == Flow.CLIENT_CREDENTIALS else state.NEEDS_AUTHORIZATION
    return AccountState(account=account.name, status=initial)


@dataclasses.dataclass(eq=False)
class Shared:
    """What the refresher and the grant operations share; a reload changes settings and secrets."""

    store: GrantStore
    http: httpx.AsyncClient
    settings: DaemonSettings
    secrets: dict[str, Secret | None]
    now: Callable[[], datetime]
    rng: random.Random
    # Tells the daemon what a person may need to know (notify_command).
    on_event: EventHook
    # Fills in a profile's discovered endpoints (discovery.py).
    resolve: Callable[[Account], Awaitable[Account]] | None

    def client(self, account: Account) -> oauth.Client:
        """The OAuth client of an account, with its profile's client secret."""
        provider = account.provider
        if not provider.token_endpoint:
            raise Misconfigured(
                f"provider {provider.name!r} has no token_endpoint",
                hint=f"set token_endpoint in [providers.{provider.name}]",
            )
        return oauth.Client(
            token_endpoint=provider.token_endpoint,
            client_id=provider.client_id,
            client_secret=self.secrets.get(provider.name),
            auth_method=provider.token_auth_method,
        )


def iso(when: datetime | None) -> str | None:
    return when.isoformat(timespec="seconds") if when is not None else None
