"""
The scheduler: the one object the daemon holds for its accounts' tokens.

A thin front over the parts that do the work, so that the daemon, the proxy
and the server's handlers ask one thing:

    accounts.py      the registry: one record (Slot) per account, its Phase
    refresher.py     the periodic check, timing, single flight, retries; adopt/poke
    attempt.py       one refresh attempt: request, answer stored, failure judged
    ondemand.py      what token requests wait for
    grants.py        import, sign-in results, revocation
    accountstatus.py status rows, health, systemd's line

Persistence is the store's (store.GrantStore): files today, a fleet's etcd next.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime

import httpx
import trio

from mailoauthd.config import Account, DaemonSettings
from mailoauthd.provider import oauth
from mailoauthd.refresh import accountstatus, ondemand
from mailoauthd.refresh.accounts import EventHook, Shared
from mailoauthd.refresh.grants import Grants
from mailoauthd.refresh.refresher import Refresher
from mailoauthd.secret import Secret
from mailoauthd.storage.state import AccountState
from mailoauthd.storage.store import GrantStore


class Scheduler:
    """Every account's live state and every refresh, behind the calls the daemon makes."""

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
        self.shared = Shared(
            store=store,
            http=http,
            settings=settings,
            secrets=dict(secrets),
            now=now,
            rng=rng or random.Random(),  # noqa: S311 - jitter, not cryptography
            on_event=on_event or (lambda *_: None),
            resolve=resolve,
        )
        self.refresher = Refresher(self.shared, accounts)
        self.grants = Grants(self.refresher)

    @property
    def on_event(self) -> EventHook:
        """Tells the daemon what a person may need to know (notify_command)."""
        return self.shared.on_event

    @on_event.setter
    def on_event(self, hook: EventHook) -> None:
        self.shared.on_event = hook

    # --- running, reloading, a fleet's store ---------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the periodic check forever; `started` once the first check is scheduled."""
        await self.refresher.run(task_status=task_status)

    def reconfigure(
        self,
        settings: DaemonSettings,
        accounts: Mapping[str, Account],
        secrets: Mapping[str, Secret | None],
    ) -> None:
        """Adopt a reloaded configuration; live state of kept accounts is kept."""
        self.refresher.reconfigure(settings, accounts, secrets)

    def check(self, now: datetime) -> int:
        """The periodic check, now; how many refreshes it scheduled."""
        return self.refresher.check(now)

    def adopt(self, name: str) -> None:
        """Another daemon changed the stored grant: reload it, wake who waits, reschedule."""
        self.refresher.adopt(name)

    def poke(self) -> None:
        """The right to refresh may have changed (store.may_refresh): check now."""
        self.refresher.poke()

    # --- what requests ask -----------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return list(self.refresher.slots)

    def account(self, name: str) -> Account:
        return self.refresher.slot(name).account

    def last_error(self, name: str) -> str | None:
        return self.refresher.slot(name).last_error()

    def client(self, account: Account) -> oauth.Client:
        """The OAuth client of an account, with its profile's client secret."""
        return self.shared.client(account)

    def token_now(self, name: str, min_validity: float | None) -> AccountState | None:
        """The account's state if its token is valid for `min_validity` now, else None."""
        return ondemand.token_now(self.refresher, name, min_validity)

    async def token(self, name: str, min_validity: float | None, deadline: float) -> AccountState:
        """A state whose access token is valid for `min_validity` s (ondemand.token)."""
        return await ondemand.token(self.refresher, name, min_validity, deadline)

    async def refresh(self, name: str) -> AccountState:
        """Refresh now, whatever the schedule says (`mailoauth refresh`)."""
        return await ondemand.refresh(self.refresher, name)

    async def wait_changed(self, name: str) -> None:
        """Return once the account's grant was replaced (authorize, import, revoke, adopt)."""
        await self.refresher.slot(name).changed.wait()

    async def import_token(self, name: str, refresh_token: Secret) -> AccountState:
        """Store a refresh token a person handed us, then refresh with it."""
        return await self.grants.import_token(name, refresh_token)

    async def authorized(self, name: str, tokens: oauth.TokenSet) -> AccountState:
        """Store the tokens of a completed sign-in; they replace any grant."""
        return await self.grants.authorized(name, tokens)

    async def forget(self, name: str) -> str:
        """Revoke at the provider if we can and drop the tokens; what happened, in words."""
        return await self.grants.forget(name)

    def status(self) -> list[dict[str, object]]:
        """One row per account, for `mailoauth status`."""
        slots, now = self.refresher.slots, self.shared.now()
        return accountstatus.rows(slots, now, self.refresher.next_check, self.shared.settings)

    def summary(self) -> str:
        """One line for systemd's STATUS=."""
        return accountstatus.summary(self.refresher.slots, self.shared.now())
