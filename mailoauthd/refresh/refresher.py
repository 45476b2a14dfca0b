"""
The refresher: the periodic check, timing, single flight and retries.

Every `refresh_interval` it looks at all accounts and schedules a refresh for
those whose access token expires within `refresh_before`, spread over
`refresh_spread`; at most `max_concurrent_refreshes` run at a time. Whatever
asks (the check, a retry, a request, a person), an account has at most one
refresh in flight (`start`). One attempt is attempt.py's; what requests wait
for is ondemand.py's. What the check concluded of an account that needs
nothing yet is kept with its record (accounts.Quiet) while it holds.

A fleet shares one store: only the daemon the store lets (`may_refresh`)
refreshes an account; the others take the grants it stores (`adopt`) and
check again when the right may have come to them (`poke`).

Time: `now()` is the wall clock (token expiry is wall-clock time); sleeping
uses trio's clock, and no sleep is longer than MAX_WAIT_SECONDS, so that after
a suspend/resume or a clock jump the next wake-up sees the real time.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta

import structlog
import trio

from mailoauthd.config import Account, DaemonSettings
from mailoauthd.errors import StateError, TransientGrantError, UnknownAccount, helper_command
from mailoauthd.flows import Flow
from mailoauthd.lastresort import guarded
from mailoauthd.refresh.accounts import FOREVER, Phase, Quiet, Shared, Slot, iso, load_slot
from mailoauthd.refresh.alerts import MAX_WAIT_SECONDS, warning_time
from mailoauthd.refresh.attempt import Attempts, backoff_seconds, write_token_file
from mailoauthd.secret import Secret
from mailoauthd.storage import state

log = structlog.get_logger(__name__)

# What a fleet's store raises when a fenced write finds a newer grant (fleet.Superseded).
SUPERSEDED = "state-superseded"


class Refresher:
    """Owns every account's record and every refresh."""

    def __init__(self, shared: Shared, accounts: Mapping[str, Account]) -> None:
        self.shared = shared
        self.attempts = Attempts(shared)
        self.next_check: datetime | None = None
        # The moment the first not-yet-due token gets within min_validity of
        # its expiry: the loop checks then if the periodic check comes later.
        self._last_call: datetime | None = None
        self.limiter = trio.CapacityLimiter(shared.settings.max_concurrent_refreshes)
        self.slots: dict[str, Slot] = {}
        self._nursery: trio.Nursery | None = None
        self._wakeup = trio.Event()
        for account in accounts.values():
            self.slots[account.name] = load_slot(shared.store, account)

    def slot(self, name: str) -> Slot:
        slot = self.slots.get(name)
        if slot is None:
            raise UnknownAccount(f"{name}: no such account")
        return slot

    def reconfigure(
        self,
        settings: DaemonSettings,
        accounts: Mapping[str, Account],
        secrets: Mapping[str, Secret | None],
    ) -> None:
        """Adopt a reloaded configuration; live state of kept accounts is kept."""
        self.shared.settings = settings
        self.shared.secrets = dict(secrets)
        self.limiter.total_tokens = settings.max_concurrent_refreshes
        for name in list(self.slots):
            if name not in accounts:
                # An in-flight refresh still persists what it gets: the file stays.
                del self.slots[name]
        for account in accounts.values():
            slot = self.slots.get(account.name)
            if slot is None:
                self.slots[account.name] = load_slot(self.shared.store, account)
                continue
            slot.account = account
            waiting = slot.phase in (Phase.IDLE, Phase.RETRY_WAIT)
            if slot.state.status == state.MISCONFIGURED and waiting:
                slot.retry(self.shared.now())  # the fix may be in this reload: try once more
        self.poke()

    # --- the fleet's seam ----------------------------------------------------------

    def poke(self) -> None:
        """The right to refresh may have changed: run the check now."""
        self.next_check = None
        self._wakeup.set()

    def adopt(self, name: str) -> None:
        """Another daemon stored a new grant for `name`: take it, wake who waits, reschedule."""
        slot = self.slots.get(name)
        if slot is None or slot.phase is Phase.REFRESHING:
            return  # not ours; or our refresh ends in a save that finds it (SUPERSEDED)
        fresh = load_slot(self.shared.store, slot.account)
        slot.broken = fresh.broken
        slot.replace_grant(fresh.state)
        slot.last_exc = fresh.last_exc
        log.info("grant.adopted", account=name, status=slot.state.status)
        if self._nursery is not None and slot.broken is None:
            self._nursery.start_soon(guarded, "token file", write_token_file, slot)
        if self.shared.store.may_refresh(name):
            self.poke()  # e.g. a refresh that died in flight elsewhere: ours now

    # --- the loop --------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the periodic check forever; `started` once the first check is scheduled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            # A token_file newly configured, or lost, gets the stored token at once.
            for slot in list(self.slots.values()):
                if slot.broken is None and slot.state.valid_for(self.shared.now()) > 0:
                    await write_token_file(slot)
            task_status.started()
            while True:
                try:
                    delay = self._turn(self.shared.now())
                except Exception as exc:  # noqa: BLE001 - the last resort: keep serving
                    log.error("check.internal_error", error=type(exc).__name__)
                    delay = MAX_WAIT_SECONDS
                self._wakeup = trio.Event()
                with trio.move_on_after(min(max(delay, 0.0), MAX_WAIT_SECONDS)):
                    await self._wakeup.wait()

    def _turn(self, now: datetime) -> float:
        """Check if it is time, start what is due; the seconds until the next turn."""
        interval = self.shared.settings.refresh_interval
        # A wall clock that jumped backwards must not postpone the check.
        if self.next_check is None or not (now < self.next_check <= now + interval):
            self.check(now)
            self.next_check = now + interval
        elif self._last_call is not None and self._last_call <= now:
            self.check(now)  # early, so that no token outlives min_validity unrefreshed
        wake = self.next_check
        if self._last_call is not None:
            wake = min(wake, self._last_call)
        for slot in self.slots.values():
            if slot.due is None or slot.phase is Phase.REFRESHING:
                continue
            if slot.due > now:
                wake = min(wake, slot.due)
            elif self.shared.store.may_refresh(slot.account.name):
                self.start(slot)
            else:
                slot.rest()  # another daemon refreshes it; a poke brings it back
        return (wake - self.shared.now()).total_seconds()

    def check(self, now: datetime) -> int:
        """
        The periodic check: schedule refreshes for accounts due within refresh_before.

        A record's conclusion is kept (`Slot.quiet`) while it holds, so a check that
        finds nothing due compares a few references per account.

        Returns:
            How many refreshes it scheduled.
        """
        started = 0
        last_call: datetime | None = None
        for slot in self.slots.values():
            quiet = slot.quiet
            if quiet is None or not quiet.holds(slot, now):
                quiet = _quiet(slot, now, self._check_age(slot, now))
                if quiet is None:
                    started += self._schedule(slot, now)
                    continue
                slot.quiet = quiet
            # Normally the next check comes long before this; with a refresh_before
            # shorter than refresh_interval it might not.
            latest = quiet.latest
            if latest is not None and latest > now and (last_call is None or latest < last_call):
                last_call = latest
        self._last_call = last_call
        log.debug("check.done", accounts=len(self.slots), due=started)
        if started:
            self._wakeup.set()
        return started

    def _schedule(self, slot: Slot, now: datetime) -> bool:
        """Schedule the refresh of a due account, unless it is another daemon's to refresh."""
        if not self.shared.store.may_refresh(slot.account.name):
            return False
        # Spread refreshes that fall due together, but never past what the
        # token has left beyond the clients' minimum validity.
        remaining = slot.state.valid_for(now)
        room = remaining - slot.account.min_validity.total_seconds()
        spread = self.shared.settings.refresh_spread.total_seconds()
        delay = 0.0
        if room > 0 and spread > 0:
            delay = self.shared.rng.uniform(0, min(spread, room / 2))
        if slot.state.refresh_sent is not None:
            # A refresh died with an earlier daemon: the provider's reuse window
            # for the refresh token we hold may be closing (state.refresh_sent).
            delay = 0.0
        slot.schedule(now + timedelta(seconds=delay))
        return True

    def _check_age(self, slot: Slot, now: datetime) -> datetime | None:
        """
        Warn once per refresh token when it nears a cut-off its profile knows of.

        Returns:
            When a warning is still to come, or None.
        """
        due = _age_warning(slot)
        if due is None or now < due[1]:
            return None if due is None else due[1]
        deadline = due[0]
        st, provider = slot.state, slot.account.provider
        slot.age_warned = st.refresh_token_issued_at
        name = slot.account.name
        why = " (Google's limit for apps in 'testing' status)" if provider.testing else ""
        if deadline == st.refresh_token_expires_at:
            why = " (as the provider said when it issued it)"
        message = f"the refresh token stops working around {iso(deadline)}{why}"
        action = f"run {helper_command('authorize', name)} before then"
        if provider.testing:
            action += "; publish the app in Google Cloud to lift the 7-day limit"
        log.warning("refresh_token.expiring", account=name, expires_at=iso(deadline))
        self.shared.on_event("refresh_token_expiring", slot.account, message, action)
        return None  # said once for this refresh token

    # --- single flight -------------------------------------------------------------

    def start(self, slot: Slot) -> trio.Event:
        """Start a refresh unless one is in flight; either way, the event that ends it."""
        if slot.in_flight is not None:
            return slot.in_flight
        if self._nursery is None:
            raise RuntimeError("the scheduler is not running")
        done = slot.start()
        # Under the last resort: an unforeseen fault ends this refresh only; the
        # next scheduled check tries again.
        self._nursery.start_soon(guarded, "refresh", self._refresh, slot)
        return done

    async def _refresh(self, slot: Slot) -> None:
        superseded = False
        try:
            async with self.limiter:
                with structlog.contextvars.bound_contextvars(account=slot.account.name):
                    try:
                        await self.attempts.run(slot)
                    except StateError as exc:
                        if exc.code != SUPERSEDED:
                            self._internal_error(slot, exc)
                        else:
                            # Another daemon stored a newer grant, or took the lock: ours is
                            # dropped. Safe: our refresh_sent note was stored first, so its
                            # holder retries inside the provider's reuse window.
                            log.info("token.refresh_superseded", error=exc.message)
                            superseded = True
                    except Exception as exc:  # noqa: BLE001 - the last resort: keep serving
                        self._internal_error(slot, exc)
        finally:
            if superseded:
                slot.due = None
            slot.finish()
            if slot.phase is Phase.RETRY_WAIT:
                # A retry may be due sooner than the loop's next turn. (Only then: each
                # turn walks every account, and a full refresh ends 10,000 refreshes.)
                self._wakeup.set()
        if superseded:
            self.adopt(slot.account.name)

    def _internal_error(self, slot: Slot, exc: Exception) -> None:
        """
        A bug (or a store's unforeseen error) must not end the daemon: the tokens held
        are still served, and the account is retried as after any transient failure.
        """
        log.error("refresh.internal_error", error=type(exc).__name__)
        slot.last_exc = TransientGrantError(
            f"internal error during the refresh ({type(exc).__name__})",
            hint="mailoauthd retries; please report this with the log",
        )
        delay = backoff_seconds(slot.state.failures + 1, self.shared.rng)
        slot.retry(self.shared.now() + timedelta(seconds=delay))


def _quiet(slot: Slot, now: datetime, warn_at: datetime | None) -> Quiet | None:
    """
    What the check concludes of a record at `now`: None if it is due (to refresh now,
    or to look at again at every check until it may), else until when it needs nothing.
    `warn_at`: when its refresh-token age warning is to come (Refresher._check_age).
    """
    until = FOREVER if warn_at is None else warn_at
    latest = None
    st = slot.state
    if slot.phase is Phase.IDLE and _refreshable(slot):
        if st.refresh_sent is not None or st.access_token is None or st.expires_at is None:
            return None  # interrupted (see _schedule), or nothing to serve
        due_at = st.expires_at - slot.account.refresh_before
        if not now < due_at:
            return None
        until = min(until, due_at)
        latest = st.expires_at - slot.account.min_validity
    inputs = (slot.account, st, slot.phase, slot.broken, slot.unsaved, slot.age_warned)
    return Quiet(until, latest, *inputs)


def _age_warning(slot: Slot) -> tuple[datetime, datetime] | None:
    """(when the refresh token stops working, when to warn about it) if a warning is to come."""
    st = slot.state
    if st.refresh_token is None or st.status == state.NEEDS_AUTHORIZATION:
        return None
    if slot.age_warned == st.refresh_token_issued_at:
        return None  # said once for this refresh token
    deadline = slot.deadline()
    if deadline is None:
        return None
    return deadline, warning_time(slot.account.provider, deadline)


def _refreshable(slot: Slot) -> bool:
    if slot.broken is not None:
        return False
    if slot.unsaved is not None:
        return True
    if slot.state.status in (state.NEEDS_AUTHORIZATION, state.MISCONFIGURED):
        return False
    return slot.account.flow == Flow.CLIENT_CREDENTIALS or slot.state.refresh_token is not None
