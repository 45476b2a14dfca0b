"""
The refresh scheduler: the periodic check, single-flight refreshes, backoff, and waiting requests.

Every `refresh_interval` the scheduler looks at all accounts and refreshes
those whose access token expires within `refresh_before`, at most
`max_concurrent_refreshes` at a time, spread over `refresh_spread`. A request
for a token that is missing or about to expire starts a refresh at once and
waits for it. Whatever asks, an account has at most one refresh in flight.

Time: `now()` is the wall clock (token expiry is wall-clock time); sleeping
uses trio's clock, and no sleep is longer than MAX_WAIT_SECONDS, so that after
a suspend/resume or a clock jump the next wake-up sees the real time.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timedelta
from functools import partial

import httpx
import structlog
import trio

from mailoauthd import accountstatus, oauth, state, tokenfile
from mailoauthd.accounts import Slot, iso
from mailoauthd.alerts import warning_time
from mailoauthd.config import Account, DaemonSettings
from mailoauthd.errors import (
    GrantError,
    MailoauthdError,
    Misconfigured,
    ReauthorizationRequired,
    StateError,
    TransientGrantError,
    UnknownAccount,
    UsageError,
)
from mailoauthd.lastresort import guarded
from mailoauthd.presets import PRESETS
from mailoauthd.secret import Secret
from mailoauthd.state import AccountState
from mailoauthd.store import GrantStore

log = structlog.get_logger(__name__)

# 37 s: after suspend/resume the monotonic clock has not advanced, so we wake
# up regularly to re-check wall time; prime, so we don't align with other timers.
MAX_WAIT_SECONDS = 37
# Backoff after transient failures: 10 s doubling to 5 min, times a random
# factor in [0.5, 1) so that many accounts failing together do not retry together.
BACKOFF_BASE_SECONDS = 10
BACKOFF_CAP_SECONDS = 300
# A state write that failed (disk full) is retried this often; the unsaved
# tokens are held in memory meanwhile and nothing new is requested.
PERSIST_RETRY_SECONDS = 30
# After a transient failure, a token request within this many seconds gets the
# failure at once instead of another attempt: a mail program that opens ten
# connections during an outage should not wait ten times.
ON_DEMAND_GAP_SECONDS = 10
# A request that wants more validity than the token has starts a refresh; one
# such refresh per account in this many seconds, however many ask (any allowed
# user could otherwise make us hammer the provider, which Microsoft answers with
# AADSTS50196 and a throttle).
ON_DEMAND_REFRESH_GAP_SECONDS = 60
# A request's min_validity is capped at the lifetime of the tokens the provider
# issues, less this: more than that no refresh can give.
LIFETIME_MARGIN_SECONDS = 60
# A fleet (store.may_refresh False: another daemon refreshes): a token request
# waits for that daemon's new grant until this long before its own deadline,
# so that it can still be answered with a clear error rather than time out.
FLEET_WAIT_MARGIN_SECONDS = 0.5
# What a fleet's store raises when another daemon wrote the grant since, or
# this one no longer leads (fleet.Superseded): the answer is dropped.
SUPERSEDED = "state-superseded"
# After an import on a daemon that does not refresh: how long it waits for the
# refresher's first token before answering "stored" (the refresher needs one
# check, or a lease TTL when it must first be elected).
FLEET_IMPORT_WAIT_SECONDS = 20


def backoff_seconds(failures: int, rng: random.Random) -> float:
    """The wait before retry number `failures` (1-based), with jitter."""
    delay = min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2.0 ** max(0, failures - 1))
    return delay * rng.uniform(0.5, 1.0)


# (event, account, message, action): authorized, imported, refreshed,
# needs_authorization, refresh_token_expiring, revoked.
EventHook = Callable[[str, Account, str, str], None]


class Scheduler:
    """Owns every account's live state and every refresh."""

    def __init__(
        self,
        *,
        store: GrantStore,
        http: httpx.AsyncClient,
        settings: DaemonSettings,
        accounts: Mapping[str, Account],
        secrets: Mapping[str, Secret | None],
        now: Callable[[], datetime] = oauth.now_utc,
        rng: random.Random | None = None,
        on_event: EventHook | None = None,
        resolve: Callable[[Account], Awaitable[Account]] | None = None,
    ) -> None:
        self.store = store
        # Tells the daemon what a person may need to know (notify_command).
        self.on_event = on_event or (lambda *_: None)
        # Fills in a profile's discovered endpoints (discovery.py).
        self.resolve = resolve
        self.http = http
        self.settings = settings
        self.secrets = dict(secrets)
        self.now = now
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self.next_check: datetime | None = None
        # The moment the first not-yet-due token gets within min_validity of
        # its expiry: the loop checks then if the periodic check comes later.
        self._last_call: datetime | None = None
        self._limiter = trio.CapacityLimiter(settings.max_concurrent_refreshes)
        self._slots: dict[str, Slot] = {}
        self._nursery: trio.Nursery | None = None
        self._wakeup = trio.Event()
        for account in accounts.values():
            self._slots[account.name] = self._new_slot(account)

    # --- set-up and reload ---------------------------------------------------

    def _new_slot(self, account: Account) -> Slot:
        try:
            stored = self.store.load(account.name)
        except StateError as exc:
            log.error("state.unreadable", account=account.name, error=exc.message)
            slot = Slot(account=account, state=AccountState(account=account.name), broken=exc)
            slot.last_exc = StateError(
                f"{exc.message}; the file is kept as it is",
                hint=f"inspect or remove it, or run 'mailoauth import {account.name}'",
            )
            return slot
        if stored is None:
            initial = (
                state.OK if account.flow == "client_credentials" else state.NEEDS_AUTHORIZATION
            )
            stored = AccountState(account=account.name, status=initial)
        return Slot(account=account, state=stored)

    def reconfigure(
        self,
        settings: DaemonSettings,
        accounts: Mapping[str, Account],
        secrets: Mapping[str, Secret | None],
    ) -> None:
        """Adopt a reloaded configuration; live state of kept accounts is kept."""
        self.settings = settings
        self.secrets = dict(secrets)
        self._limiter.total_tokens = settings.max_concurrent_refreshes
        for name in list(self._slots):
            if name not in accounts:
                # An in-flight refresh still persists what it gets: the file stays.
                del self._slots[name]
        for account in accounts.values():
            slot = self._slots.get(account.name)
            if slot is None:
                self._slots[account.name] = self._new_slot(account)
                continue
            slot.account = account
            if slot.state.status == state.MISCONFIGURED:
                # The fix may be in this reload: try once more.
                slot.retry_at = self.now()
        self.next_check = None
        self._wakeup.set()

    @property
    def names(self) -> list[str]:
        return list(self._slots)

    # --- the loop --------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the periodic check forever; `started` once the first check is scheduled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            # A token_file newly configured, or lost, gets the stored token at once.
            for slot in list(self._slots.values()):
                if slot.broken is None and slot.state.valid_for(self.now()) > 0:
                    await self._write_token_file(slot)
            task_status.started()
            while True:
                try:
                    now = self.now()
                    interval = self.settings.refresh_interval
                    # A wall clock that jumped backwards must not postpone the check.
                    if self.next_check is None or not (now < self.next_check <= now + interval):
                        self.check(now)
                        self.next_check = now + interval
                    elif self._last_call is not None and self._last_call <= now:
                        self.check(now)  # early, so that no token outlives min_validity unrefreshed
                    wake = self.next_check
                    if self._last_call is not None:
                        wake = min(wake, self._last_call)
                    for slot in self._slots.values():
                        if slot.retry_at is not None:
                            if slot.retry_at <= now:
                                slot.retry_at = None
                                self._start_refresh(slot)
                            else:
                                wake = min(wake, slot.retry_at)
                    delay = (wake - self.now()).total_seconds()
                except Exception as exc:  # noqa: BLE001 - the last resort: keep serving
                    log.error("check.internal_error", error=type(exc).__name__)
                    delay = MAX_WAIT_SECONDS
                self._wakeup = trio.Event()
                with trio.move_on_after(min(max(delay, 0.0), MAX_WAIT_SECONDS)):
                    await self._wakeup.wait()

    def check(self, now: datetime) -> int:
        """
        The scheduled check: start refreshes for accounts due within refresh_before.

        Returns:
            How many refreshes it started or scheduled.
        """
        started = 0
        spread = self.settings.refresh_spread.total_seconds()
        last_call: datetime | None = None
        for slot in self._slots.values():
            self._check_age(slot, now)
            if slot.in_flight is not None or slot.scheduled or slot.retry_at is not None:
                continue
            if not self._refreshable(slot) or not self.store.may_refresh(slot.account.name):
                continue
            remaining = slot.state.valid_for(now)
            interrupted = slot.state.refresh_sent is not None
            if remaining > slot.account.refresh_before.total_seconds() and not interrupted:
                # Normally the next check comes long before this; with a
                # refresh_before shorter than refresh_interval it might not.
                assert slot.state.expires_at is not None
                latest = slot.state.expires_at - slot.account.min_validity
                if latest > now and (last_call is None or latest < last_call):
                    last_call = latest
                continue
            # Spread refreshes that fall due together, but never past what the
            # token has left beyond the clients' minimum validity.
            room = remaining - slot.account.min_validity.total_seconds()
            delay = self.rng.uniform(0, min(spread, room / 2)) if room > 0 and spread > 0 else 0.0
            if interrupted:
                # A refresh died with an earlier daemon: the provider's reuse window
                # for the refresh token we hold may be closing (state.refresh_sent).
                delay = 0.0
            slot.scheduled = True
            self._require_nursery().start_soon(
                guarded, "scheduled refresh", self._scheduled_refresh, slot, delay
            )
            started += 1
        self._last_call = last_call
        log.debug("check.done", accounts=len(self._slots), due=started)
        return started

    def _check_age(self, slot: Slot, now: datetime) -> None:
        """Warn once per refresh token when it nears a cut-off its profile knows of."""
        st, provider = slot.state, slot.account.provider
        if st.refresh_token is None or st.status == state.NEEDS_AUTHORIZATION:
            return
        if slot.age_warned == st.refresh_token_issued_at:
            return
        deadline = slot.deadline()
        if deadline is None or now < warning_time(provider, deadline):
            return
        slot.age_warned = st.refresh_token_issued_at
        name = slot.account.name
        why = " (Google's limit for apps in 'testing' status)" if provider.testing else ""
        if deadline == st.refresh_token_expires_at:
            why = " (as the provider said when it issued it)"
        message = f"the refresh token stops working around {iso(deadline)}{why}"
        action = f"run 'mailoauth authorize {name}' before then"
        if provider.testing:
            action += "; publish the app in Google Cloud to lift the 7-day limit"
        log.warning("refresh_token.expiring", account=name, expires_at=iso(deadline))
        self.on_event("refresh_token_expiring", slot.account, message, action)

    def _refreshable(self, slot: Slot) -> bool:
        if slot.broken is not None:
            return False
        if slot.unsaved is not None:
            return True
        if slot.state.status in (state.NEEDS_AUTHORIZATION, state.MISCONFIGURED):
            return False
        return slot.account.flow == "client_credentials" or slot.state.refresh_token is not None

    async def _scheduled_refresh(self, slot: Slot, delay: float) -> None:
        try:
            await trio.sleep(delay)
        finally:
            slot.scheduled = False
        await self._start_refresh(slot).wait()

    def _require_nursery(self) -> trio.Nursery:
        if self._nursery is None:
            raise RuntimeError("the scheduler is not running")
        return self._nursery

    def _start_refresh(self, slot: Slot) -> trio.Event:
        """Start a refresh unless one is in flight; either way, the event that ends it."""
        if slot.in_flight is None:
            slot.in_flight = trio.Event()
            # Under the last resort: an unforeseen fault ends this refresh only; the
            # next scheduled check tries again.
            self._require_nursery().start_soon(
                guarded, "refresh", self._refresh, slot, slot.in_flight
            )
        return slot.in_flight

    # --- one refresh -------------------------------------------------------------

    async def _refresh(self, slot: Slot, done: trio.Event) -> None:
        try:
            async with self._limiter:
                with structlog.contextvars.bound_contextvars(account=slot.account.name):
                    try:
                        await self._attempt(slot)
                    except Exception as exc:  # noqa: BLE001 - the last resort: keep serving
                        # A bug must not end the daemon: the tokens held are still served,
                        # and the account is retried as after any transient failure.
                        log.error("refresh.internal_error", error=type(exc).__name__)
                        slot.last_exc = TransientGrantError(
                            f"internal error during the refresh ({type(exc).__name__})",
                            hint="mailoauthd retries; please report this with the log",
                        )
                        delay = backoff_seconds(slot.state.failures + 1, self.rng)
                        slot.retry_at = self.now() + timedelta(seconds=delay)
                        self._wakeup.set()
        finally:
            slot.in_flight = None
            done.set()

    def _client(self, account: Account) -> oauth.Client:
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

    def _request(self, account: Account, current: AccountState) -> httpx.Request:
        client = self._client(account)
        if account.flow == "client_credentials":
            return oauth.client_credentials_request(client, account.scopes)
        if current.refresh_token is None:
            raise ReauthorizationRequired(
                "no refresh token yet",
                hint=f"run 'mailoauth authorize {account.name}' "
                f"or 'mailoauth import {account.name}'",
            )
        # Some providers (Microsoft) want the scopes named on refresh; elsewhere we
        # keep what was granted.
        scopes = account.scopes if PRESETS[account.provider.preset].scopes_on_refresh else None
        return oauth.refresh_request(client, current.refresh_token, scopes)

    async def _attempt(self, slot: Slot) -> None:
        generation = slot.generation
        account = slot.account
        if not self.store.may_refresh(account.name):
            return  # fleet: another daemon refreshes; its grant comes through adopt()
        try:
            if slot.unsaved is not None:
                # Tokens we hold but could not write: they come first, and the
                # provider may already have retired the refresh token on disk.
                if not await self._persist(slot, slot.unsaved, generation):
                    return
                if slot.state.valid_for(self.now()) > account.refresh_before.total_seconds():
                    await self._succeeded(slot)  # on disk at last: that refresh is done
                    return
            if self.resolve is not None:
                account = await self.resolve(account)
            request = self._request(account, slot.state)
            if account.flow != "client_credentials":
                # On disk before the request leaves: if we die before its answer is,
                # the next start knows to refresh at once (state.refresh_sent).
                if not await self._persist(
                    slot, state.refresh_sent(slot.state, self.now()), generation
                ):
                    return
            # Shielded: once a request is on its way, the provider may rotate
            # the refresh token; on shutdown we finish and persist rather than
            # drop the answer. fail_after still bounds it.
            with trio.CancelScope(shield=True):
                # expires_in counts from when the provider answered, which we do not know:
                # counting from before we asked never thinks a token lives longer than it does.
                sent = self.now()
                try:
                    with trio.fail_after(self.settings.request_timeout.total_seconds()):
                        response = await oauth.send(self.http, request)
                except trio.TooSlowError:
                    raise TransientGrantError(
                        "the token endpoint did not answer within "
                        f"{self.settings.request_timeout.total_seconds():g} s"
                    ) from None
                now = self.now()
                try:
                    tokens = oauth.parse_token_response(
                        response,
                        now=sent,
                        account=account.name,
                        default_expires_in=account.provider.default_expires_in.total_seconds(),
                        testing=account.provider.testing,
                    )
                except GrantError as exc:
                    if isinstance(exc.refresh_token, Secret):
                        await self._keep_refresh_token(slot, exc.refresh_token, generation)
                    raise
                self._note_answer(slot, tokens)
                new = state.refreshed(slot.state, tokens, now)
                if generation != slot.generation:
                    log.info("token.refresh_dropped", reason="account re-imported or revoked")
                    return
                slot.unsaved = new
                if not await self._persist(slot, new, generation):
                    return
        except GrantError as exc:
            await self._failed(slot, exc, generation)
        except OSError as exc:
            slot.retry_at = self.now() + timedelta(seconds=PERSIST_RETRY_SECONDS)
            slot.last_exc = StateError(
                f"cannot write {self.store.path(account.name)}: {exc.strerror or exc}",
                hint="free disk space or fix permissions; new tokens are held in memory meanwhile",
            )
            log.error(
                "state.write_failed", error=slot.last_exc.message, retry_in=PERSIST_RETRY_SECONDS
            )
            self._wakeup.set()
        else:
            await self._succeeded(slot)

    async def _keep_refresh_token(self, slot: Slot, token: Secret, generation: int) -> None:
        """
        Store the refresh token of an answer refused for another reason, before anything
        else: under strict rotation the one we sent is retired, and this is the grant.
        """
        if token == slot.state.refresh_token:
            return
        now = self.now()
        kept = dataclasses.replace(
            slot.state,
            refresh_token=token,
            refresh_token_issued_at=now,
            refresh_token_expires_at=None,
            refresh_sent=None,
        )
        if await self._persist(slot, kept, generation):
            log.warning("token.refresh_token_kept", reason="the rest of the answer was refused")

    def _note_answer(self, slot: Slot, tokens: oauth.TokenSet) -> None:
        """Say what a good answer lacked or narrowed (no expires_in, a lost mail scope)."""
        if tokens.expiry_source != "expires_in":
            log.info("token.no_expires_in", lifetime_from=tokens.expiry_source)
        if tokens.scopes is None:
            return
        lost = lost_mail_scopes(slot.account.scopes, slot.state.scopes, tokens.scopes)
        if not lost or slot.scope_warning is not None:
            return
        name = slot.account.name
        slot.scope_warning = (
            f"the provider no longer grants {', '.join(lost[:3])}: mail programs will be "
            "refused although tokens keep coming (consent withdrawn or narrowed by a policy)"
        )
        action = f"run 'mailoauth authorize {name}' and grant the mail permission again"
        log.warning("token.scope_lost", lost=lost[:10])
        self.on_event("scope_lost", slot.account, slot.scope_warning, action)

    async def _succeeded(self, slot: Slot) -> None:
        """A token response is on disk and in use: the refresh is done."""
        slot.bare_refusals = 0
        slot.retry_at = None
        slot.not_before = None
        slot.last_exc = None
        log.info(
            "token.refreshed",
            expires_in=round(slot.state.valid_for(self.now())),
            rotated=slot.state.refresh_token_issued_at == slot.state.last_refresh,
        )
        self.on_event("refreshed", slot.account, "", "")
        # Only now: the state file holds this token, so a crash cannot leave a
        # token file newer than what the daemon knows.
        await self._write_token_file(slot)

    async def _write_token_file(self, slot: Slot) -> None:
        """Put the current access token in the account's token_file, if it has one."""
        token = slot.state.access_token
        if slot.account.token_file is None or token is None:
            return
        try:
            await trio.to_thread.run_sync(tokenfile.write, slot.account, token)
        except OSError as exc:
            # The refresh itself succeeded and is served over the socket; only the
            # file's readers are behind, until the next refresh writes it again.
            log.error(
                "token_file.write_failed",
                account=slot.account.name,
                path=str(slot.account.token_file),
                error=exc.strerror or str(exc),
            )

    async def _persist(self, slot: Slot, new: AccountState, generation: int) -> bool:
        """Write `new` (a refresher's write) and make it current; False if the account moved on."""
        async with slot.write_lock:
            if generation != slot.generation:
                return False
            try:
                await trio.to_thread.run_sync(partial(self.store.save, new, refresh=True))
            except StateError as exc:
                if exc.code != SUPERSEDED:
                    raise
                self._superseded(slot, exc)
                return False
            slot.state = new
            if slot.unsaved is new:
                slot.unsaved = None
            return True

    async def _failed(self, slot: Slot, exc: GrantError, generation: int) -> None:
        now = self.now()
        name = slot.account.name
        if isinstance(exc, oauth.BareRefusal):
            slot.bare_refusals += 1
            if slot.bare_refusals > 1 and slot.account.flow == "client_credentials":
                # No grant to lose: it is our client the provider refuses.
                exc = Misconfigured(f"{exc.message}, again after a retry")
            elif slot.bare_refusals > 1:
                # Refused again after a pause: not a proxy's hiccup; the grant is dead.
                exc = ReauthorizationRequired(
                    f"{exc.message}, again after a retry",
                    hint=f"run 'mailoauth authorize {name}' and sign in again",
                )
        else:
            slot.bare_refusals = 0
        if isinstance(exc, ReauthorizationRequired):
            status = state.NEEDS_AUTHORIZATION
            exc.hint = exc.hint.replace("ACCOUNT", name)
        elif isinstance(exc, Misconfigured):
            status = state.MISCONFIGURED
        else:
            status = state.FAILING
        slot.last_exc = exc
        if status == state.FAILING:
            delay = backoff_seconds(slot.state.failures + 1, self.rng)
            if exc.retry_after is not None:
                delay = max(delay, exc.retry_after)
                slot.not_before = now + timedelta(seconds=exc.retry_after)
            slot.retry_at = now + timedelta(seconds=delay)
            log.warning(
                "token.refresh_failed",
                reason=exc.code,
                error=exc.message,
                attempt=slot.state.failures + 1,
                retry_in=round(delay, 1),
            )
            self._wakeup.set()
        else:
            slot.retry_at = None
            if slot.state.status != status:
                # Reported once, when it happens: nothing is retried until a human acts.
                log.error(f"account.{status}", error=exc.message, hint=exc.hint)
                if status == state.NEEDS_AUTHORIZATION:
                    self.on_event(status, slot.account, exc.message, exc.hint)
        new = state.failed(slot.state, exc, status, now)
        try:
            if not await self._persist(slot, new, generation):
                return
        except OSError as write_error:
            log.error("state.write_failed", error=str(write_error))
            slot.state = new

    # --- what the server asks for ----------------------------------------------

    def _slot(self, name: str) -> Slot:
        slot = self._slots.get(name)
        if slot is None:
            raise UnknownAccount(f"{name}: no such account")
        return slot

    def account(self, name: str) -> Account:
        return self._slot(name).account

    def last_error(self, name: str) -> str | None:
        return self._slot(name).last_error()

    def _raise_unusable(self, slot: Slot) -> None:
        name = slot.account.name
        if slot.broken is not None and slot.last_exc is not None:
            raise slot.last_exc
        status = slot.state.status
        if status == state.NEEDS_AUTHORIZATION:
            if slot.state.refresh_token is None and slot.state.last_error is None:
                raise ReauthorizationRequired(
                    f"{name}: not authorized yet",
                    hint=f"run 'mailoauth authorize {name}' (or 'mailoauth import {name}')",
                )
            raise ReauthorizationRequired(
                f"{name}: {slot.state.last_error or 'needs authorization'}",
                hint=slot.hint() or f"run 'mailoauth authorize {name}' and sign in again",
            )
        if status == state.MISCONFIGURED:
            hint = slot.last_exc.hint if slot.last_exc else Misconfigured.hint
            raise Misconfigured(f"{name}: {slot.state.last_error}", hint=hint)

    def _last_failure(self, slot: Slot, why: str = "") -> MailoauthdError:
        name = slot.account.name
        exc = slot.last_exc
        if exc is not None:
            return type(exc)(f"{name}: {why}{exc.message}", hint=exc.hint)
        return TransientGrantError(f"{name}: {why}no valid token")

    def _capped(self, slot: Slot, wanted: float) -> float:
        """
        `wanted`, but no more than the provider's tokens can have: the lifetime of
        the last one issued, less a margin; asking for more would refresh forever.
        """
        st = slot.state
        if st.expires_at is None or st.last_refresh is None:
            return wanted
        lifetime = (st.expires_at - st.last_refresh).total_seconds()
        return min(wanted, max(lifetime / 2, lifetime - LIFETIME_MARGIN_SECONDS))

    def token_now(self, name: str, min_validity: float | None) -> AccountState | None:
        """The account's state if its token is valid for `min_validity` now, else None."""
        slot = self._slots.get(name)
        if slot is None or slot.broken is not None:
            return None
        wanted = self._capped(slot, _wanted(slot, min_validity))
        return slot.state if slot.state.valid_for(self.now()) >= wanted else None

    async def token(self, name: str, min_validity: float | None, deadline: float) -> AccountState:
        """
        A state whose access token is valid for at least `min_validity` seconds.

        Refreshes (single flight) and waits when needed. The caller bounds the
        wait with a cancel scope; `deadline` (trio time) only lets us fail
        fast when the provider asked us to wait longer than the caller can.
        """
        slot = self._slot(name)
        waited = False
        while True:
            # Capped anew each time: a refresh tells us what lifetime tokens have.
            wanted = self._capped(slot, _wanted(slot, min_validity))
            now = self.now()
            if slot.state.valid_for(now) >= wanted and slot.broken is None:
                return slot.state
            self._raise_unusable(slot)
            if waited:
                remaining = slot.state.valid_for(now)
                if slot.last_exc is None and remaining > 0:
                    raise TransientGrantError(
                        f"{name}: the provider issued a token valid for {remaining:.0f} s, "
                        f"less than the {wanted:g} s asked for",
                        hint="lower min_validity for this account",
                    )
                raise self._last_failure(slot)
            if slot.in_flight is None:
                remaining = slot.state.valid_for(now)
                asked = slot.last_on_demand
                if (
                    remaining > 0
                    and asked is not None
                    and trio.current_time() - asked < ON_DEMAND_REFRESH_GAP_SECONDS
                ):
                    # The token still works: one on-demand refresh a minute, however
                    # many ask for more validity than it has.
                    raise TransientGrantError(
                        f"{name}: the token is valid for {remaining:.0f} s, less than the "
                        f"{wanted:g} s asked for, and it was refreshed on demand "
                        f"less than {ON_DEMAND_REFRESH_GAP_SECONDS} s ago",
                        hint="ask for a shorter min_validity, or try again in a minute",
                    )
                if slot.not_before is not None and slot.not_before > now:
                    wait = (slot.not_before - now).total_seconds()
                    if trio.current_time() + wait > deadline:
                        raise self._last_failure(
                            slot, f"the provider asked us to wait {wait:.0f} s; "
                        )
                    await trio.sleep(wait)
                    continue
                last = slot.state.last_attempt
                if (
                    slot.state.status == state.FAILING
                    and last is not None
                    and (now - last).total_seconds() < ON_DEMAND_GAP_SECONDS
                ):
                    raise self._last_failure(slot)
            if slot.in_flight is None:
                slot.last_on_demand = trio.current_time()
            if not self.store.may_refresh(name):
                await self._await_adopted(slot, min_validity, deadline)
            else:
                await self._start_refresh(slot).wait()
            waited = True

    async def refresh(self, name: str) -> AccountState:
        """Refresh now, whatever the schedule says (`mailoauth refresh`)."""
        slot = self._slot(name)
        if slot.broken is not None and slot.last_exc is not None:
            raise slot.last_exc
        if slot.account.flow != "client_credentials" and slot.state.refresh_token is None:
            self._raise_unusable(slot)
        if slot.in_flight is not None:
            await slot.in_flight.wait()  # a refresh that started before we asked
        self._raise_not_refresher(slot)
        await self._start_refresh(slot).wait()
        if slot.last_exc is not None:
            raise self._last_failure(slot)
        return slot.state

    async def import_token(self, name: str, refresh_token: Secret) -> AccountState:
        """Store a refresh token a person handed us, then refresh with it."""
        slot = self._slot(name)
        if slot.account.flow == "client_credentials":
            raise UsageError(f"{name}: a client_credentials account needs no refresh token")
        now = self.now()
        async with slot.write_lock:
            await self._set_aside(slot, now)
            slot.broken = None
            new = state.imported(name, refresh_token, now)
            await trio.to_thread.run_sync(self.store.save, new)
            slot.replace_grant(new)
        log.info("account.imported", account=name)
        self.on_event("imported", slot.account, "", "")
        if slot.in_flight is not None:
            await slot.in_flight.wait()  # a refresh that started with the old grant
        if not self.store.may_refresh(name):
            # Stored for the fleet: the daemon that refreshes takes it from there.
            await self._await_adopted(slot, None, trio.current_time() + FLEET_IMPORT_WAIT_SECONDS)
            return slot.state
        await self._start_refresh(slot).wait()
        if slot.last_exc is not None:
            # Said, so that nobody imports again what is already kept.
            why = "the refresh token is stored, but the first refresh with it failed: "
            raise self._last_failure(slot, why)
        return slot.state

    async def authorized(self, name: str, tokens: oauth.TokenSet) -> AccountState:
        """
        Store the tokens of a completed sign-in (`mailoauth authorize`); they replace any grant.

        Raises:
            StateError: they could not be written; nothing changed.
        """
        slot = self._slot(name)
        now = self.now()
        async with slot.write_lock:
            new = state.refreshed(AccountState(account=name), tokens, now)
            kept = tokens.refresh_token is None and slot.state.refresh_token is not None
            if kept and slot.broken is None:
                # RFC 6749 §6: providers omit the refresh token when consent already
                # exists; the one we hold still works, and is the grant.
                new = dataclasses.replace(
                    new,
                    refresh_token=slot.state.refresh_token,
                    refresh_token_issued_at=slot.state.refresh_token_issued_at,
                    refresh_token_expires_at=new.refresh_token_expires_at
                    or slot.state.refresh_token_expires_at,
                )
                log.warning("account.refresh_token_kept", reason="the sign-in issued none")
            try:
                await self._set_aside(slot, now)
                await trio.to_thread.run_sync(self.store.save, new)
            except OSError as exc:
                raise StateError(
                    f"{name}: cannot write {self.store.path(name)}: {exc.strerror or exc}; "
                    "the new tokens were not kept",
                    hint=f"free disk space or fix permissions, then run "
                    f"'mailoauth authorize {name}' again",
                ) from exc
            slot.broken = None
            slot.replace_grant(new)
        log.info(
            "account.authorized",
            account=name,
            expires_in=round(new.valid_for(now)),
            with_refresh_token=new.refresh_token is not None,
        )
        await self._write_token_file(slot)
        self.on_event("authorized", slot.account, "", "")
        return new

    async def _set_aside(self, slot: Slot, now: datetime) -> None:
        """Move an unreadable state file out of the way (kept) before a new grant is written."""
        if slot.broken is not None:
            aside = await trio.to_thread.run_sync(self.store.set_aside, slot.account.name, now)
            log.warning("state.set_aside", account=slot.account.name, moved_to=str(aside))

    async def wait_changed(self, name: str) -> None:
        """Return once a person has changed the account's grant (authorize, import, revoke)."""
        await self._slot(name).changed.wait()

    def client(self, account: Account) -> oauth.Client:
        """The OAuth client of an account, with its profile's client secret."""
        return self._client(account)

    async def forget(self, name: str) -> str:
        """
        Drop an account's tokens (`mailoauth revoke`), after revoking at the provider if we can.

        Returns:
            What happened at the provider, in words for the person who asked.
        """
        slot = self._slot(name)
        account = slot.account
        revoked, why, undiscovered = False, "", False
        if self.resolve is not None and account.provider.issuer:
            try:
                account = await self.resolve(account)
            except GrantError as exc:
                why, undiscovered = exc.message, True
                log.warning("token.revoke_failed", account=name, error=why)
        provider = account.provider
        token = slot.state.refresh_token or slot.state.access_token
        kind = "refresh_token" if slot.state.refresh_token else "access_token"
        if provider.revocation_endpoint and token is not None and slot.broken is None:
            request = oauth.revocation_request(
                self._client(account), provider.revocation_endpoint, token, kind
            )
            what = "the revocation endpoint"
            try:
                with trio.fail_after(self.settings.request_timeout.total_seconds()):
                    response = await oauth.send(self.http, request, what=what)
                revoked = response.status_code == 200
                why = f"{what} answered HTTP {response.status_code}"
            except trio.TooSlowError:
                why = f"{what} did not answer"
            except GrantError as exc:
                why = exc.message
            if not revoked:
                log.warning("token.revoke_failed", account=name, error=why)
        async with slot.write_lock:
            slot.bump()
            if slot.broken is None:
                await trio.to_thread.run_sync(self.store.remove, name)
            try:
                await trio.to_thread.run_sync(tokenfile.remove, slot.account)
            except OSError as exc:
                log.error("token_file.remove_failed", account=name, error=exc.strerror or str(exc))
            slot.replace_grant(state.forgotten(slot.state))
        if revoked:
            note = "revoked at the provider; local tokens forgotten"
        elif slot.broken is not None:
            note = (
                f"nothing revoked: {self.store.path(name)} is unreadable and kept as it is; "
                "remove it yourself, and the app's access in your account's settings"
            )
        elif token is None:
            note = "there were no tokens to revoke"
        elif undiscovered:
            note = (
                f"local tokens forgotten; the revocation endpoint is unknown ({why}), so the "
                "grant may remain at the provider: remove the app's access in your account's "
                "settings"
            )
        elif not provider.revocation_endpoint:
            note = (
                "local tokens forgotten; the provider has no revocation endpoint, so the "
                "grant remains there (remove the app's access in your account's settings)"
            )
        else:
            note = (
                f"local tokens forgotten; the provider did not confirm the revocation ({why}): "
                "remove the app's access in your account's settings to be sure"
            )
        log.info("account.revoked", account=name, at_provider=revoked)
        self.on_event("revoked", slot.account, "", "")
        return note

    # --- a fleet: another daemon may refresh (store.may_refresh, adopt, poke) ----------

    def adopt(self, name: str) -> None:
        """Another daemon changed the stored grant: take it, wake who waits, reschedule."""
        slot = self._slots.get(name)
        if slot is not None and slot.in_flight is None:
            self._reload(slot)

    def poke(self) -> None:
        """The right to refresh may have changed: check now; interrupted refreshes at once."""
        now = self.now()
        for slot in self._slots.values():
            if slot.unsaved is not None and slot.in_flight is None:
                slot.retry_at = now  # tokens we hold but could not store: store them first
        self.next_check = None
        self._wakeup.set()

    def _reload(self, slot: Slot) -> None:
        """Make the stored grant the slot's (what another daemon wrote)."""
        fresh = self._new_slot(slot.account)
        slot.replace_grant(fresh.state)
        slot.broken, slot.last_exc = fresh.broken, fresh.last_exc
        if slot.account.token_file is not None and self._nursery is not None:
            self._nursery.start_soon(self._write_token_file, slot)
        if self.store.may_refresh(slot.account.name):
            self.next_check = None  # the new grant may be due, or interrupted
            self._wakeup.set()

    def _superseded(self, slot: Slot, exc: StateError) -> None:
        """A refresher's write was refused: another daemon leads or wrote since; take its grant."""
        log.info("token.refresh_dropped", reason=exc.message)
        self._reload(slot)

    async def _await_adopted(self, slot: Slot, min_validity: float | None, deadline: float) -> None:
        """Wait (bounded) until another daemon's grant gives the token asked for."""
        with trio.move_on_at(deadline - FLEET_WAIT_MARGIN_SECONDS):
            while slot.state.valid_for(self.now()) < self._capped(
                slot, _wanted(slot, min_validity)
            ):
                await slot.changed.wait()
        if slot.state.valid_for(self.now()) <= 0 and slot.last_exc is None:
            slot.last_exc = TransientGrantError(
                "no token: another daemon of the fleet refreshes this account, and no new "
                "token came from it in time",
                hint="'mailoauth status' says whether this daemon reaches etcd and who leads",
            )

    def _raise_not_refresher(self, slot: Slot) -> None:
        if not self.store.may_refresh(slot.account.name):
            raise TransientGrantError(
                f"{slot.account.name}: this daemon does not refresh: another daemon of the "
                "fleet does (or none reaches etcd)",
                hint="run it on the fleet's leader ('mailoauth status' names it)",
            )

    def status(self) -> list[dict[str, object]]:
        """One row per account, for `mailoauth status`."""
        return accountstatus.rows(self._slots, self.now(), self.next_check, self.settings)

    def summary(self) -> str:
        """One line for systemd's STATUS=."""
        return accountstatus.summary(self._slots, self.now())


_NOT_MAIL = frozenset({"openid", "profile", "email", "offline_access"})


def _scope_key(scope: str) -> str:
    """A scope compared by its last part: Microsoft answers with or without the resource."""
    return scope.rstrip("/").rsplit("/", 1)[-1].lower()


def lost_mail_scopes(
    configured: tuple[str, ...], held: tuple[str, ...], granted: tuple[str, ...]
) -> list[str]:
    """
    The mail scopes (what an account asks for, less OpenID's) that were granted before,
    or are configured when nothing was recorded, and that the new answer no longer grants.
    """
    now = {_scope_key(s) for s in granted}
    before = {_scope_key(s) for s in held} if held else None
    lost = []
    for scope in configured:
        key = _scope_key(scope)
        if scope in _NOT_MAIL or key in now:
            continue
        if before is None or key in before:
            lost.append(scope)
    return lost


def _wanted(slot: Slot, min_validity: float | None) -> float:
    """Seconds a handed-out token must still be valid: asked for, or the account's."""
    return slot.account.min_validity.total_seconds() if min_validity is None else min_validity
