"""
What requests wait for: a token valid long enough, now or after a refresh.

A request for a token that is missing or about to expire starts a refresh
(single flight: the refresher's `start`) and waits for it, within bounds that
protect the provider: one on-demand refresh a minute per account (or per
half lifetime of tokens that live less than two minutes), none right
after a failure, none before the provider's Retry-After. Where another daemon
of a fleet refreshes the account, a request waits for the grant it stores.
"""

from __future__ import annotations

import math
from datetime import datetime

import trio

from mailoauthd.errors import (
    MailoauthdError,
    Misconfigured,
    ReauthorizationRequired,
    TransientGrantError,
    helper_command,
)
from mailoauthd.flows import Flow
from mailoauthd.refresh.accounts import Slot
from mailoauthd.refresh.refresher import Refresher
from mailoauthd.storage import state
from mailoauthd.storage.state import AccountState

# After a transient failure, a token request within this many seconds gets the
# failure at once instead of another attempt: a mail program that opens ten
# connections during an outage should not wait ten times.
ON_DEMAND_GAP_SECONDS = 10
# A request that wants more validity than the token has starts a refresh; one
# such refresh per account in this many seconds, however many ask (any allowed
# user could otherwise make us hammer the provider, which Microsoft answers with
# AADSTS50196 and a throttle). Tokens that live under two minutes allow one per
# half lifetime: what the cap on min_validity (below) may legitimately need.
ON_DEMAND_REFRESH_GAP_SECONDS = 60
# A request's min_validity is capped at the lifetime of the tokens the provider
# issues, less this: more than that no refresh can give.
LIFETIME_MARGIN_SECONDS = 60


def token_now(refresher: Refresher, name: str, min_validity: float | None) -> AccountState | None:
    """The account's state if its token is valid for `min_validity` now, else None."""
    slot = refresher.slots.get(name)
    if slot is None or slot.broken is not None:
        return None
    st = slot.state
    remaining = st.valid_for(refresher.shared.now())
    wanted = _wanted(slot, min_validity)
    # The cap only ever lowers what is wanted: worked out only when it may matter.
    return st if remaining >= wanted or remaining >= _capped(slot, wanted) else None


async def token(
    refresher: Refresher, name: str, min_validity: float | None, deadline: float
) -> AccountState:
    """
    A state whose access token is valid for at least `min_validity` seconds.

    Refreshes (single flight) and waits when needed. The caller bounds the
    wait with a cancel scope; `deadline` (trio time) only lets us fail
    fast when the provider asked us to wait longer than the caller can.
    """
    slot = refresher.slot(name)
    waited = False
    while True:
        # Capped anew each time: a refresh tells us what lifetime tokens have.
        wanted = _capped(slot, _wanted(slot, min_validity))
        now = refresher.shared.now()
        if slot.state.valid_for(now) >= wanted and slot.broken is None:
            return slot.state
        raise_unusable(slot)
        if not refresher.shared.store.may_refresh(name):
            await adopted(slot, deadline, f"{wanted:g} s")
            continue
        if waited:
            remaining = slot.state.valid_for(now)
            if slot.last_exc is None and remaining > 0:
                raise TransientGrantError(
                    f"{name}: the provider issued a token valid for {remaining:.0f} s, "
                    f"less than the {wanted:g} s asked for",
                    hint="lower min_validity for this account",
                )
            raise last_failure(slot)
        if slot.in_flight is None:
            wait = _held_back(slot, now, wanted)
            if wait is not None:
                if trio.current_time() + wait > deadline:
                    raise last_failure(slot, f"the provider asked us to wait {wait:.0f} s; ")
                await trio.sleep(wait)
                continue
            slot.last_on_demand = trio.current_time()
        await refresher.start(slot).wait()
        waited = True


def _held_back(slot: Slot, now: datetime, wanted: float) -> float | None:
    """
    Raise if a request may not start a refresh now; the seconds to wait first if the
    provider asked for a pause (Retry-After); None if it may start one.
    """
    name = slot.account.name
    remaining = slot.state.valid_for(now)
    asked = slot.last_on_demand
    if remaining > 0 and asked is not None:
        gap = _refresh_gap(slot.state)
        if trio.current_time() - asked < gap:
            # The token still works: one on-demand refresh a minute (a half lifetime
            # of short-lived tokens), however many ask for more validity than it has.
            raise TransientGrantError(
                f"{name}: the token is valid for {remaining:.0f} s, less than the "
                f"{wanted:g} s asked for, and it was refreshed on demand "
                f"less than {gap:.0f} s ago",
                hint="ask for a shorter min_validity, or try again in a minute",
            )
    if slot.not_before is not None and slot.not_before > now:
        return (slot.not_before - now).total_seconds()
    last = slot.state.last_attempt
    if (
        slot.state.status == state.FAILING
        and last is not None
        and (now - last).total_seconds() < ON_DEMAND_GAP_SECONDS
    ):
        raise last_failure(slot)
    return None


async def refresh(refresher: Refresher, name: str) -> AccountState:
    """Refresh now, whatever the schedule says (`mailoauth refresh`)."""
    slot = refresher.slot(name)
    if slot.broken is not None and slot.last_exc is not None:
        raise slot.last_exc
    if slot.account.flow != Flow.CLIENT_CREDENTIALS and slot.state.refresh_token is None:
        raise_unusable(slot)
    if not refresher.shared.store.may_refresh(name):
        # In a fleet only the leader refreshes; waiting here for its next scheduled
        # refresh could take most of an hour, so say at once where to ask.
        raise TransientGrantError(
            f"{name}: this daemon does not refresh: another daemon of the fleet does "
            "(or none reaches etcd)",
            hint="run it on the fleet's leader ('mailoauth status' names it)",
        )
    if slot.in_flight is not None:
        await slot.in_flight.wait()  # a refresh that started before we asked
    await refresher.start(slot).wait()
    if slot.last_exc is not None:
        raise last_failure(slot)
    return slot.state


async def adopted(slot: Slot, deadline: float | None, wanted: str) -> None:
    """Wait until another daemon's grant is adopted (Refresher.adopt), up to `deadline`."""
    with trio.move_on_at(math.inf if deadline is None else deadline):
        await slot.changed.wait()
        return
    name = slot.account.name
    raise TransientGrantError(
        f"{name}: another mailoauthd refreshes this account, and no token valid for "
        f"{wanted} came from it in time",
        hint="see 'mailoauth status' on the daemon that refreshes it",
    )


def raise_unusable(slot: Slot) -> None:
    """Raise what stops the account being served: a broken store, a person needed."""
    name = slot.account.name
    if slot.broken is not None and slot.last_exc is not None:
        raise slot.last_exc
    status = slot.state.status
    if status == state.NEEDS_AUTHORIZATION:
        if slot.state.refresh_token is None and slot.state.last_error is None:
            raise ReauthorizationRequired(
                f"{name}: not authorized yet",
                hint=f"run {helper_command('authorize', name)} "
                f"(or {helper_command('import', name)})",
            )
        raise ReauthorizationRequired(
            f"{name}: {slot.state.last_error or 'needs authorization'}",
            hint=slot.hint() or f"run {helper_command('authorize', name)} and sign in again",
        )
    if status == state.MISCONFIGURED:
        hint = slot.last_exc.hint if slot.last_exc else Misconfigured.hint
        raise Misconfigured(f"{name}: {slot.state.last_error}", hint=hint)


def last_failure(slot: Slot, why: str = "") -> MailoauthdError:
    """The last failure, as an error naming the account."""
    name = slot.account.name
    exc = slot.last_exc
    if exc is not None:
        return type(exc)(f"{name}: {why}{exc.message}", hint=exc.hint)
    return TransientGrantError(f"{name}: {why}no valid token")


def _capped(slot: Slot, wanted: float) -> float:
    """
    `wanted`, but no more than the provider's tokens can have: the lifetime of
    the last one issued, less a margin; asking for more would refresh forever.
    """
    lifetime = _lifetime(slot.state)
    if lifetime is None:
        return wanted
    return min(wanted, max(lifetime / 2, lifetime - LIFETIME_MARGIN_SECONDS))


def _refresh_gap(st: AccountState) -> float:
    """
    Seconds between on-demand refreshes of an account: a minute, or half the tokens'
    lifetime when that is shorter. A request may want up to that half (`_capped`), so
    tokens of 8 s wanted for 2.5 s need a refresh every 5.5 s between the scheduled ones.
    """
    lifetime = _lifetime(st)
    if lifetime is None:
        return ON_DEMAND_REFRESH_GAP_SECONDS
    return max(0.0, min(ON_DEMAND_REFRESH_GAP_SECONDS, lifetime / 2))


def _lifetime(st: AccountState) -> float | None:
    """How long the provider's last token was to live, when it was issued to us."""
    if st.expires_at is None or st.last_refresh is None:
        return None
    return (st.expires_at - st.last_refresh).total_seconds()


def _wanted(slot: Slot, min_validity: float | None) -> float:
    """Seconds a handed-out token must still be valid: asked for, or the account's."""
    return slot.account.min_validity.total_seconds() if min_validity is None else min_validity
