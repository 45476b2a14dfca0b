"""
What people do to a grant: import a refresh token, store a sign-in's tokens,
and revoke (at the provider, then here).

Each replaces the account's grant in the store and in its record
(`Slot.replace_grant`): refreshes started with the old grant are dropped, and
requests waiting for a person (`token --wait`) wake up.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime

import structlog
import trio

from mailoauthd.config import Account
from mailoauthd.errors import GrantError, StateError, UsageError, helper_command
from mailoauthd.flows import Flow
from mailoauthd.provider import oauth, provider_http
from mailoauthd.refresh.accounts import Slot
from mailoauthd.refresh.attempt import write_token_file
from mailoauthd.refresh.ondemand import adopted, last_failure, raise_unusable
from mailoauthd.refresh.refresher import Refresher
from mailoauthd.secret import Secret
from mailoauthd.storage import state, tokenfile
from mailoauthd.storage.state import AccountState

log = structlog.get_logger(__name__)


class Grants:
    """Import, sign-in results and revocation, for the refresher's records."""

    def __init__(self, refresher: Refresher) -> None:
        self.refresher = refresher
        self.shared = refresher.shared

    async def import_token(self, name: str, refresh_token: Secret) -> AccountState:
        """Store a refresh token a person handed us, then refresh with it."""
        slot = self.refresher.slot(name)
        if slot.account.flow == Flow.CLIENT_CREDENTIALS:
            raise UsageError(f"{name}: a client_credentials account needs no refresh token")
        now = self.shared.now()
        async with slot.write_lock:
            await self._set_aside(slot, now)
            slot.broken = None
            new = state.imported(name, refresh_token, now)
            await trio.to_thread.run_sync(self.shared.store.save, new)
            slot.replace_grant(new)
        log.info("account.imported", account=name)
        self.shared.on_event("imported", slot.account, "", "")
        if not self.shared.store.may_refresh(name):
            # In a fleet the daemon that refreshes takes the grant from the store and
            # refreshes it: a refresh here would spend the token it is about to use.
            # The wait is bounded by the request (handlers).
            await adopted(slot, None, "the imported refresh token")
            raise_unusable(slot)
            return slot.state
        if slot.in_flight is not None:
            await slot.in_flight.wait()  # a refresh that started with the old grant
        await self.refresher.start(slot).wait()
        if slot.last_exc is not None:
            # Said, so that nobody imports again what is already kept.
            why = "the refresh token is stored, but the first refresh with it failed: "
            raise last_failure(slot, why)
        return slot.state

    async def authorized(self, name: str, tokens: oauth.TokenSet) -> AccountState:
        """
        Store the tokens of a completed sign-in (`mailoauth authorize`); they replace any grant.

        Raises:
            StateError: they could not be written; nothing changed.
        """
        slot = self.refresher.slot(name)
        now = self.shared.now()
        async with slot.write_lock:
            new = _signed_in(slot, tokens, now)
            try:
                await self._set_aside(slot, now)
                await trio.to_thread.run_sync(self.shared.store.save, new)
            except OSError as exc:
                raise StateError(
                    f"{name}: cannot write {self.shared.store.path(name)}: "
                    f"{exc.strerror or exc}; the new tokens were not kept",
                    hint=f"free disk space or fix permissions, then run "
                    f"{helper_command('authorize', name)} again",
                ) from exc
            slot.broken = None
            slot.replace_grant(new)
        log.info(
            "account.authorized",
            account=name,
            expires_in=round(new.valid_for(now)),
            with_refresh_token=new.refresh_token is not None,
        )
        await write_token_file(slot)
        self.shared.on_event("authorized", slot.account, "", "")
        return new

    async def _set_aside(self, slot: Slot, now: datetime) -> None:
        """Move an unreadable stored grant out of the way (kept) before a new one is written."""
        if slot.broken is not None:
            store = self.shared.store
            aside = await trio.to_thread.run_sync(store.set_aside, slot.account.name, now)
            log.warning("state.set_aside", account=slot.account.name, moved_to=str(aside))

    async def forget(self, name: str) -> str:
        """
        Drop an account's tokens (`mailoauth revoke`), after revoking at the provider if we can.

        Returns:
            What happened at the provider, in words for the person who asked.
        """
        slot = self.refresher.slot(name)
        account = slot.account
        why, undiscovered = "", False
        if self.shared.resolve is not None and account.provider.issuer:
            try:
                account = await self.shared.resolve(account)
            except GrantError as exc:
                why, undiscovered = exc.message, True
                log.warning("token.revoke_failed", account=name, error=why)
        token = slot.state.refresh_token or slot.state.access_token
        revoked = False
        if account.provider.revocation_endpoint and token is not None and slot.broken is None:
            revoked, why = await self._revoke(slot, account, token)
        async with slot.write_lock:
            slot.bump()
            if slot.broken is None:
                await trio.to_thread.run_sync(self.shared.store.remove, name)
            try:
                await trio.to_thread.run_sync(tokenfile.remove, slot.account)
            except OSError as exc:
                log.error("token_file.remove_failed", account=name, error=exc.strerror or str(exc))
            slot.replace_grant(state.forgotten(slot.state))
        log.info("account.revoked", account=name, at_provider=revoked)
        self.shared.on_event("revoked", slot.account, "", "")
        if revoked:
            return "revoked at the provider; local tokens forgotten"
        if slot.broken is not None:
            return (
                f"nothing revoked: {self.shared.store.path(name)} is unreadable and kept as it "
                "is; remove it yourself, and the app's access in your account's settings"
            )
        if token is None:
            return "there were no tokens to revoke"
        if undiscovered:
            return (
                f"local tokens forgotten; the revocation endpoint is unknown ({why}), so the "
                "grant may remain at the provider: remove the app's access in your account's "
                "settings"
            )
        if not account.provider.revocation_endpoint:
            return (
                "local tokens forgotten; the provider has no revocation endpoint, so the "
                "grant remains there (remove the app's access in your account's settings)"
            )
        return (
            f"local tokens forgotten; the provider did not confirm the revocation ({why}): "
            "remove the app's access in your account's settings to be sure"
        )

    async def _revoke(self, slot: Slot, account: Account, token: Secret) -> tuple[bool, str]:
        """Ask the provider's revocation endpoint (RFC 7009); whether it confirmed, and why not."""
        endpoint = account.provider.revocation_endpoint
        assert endpoint is not None
        kind = "refresh_token" if slot.state.refresh_token else "access_token"
        request = oauth.revocation_request(self.shared.client(account), endpoint, token, kind)
        what = "the revocation endpoint"
        revoked = False
        try:
            with trio.fail_after(self.shared.settings.request_timeout.total_seconds()):
                response = await provider_http.send(self.shared.http, request, what=what)
            revoked = response.status_code == 200
            why = f"{what} answered HTTP {response.status_code}"
        except trio.TooSlowError:
            why = f"{what} did not answer"
        except GrantError as exc:
            why = exc.message
        if not revoked:
            log.warning("token.revoke_failed", account=slot.account.name, error=why)
        return revoked, why


def _signed_in(slot: Slot, tokens: oauth.TokenSet, now: datetime) -> AccountState:
    """The grant a sign-in gives; the refresh token held is kept when the sign-in issued none."""
    new = state.refreshed(AccountState(account=slot.account.name), tokens, now)
    kept = tokens.refresh_token is None and slot.state.refresh_token is not None
    if not kept or slot.broken is not None:
        return new
    # RFC 6749 §6: providers omit the refresh token when consent already
    # exists; the one we hold still works, and is the grant.
    log.warning("account.refresh_token_kept", reason="the sign-in issued none")
    return dataclasses.replace(
        new,
        refresh_token=slot.state.refresh_token,
        refresh_token_issued_at=slot.state.refresh_token_issued_at,
        refresh_token_expires_at=new.refresh_token_expires_at
        or slot.state.refresh_token_expires_at,
    )
