"""
The token store: per-account state, its transitions, and its persistence. Never does network I/O.

One TOML file per account (`<state_dir>/<account>.toml`, mode 0600, in a
directory of mode 0700), so that a refresh rewrites O(1) data however many
accounts there are. Every write goes to a temp file in the same directory,
is fsynced, renamed over the old file, and the directory is fsynced: after a
crash either the old or the new state is on disk, whole. An exclusive lock
(`<state_dir>/.lock`) keeps a second daemon away from the same files. A file
that cannot be read is reported by name and never overwritten: it is moved
aside first, and only on an explicit `import`.

Transitions are pure functions from one AccountState to the next; the caller
persists the result before acting on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import stat
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import tomli_w

from mailoauthd.errors import GrantError, StateError, StateLocked
from mailoauthd.protocol import Status
from mailoauthd.provider.oauth import TokenSet
from mailoauthd.provider.provider_input import MAX_MESSAGE, clean_text
from mailoauthd.secret import Secret
from mailoauthd.storage.fsutil import make_directories, sync_directory, write_atomic

_T = TypeVar("_T")

FORMAT_VERSION = 1
LOCK_NAME = ".lock"

# Status values, as stored and as shown by `mailoauth status`: protocol.Status is
# their home; these short names are what the modules that keep state compare with.
OK = Status.OK
NEEDS_AUTHORIZATION = Status.NEEDS_AUTHORIZATION
MISCONFIGURED = Status.MISCONFIGURED
FAILING = Status.FAILING
STATUSES = Status.STORED


@dataclass(frozen=True, slots=True, kw_only=True)
class AccountState:
    """Everything we know about one account's tokens."""

    account: str
    status: str = NEEDS_AUTHORIZATION
    access_token: Secret | None = None
    expires_at: datetime | None = None
    refresh_token: Secret | None = None
    refresh_token_issued_at: datetime | None = None
    scopes: tuple[str, ...] = ()
    last_refresh: datetime | None = None
    last_attempt: datetime | None = None
    last_error: str | None = None
    last_error_code: str | None = None
    error_since: datetime | None = None
    failures: int = 0
    # A refresh request was sent then and its answer is not on disk yet. Found at
    # start-up, it means we died waiting: the provider may have rotated the refresh
    # token we hold, and only refreshing at once, inside its reuse window, keeps it.
    refresh_sent: datetime | None = None
    # When the provider said the refresh token stops working (Google's
    # refresh_token_expires_in, for time-limited grants); None if it did not say.
    refresh_token_expires_at: datetime | None = None

    def valid_for(self, now: datetime) -> float:
        """Seconds the access token is still valid; 0 when there is none."""
        if self.access_token is None or self.expires_at is None:
            return 0.0
        return max(0.0, (self.expires_at - now).total_seconds())


# --- transitions -------------------------------------------------------------


def imported(account: str, refresh_token: Secret, now: datetime) -> AccountState:
    """A fresh grant handed to us by a person (`mailoauth import`)."""
    return AccountState(
        account=account, status=OK, refresh_token=refresh_token, refresh_token_issued_at=now
    )


def refresh_sent(state: AccountState, now: datetime) -> AccountState:
    """The state to write just before a refresh request leaves: see `refresh_sent`."""
    return dataclasses.replace(state, refresh_sent=now)


def refreshed(state: AccountState, tokens: TokenSet, now: datetime) -> AccountState:
    """
    The state after a successful token response.

    A provider that does not rotate refresh tokens omits one: we keep the old.
    """
    rotated = tokens.refresh_token is not None and tokens.refresh_token != state.refresh_token
    limit = state.refresh_token_expires_at if not rotated else None
    if tokens.refresh_token_expires_in is not None:
        limit = now + timedelta(seconds=tokens.refresh_token_expires_in)
    return dataclasses.replace(
        state,
        status=OK,
        access_token=tokens.access_token,
        expires_at=tokens.expires_at,
        refresh_token=tokens.refresh_token if rotated else state.refresh_token,
        refresh_token_issued_at=now if rotated else state.refresh_token_issued_at,
        scopes=tokens.scopes if tokens.scopes is not None else state.scopes,
        last_refresh=now,
        last_attempt=now,
        last_error=None,
        last_error_code=None,
        error_since=None,
        failures=0,
        refresh_sent=None,
        refresh_token_expires_at=limit,
    )


def failed(state: AccountState, error: GrantError, status: str, now: datetime) -> AccountState:
    """The state after a failed attempt; tokens are kept, whatever went wrong."""
    return dataclasses.replace(
        state,
        status=status,
        last_attempt=now,
        last_error=clean_text(error.message, MAX_MESSAGE),
        last_error_code=error.code,
        error_since=state.error_since or now,
        failures=state.failures + 1,
        # A timeout or a reset may hide a rotation: retried soon anyway, and at once
        # after a restart. A refusal is final: nothing to redo.
        refresh_sent=state.refresh_sent if status == FAILING else None,
    )


def forgotten(state: AccountState) -> AccountState:
    """No tokens at all: the account waits for authorization."""
    return AccountState(account=state.account)


# --- serialisation -----------------------------------------------------------

_SECRET_FIELDS = ("access_token", "refresh_token")
_TIME_FIELDS = (
    "expires_at",
    "refresh_token_issued_at",
    "last_refresh",
    "last_attempt",
    "error_since",
    "refresh_sent",
    "refresh_token_expires_at",
)
_TEXT_FIELDS = ("last_error", "last_error_code")


def to_toml(state: AccountState) -> str:
    """The file's text; the one place tokens are revealed for storage."""
    doc: dict[str, object] = {"version": FORMAT_VERSION, "account": state.account}
    doc["status"] = state.status
    for name in _SECRET_FIELDS:
        value = getattr(state, name)
        if value is not None:
            doc[name] = value.reveal()
    for name in _TIME_FIELDS + _TEXT_FIELDS:
        value = getattr(state, name)
        if value is not None:
            doc[name] = value
    doc["scopes"] = list(state.scopes)
    doc["failures"] = state.failures
    return tomli_w.dumps(doc)


def from_toml(text: str, *, source: str) -> AccountState:
    """
    Parse a state file.

    Raises:
        StateError: naming the file and what is wrong with it.
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise StateError(f"{source}: not a valid state file ({exc})") from exc
    version = doc.get("version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise StateError(f"{source}: unknown state format version {doc.get('version')!r}")
    try:
        fields: dict[str, object] = {"account": _typed(doc, "account", str)}
        status = _typed(doc, "status", str)
        if status not in STATUSES:
            raise ValueError(f"status {status!r} is not one of {', '.join(STATUSES)}")
        fields["status"] = status
        for name in _SECRET_FIELDS:
            if name in doc:
                fields[name] = Secret(_typed(doc, name, str))
        for name in _TIME_FIELDS:
            if name in doc:
                when = _typed(doc, name, datetime)
                fields[name] = when if when.tzinfo else when.replace(tzinfo=UTC)
        for name in _TEXT_FIELDS:
            if name in doc:
                # An older version stored provider text as it came (NUL and all):
                # cleaned here, it can no longer break what shows or passes it on.
                fields[name] = clean_text(_typed(doc, name, str), MAX_MESSAGE)
        scopes = doc.get("scopes", [])
        if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
            raise ValueError("scopes is not a list of strings")
        fields["scopes"] = tuple(scopes)
        fields["failures"] = _typed(doc, "failures", int) if "failures" in doc else 0
    except ValueError as exc:
        raise StateError(f"{source}: not a valid state file ({exc})") from exc
    return AccountState(**fields)  # type: ignore[arg-type]


def _typed(doc: dict[str, object], key: str, kind: type[_T]) -> _T:
    value = doc.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ValueError(f"{key} is missing or not a {kind.__name__}")
    return value


# --- the store ---------------------------------------------------------------


class TokenStore:
    """The state directory: lock, atomic per-account files."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock_fd: int | None = None

    def open(self) -> None:
        """
        Create the directory (0700) if needed and take the exclusive lock.

        Raises:
            StateLocked: another daemon holds the lock.
            StateError: the directory is unusable (a symlink, someone else's, unwritable).
        """
        try:
            make_directories(self.directory)  # parents 0700 too, whatever the umask
            info = os.lstat(self.directory)
        except OSError as exc:
            raise StateError(f"cannot create the state directory {self.directory}: {exc}") from exc
        if not stat.S_ISDIR(info.st_mode):
            raise StateError(f"the state directory {self.directory} is not a directory")
        if info.st_uid != os.geteuid():
            raise StateError(
                f"the state directory {self.directory} belongs to uid {info.st_uid}, not to us",
                hint="fix its owner, or point state_dir elsewhere",
            )
        if info.st_mode & 0o077:
            os.chmod(self.directory, 0o700)
        path = self.directory / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StateError(f"cannot open the lock file {path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            raise StateLocked(
                f"the state directory {self.directory} is in use by another mailoauthd"
                + (f" (pid {holder})" if holder else "")
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        self._remove_stale_temps()

    def close(self) -> None:
        """Release the lock."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _remove_stale_temps(self) -> None:
        # A crash mid-write leaves a temp file; the real file is intact.
        for entry in self.directory.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                entry.unlink()

    def path(self, account: str) -> Path:
        return self.directory / f"{account}.toml"

    def load(self, account: str) -> AccountState | None:
        """
        The stored state of an account, or None when there is none.

        Raises:
            StateError: the file exists but cannot be read or parsed; it names the file.
        """
        raw = self.read(account)
        return None if raw is None else self.decode(account, raw)

    def read(self, account: str) -> bytes | None:
        """An account's state file as it is on disk, or None when there is none."""
        path = self.path(account)
        try:
            # O_NONBLOCK: a FIFO planted here must not hang the daemon.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"{path}: cannot be read ({exc.strerror})") from exc
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise StateError(f"{path}: not a regular file")
        with os.fdopen(fd, "rb") as f:
            try:
                raw = f.read()
            except OSError as exc:
                raise StateError(f"{path}: cannot be read ({exc.strerror})") from exc
        return raw

    def decode(self, account: str, raw: bytes) -> AccountState:
        """A state file's content as state (a subclass may unseal it first)."""
        path = self.path(account)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise StateError(f"{path}: not a valid state file (not UTF-8)") from exc
        state = from_toml(text, source=str(path))
        if state.account != account:
            raise StateError(f"{path}: holds account {state.account!r}, not {account!r}")
        return state

    def save(self, state: AccountState) -> None:
        """
        Write an account's state atomically and durably.

        Raises:
            OSError: the write failed (disk full, …); the previous file is intact.
        """
        write_atomic(self.path(state.account), self.encode(state))

    def encode(self, state: AccountState) -> bytes:
        """A state file's content (a subclass may seal it)."""
        return to_toml(state).encode("utf-8")

    def set_aside(self, account: str, now: datetime) -> Path | None:
        """Move an unreadable state file out of the way, keeping it; returns where it went."""
        path = self.path(account)
        if not os.path.lexists(path):
            return None
        stamp = now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
        aside = path.with_name(f"{path.name}.corrupt-{stamp}")
        n = 1
        while os.path.lexists(aside):  # never replace an earlier copy
            n += 1
            aside = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        os.replace(path, aside)
        sync_directory(self.directory)
        return aside

    def remove(self, account: str) -> None:
        """Delete an account's state file."""
        with contextlib.suppress(FileNotFoundError):
            self.path(account).unlink()
        sync_directory(self.directory)
