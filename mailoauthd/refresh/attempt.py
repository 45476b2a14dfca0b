"""
One refresh attempt: the request, its answer stored before it is used, and
what a failure means (retry later, or a person must act).

The refresher (refresher.py) decides when an attempt runs and that only one
runs per account; this module does one, and says through the record
(`Slot.retry`) when to try again. Every save here passes `refresh=True`: a
fleet's store fences them with the lock of the daemon that may refresh.
"""

from __future__ import annotations

import dataclasses
import random
from datetime import timedelta
from functools import partial

import httpx
import structlog
import trio

from mailoauthd.config import Account
from mailoauthd.errors import (
    GrantError,
    Misconfigured,
    ReauthorizationRequired,
    StateError,
    TransientGrantError,
    helper_command,
)
from mailoauthd.flows import Flow
from mailoauthd.presets import PRESETS
from mailoauthd.provider import oauth, provider_http
from mailoauthd.refresh.accounts import Shared, Slot
from mailoauthd.secret import Secret
from mailoauthd.storage import state, tokenfile
from mailoauthd.storage.state import AccountState

log = structlog.get_logger(__name__)

# A state write that failed (disk full) is retried this often; the unsaved
# tokens are held in memory meanwhile and nothing new is requested.
PERSIST_RETRY_SECONDS = 30
# Backoff after transient failures: 10 s doubling to 5 min, times a random
# factor in [0.5, 1) so that many accounts failing together do not retry together.
BACKOFF_BASE_SECONDS = 10
BACKOFF_CAP_SECONDS = 300
# OpenID's scopes: losing one of them on refresh does not stop mail.
_NOT_MAIL = frozenset({"openid", "profile", "email", "offline_access"})


def backoff_seconds(failures: int, rng: random.Random) -> float:
    """The wait before retry number `failures` (1-based), with jitter."""
    delay = min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2.0 ** max(0, failures - 1))
    return delay * rng.uniform(0.5, 1.0)


class Attempts:
    """Runs one refresh attempt for a record; `shared` holds the store, HTTP client and clock."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared

    def _request(self, account: Account, current: AccountState) -> httpx.Request:
        client = self.shared.client(account)
        if account.flow == Flow.CLIENT_CREDENTIALS:
            return oauth.client_credentials_request(client, account.scopes)
        if current.refresh_token is None:
            raise ReauthorizationRequired(
                "no refresh token yet",
                hint=f"run {helper_command('authorize', account.name)} "
                f"or {helper_command('import', account.name)}",
            )
        # Some providers (Microsoft) want the scopes named on refresh; elsewhere we
        # keep what was granted.
        scopes = account.scopes if PRESETS[account.provider.preset].scopes_on_refresh else None
        return oauth.refresh_request(client, current.refresh_token, scopes)

    async def run(self, slot: Slot) -> None:
        """
        One attempt; the record says the outcome (state, last_exc, `due` for a retry).

        Raises:
            StateError: a save was refused because the store holds a newer grant
                (code "state-superseded"); nothing of the answer is used.
        """
        generation = slot.generation
        account = slot.account
        shared = self.shared
        try:
            if slot.unsaved is not None:
                # Tokens we hold but could not write: they come first, and the
                # provider may already have retired the refresh token on disk.
                await self._persist(slot, slot.unsaved, generation)
                if slot.state.valid_for(shared.now()) > account.refresh_before.total_seconds():
                    await self._succeeded(slot)  # on disk at last: that refresh is done
                    return
            if shared.resolve is not None:
                account = await shared.resolve(account)
            request = self._request(account, slot.state)
            if account.flow != Flow.CLIENT_CREDENTIALS:
                # On disk before the request leaves: if we die before its answer is,
                # the next start knows to refresh at once (state.refresh_sent).
                note = state.refresh_sent(slot.state, shared.now())
                if not await self._persist(slot, note, generation):
                    return
            # Shielded: once a request is on its way, the provider may rotate
            # the refresh token; on shutdown we finish and persist rather than
            # drop the answer. fail_after still bounds it.
            with trio.CancelScope(shield=True):
                await self._exchange(slot, account, request, generation)
        except GrantError as exc:
            await self._failed(slot, exc, generation)
        except OSError as exc:
            slot.retry(shared.now() + timedelta(seconds=PERSIST_RETRY_SECONDS))
            slot.last_exc = StateError(
                f"cannot write {shared.store.path(account.name)}: {exc.strerror or exc}",
                hint="free disk space or fix permissions; new tokens are held in memory meanwhile",
            )
            log.error(
                "state.write_failed", error=slot.last_exc.message, retry_in=PERSIST_RETRY_SECONDS
            )
        else:
            if slot.unsaved is None and slot.generation == generation:
                await self._succeeded(slot)

    async def _exchange(
        self, slot: Slot, account: Account, request: httpx.Request, generation: int
    ) -> None:
        """Send the request, and store the answer (or the refresh token a refused one carries)."""
        shared = self.shared
        timeout = shared.settings.request_timeout.total_seconds()
        # expires_in counts from when the provider answered, which we do not know:
        # counting from before we asked never thinks a token lives longer than it does.
        sent = shared.now()
        try:
            with trio.fail_after(timeout):
                response = await provider_http.send(shared.http, request)
        except trio.TooSlowError:
            raise TransientGrantError(
                f"the token endpoint did not answer within {timeout:g} s"
            ) from None
        now = shared.now()
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
        await self._persist(slot, new, generation)

    async def _keep_refresh_token(self, slot: Slot, token: Secret, generation: int) -> None:
        """
        Store the refresh token of an answer refused for another reason, before anything
        else: under strict rotation the one we sent is retired, and this is the grant.
        """
        if token == slot.state.refresh_token:
            return
        now = self.shared.now()
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
        action = f"run {helper_command('authorize', name)} and grant the mail permission again"
        log.warning("token.scope_lost", lost=lost[:10])
        self.shared.on_event("scope_lost", slot.account, slot.scope_warning, action)

    async def _succeeded(self, slot: Slot) -> None:
        """A token response is stored and in use: the refresh is done."""
        slot.bare_refusals = 0
        slot.due = None
        slot.not_before = None
        slot.last_exc = None
        log.info(
            "token.refreshed",
            expires_in=round(slot.state.valid_for(self.shared.now())),
            rotated=slot.state.refresh_token_issued_at == slot.state.last_refresh,
        )
        self.shared.on_event("refreshed", slot.account, "", "")
        # Only now: the store holds this token, so a crash cannot leave a
        # token file newer than what the daemon knows.
        await write_token_file(slot)

    async def _persist(self, slot: Slot, new: AccountState, generation: int) -> bool:
        """Store `new` and make it current; False if the account moved on meanwhile."""
        async with slot.write_lock:
            if generation != slot.generation:
                return False
            await trio.to_thread.run_sync(partial(self.shared.store.save, new, refresh=True))
            slot.state = new
            if slot.unsaved is new:
                slot.unsaved = None
            return True

    async def _failed(self, slot: Slot, exc: GrantError, generation: int) -> None:
        now = self.shared.now()
        exc = _judged(slot, exc)
        if isinstance(exc, ReauthorizationRequired):
            status = state.NEEDS_AUTHORIZATION
            exc.hint = exc.hint.replace("ACCOUNT", slot.account.name)
        elif isinstance(exc, Misconfigured):
            status = state.MISCONFIGURED
        else:
            status = state.FAILING
        slot.last_exc = exc
        if status == state.FAILING:
            delay = backoff_seconds(slot.state.failures + 1, self.shared.rng)
            if exc.retry_after is not None:
                delay = max(delay, exc.retry_after)
                slot.not_before = now + timedelta(seconds=exc.retry_after)
            slot.retry(now + timedelta(seconds=delay))
            log.warning(
                "token.refresh_failed",
                reason=exc.code,
                error=exc.message,
                attempt=slot.state.failures + 1,
                retry_in=round(delay, 1),
            )
        else:
            slot.due = None
            if slot.state.status != status:
                # Reported once, when it happens: nothing is retried until a human acts.
                log.error(f"account.{status}", error=exc.message, hint=exc.hint)
                if status == state.NEEDS_AUTHORIZATION:
                    self.shared.on_event(status, slot.account, exc.message, exc.hint)
        new = state.failed(slot.state, exc, status, now)
        try:
            await self._persist(slot, new, generation)
        except OSError as write_error:
            log.error("state.write_failed", error=str(write_error))
            slot.state = new


def _judged(slot: Slot, exc: GrantError) -> GrantError:
    """A bare 4xx refusal once is a hiccup; twice in a row, the grant or client is refused."""
    if not isinstance(exc, oauth.BareRefusal):
        slot.bare_refusals = 0
        return exc
    slot.bare_refusals += 1
    if slot.bare_refusals <= 1:
        return exc
    if slot.account.flow == Flow.CLIENT_CREDENTIALS:
        # No grant to lose: it is our client the provider refuses.
        return Misconfigured(f"{exc.message}, again after a retry")
    # Refused again after a pause: not a proxy's hiccup; the grant is dead.
    return ReauthorizationRequired(
        f"{exc.message}, again after a retry",
        hint=f"run {helper_command('authorize', slot.account.name)} and sign in again",
    )


async def write_token_file(slot: Slot) -> None:
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
