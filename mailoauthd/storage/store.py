"""
Where grants are kept: the persistence seam, and today's backend (files).

The refresher needs six things of a store: load, save and remove one account's
grant, list the accounts it holds, set an unreadable one aside, and say whether
this daemon may refresh an account (in a fleet, only one daemon may). `GrantStore`
names them, so that another backend (a consensus store shared by a fleet) plugs
in where `FilesStore` does today.

`FilesStore` is state.py's TokenStore (lock, atomic fsynced 0600 files) with
sealing at rest (seal.py) in between: with a key configured every file it
writes is sealed with the key source's first key and bound to the account;
plain files are still read, so existing state is sealed by its next write.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Protocol

from mailoauthd.config import NAME_PATTERN, StoreSettings
from mailoauthd.errors import StateError
from mailoauthd.storage import seal
from mailoauthd.storage.state import AccountState, TokenStore

_NO_KEY_HINT = (
    "configure the key that sealed it in [store] encryption_key_file or encryption_key_command"
)


class GrantStore(Protocol):
    """What the scheduler asks of a store; every method may block (run it in a thread)."""

    def open(self) -> None:
        """Take the store for this daemon (lock, connect); raises StateError."""

    def close(self) -> None:
        """Let go of it."""

    def load(self, account: str) -> AccountState | None:
        """An account's grant, or None; raises StateError naming what is unreadable."""

    def save(self, state: AccountState, *, refresh: bool = False) -> None:
        """
        Store a grant durably before it is used; raises OSError, the old one intact.

        `refresh`: the refresher's saves (its refresh_sent note, the answer, a failure).
        A fleet's store fences them with the lock of the daemon that may refresh, and
        refuses one that finds a newer grant with StateError code "state-superseded".
        """

    def may_refresh(self, account: str) -> bool:
        """Whether this daemon may refresh `account` now (a fleet: the lock's holder only)."""

    def remove(self, account: str) -> None:
        """Forget an account's grant."""

    def accounts(self) -> list[str]:
        """The accounts with a stored grant."""

    def set_aside(self, account: str, now: datetime) -> object:
        """Move an unreadable grant out of the way, kept; returns where it went."""

    def path(self, account: str) -> object:
        """Where an account's grant is, for messages."""


def unseal(keyring: seal.Keyring | None, account: str, raw: bytes, where: str) -> bytes:
    """A stored grant's plain document: opened if sealed, as it is if plain (not sealed yet)."""
    if not seal.is_sealed(raw):
        return raw
    if keyring is None:
        raise seal.SealError(
            f"{where}: is sealed, but no encryption key is configured", hint=_NO_KEY_HINT
        )
    return keyring.open(account, raw, where=where)


def seal_plain(keyring: seal.Keyring | None, account: str, plain: bytes) -> bytes:
    """What to store for a grant's plain document: sealed when there is a key."""
    return plain if keyring is None else keyring.seal(account, plain)


class FilesStore(TokenStore):
    """The state directory (state.TokenStore), sealed with `keyring` when there is one."""

    def __init__(self, directory: Path, keyring: seal.Keyring | None = None) -> None:
        super().__init__(directory)
        self.keyring = keyring
        # What check_keys read at start, handed to the first load of each account so
        # that a start reads every file once (docs/performance.md: time to ready).
        self._preread: dict[str, bytes] = {}

    def read(self, account: str) -> bytes | None:
        raw = self._preread.pop(account, None)
        return raw if raw is not None else super().read(account)

    def save(self, state: AccountState, *, refresh: bool = False) -> None:
        """Write the file; `refresh` changes nothing here: one daemon holds the directory."""
        self._preread.pop(state.account, None)
        super().save(state)

    def may_refresh(self, account: str) -> bool:
        """Always: the directory's lock makes this daemon the only one."""
        return True

    def remove(self, account: str) -> None:
        self._preread.pop(account, None)
        super().remove(account)

    def set_aside(self, account: str, now: datetime) -> Path | None:
        self._preread.pop(account, None)
        return super().set_aside(account, now)

    def decode(self, account: str, raw: bytes) -> AccountState:
        return super().decode(account, unseal(self.keyring, account, raw, str(self.path(account))))

    def encode(self, state: AccountState) -> bytes:
        return seal_plain(self.keyring, state.account, super().encode(state))

    def accounts(self) -> list[str]:
        names = (entry.name.removesuffix(".toml") for entry in self.directory.glob("*.toml"))
        return sorted(name for name in names if NAME_PATTERN.fullmatch(name))

    def check_keys(self) -> None:
        """
        Refuse a key source that cannot open what is stored: before anything is written.

        Reads only the envelopes' headers. A file that is unreadable for another
        reason, or altered, is left to `load` (reported for its account alone).

        Raises:
            UnknownKey: a file is sealed with a key the key source does not hold.
            SealError: a file is sealed and no key is configured.
        """
        for name in self.accounts():
            try:
                raw = self.read(name)
            except StateError:
                continue
            if raw is None:
                continue
            self._preread[name] = raw
            if not seal.is_sealed(raw):
                continue
            where = str(self.path(name))
            if self.keyring is None:
                raise seal.SealError(
                    f"{where}: is sealed, but no encryption key is configured; nothing was changed",
                    hint=_NO_KEY_HINT,
                )
            kid = seal.envelope_key(raw)
            if kid is not None and kid not in self.keyring.ids:
                raise seal.UnknownKey(
                    f"{where}: sealed with key {kid}, which is not among the keys of "
                    f"{self.keyring.source} (the wrong key?); nothing was changed",
                    hint="put the key that sealed it back into the key source (any line "
                    "after the first)",
                )


def open_store(
    settings: StoreSettings, state_dir: Path, env: Mapping[str, str] | None = None
) -> FilesStore:
    """
    The configured store, opened (locked) and checked against the key source.

    Raises:
        ConfigError: the key source cannot be read or holds no valid key.
        StateError: the store cannot be opened, or its grants were sealed with another key.
    """
    keyring = seal.load_keyring(settings.encryption_key_file, settings.encryption_key_command, env)
    store = FilesStore(state_dir, keyring)
    store.open()
    try:
        store.check_keys()
    except BaseException:
        store.close()
        raise
    return store


@dataclass
class Rekeyed:
    """What `rekey` did."""

    sealed: list[str] = field(default_factory=list)
    failed: list[StateError] = field(default_factory=list)


def rekey(store: GrantStore) -> Rekeyed:
    """Re-seal every stored grant with the first key; an unreadable one is reported and kept."""
    done = Rekeyed()
    for name in store.accounts():
        try:
            state = store.load(name)
        except StateError as exc:
            done.failed.append(exc)
            continue
        if state is not None:
            store.save(state)
            done.sealed.append(name)
    return done
