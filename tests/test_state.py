"""
Tests for mailoauthd.storage.state: the token store, its transitions, files, lock and safety
checks.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailoauthd.errors import (
    GrantError,
    Misconfigured,
    ReauthorizationRequired,
    StateError,
    StateLocked,
    TransientGrantError,
)
from mailoauthd.provider.oauth import TokenSet
from mailoauthd.provider.provider_input import MAX_MESSAGE, clean_text
from mailoauthd.secret import Secret
from mailoauthd.storage import state
from mailoauthd.storage.state import AccountState, TokenStore, from_toml, to_toml

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
ACCESS = "at-3c1f9a-do-not-print"
REFRESH = "rt-77b2e0-do-not-print"
NEW_REFRESH = "rt-new-c0ffee-do-not-print"
NOBODY = 65534
_T = TypeVar("_T")

# --- strategies ----------------------------------------------------------------
# tests/strategies.py belongs to another engineer (config strategies); these are ours.

# What config.NAME_PATTERN allows: the names that become `<account>.toml` on disk.
account_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", fullmatch=True)
# TOML offsets are whole minutes; the years keep instant comparisons far from datetime's limits.
offsets = st.sampled_from(
    [UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-5, minutes=-30))]
)
times = st.datetimes(
    min_value=datetime(1970, 1, 1), max_value=datetime(2200, 12, 31), timezones=offsets
)
secrets = st.text(max_size=60).map(Secret)
any_text = st.text()


def stored_text(text: str) -> str:
    return clean_text(text, MAX_MESSAGE)


@st.composite
def account_states(draw: st.DrawFn, names: st.SearchStrategy[str] = any_text) -> AccountState:
    """Any AccountState the daemon could hold, every optional field present or not."""

    def maybe(strategy: st.SearchStrategy[_T]) -> _T | None:
        return draw(st.none() | strategy)

    return AccountState(
        account=draw(names),
        status=draw(st.sampled_from(state.STATUSES)),
        access_token=maybe(secrets),
        expires_at=maybe(times),
        refresh_token=maybe(secrets),
        refresh_token_issued_at=maybe(times),
        scopes=tuple(draw(st.lists(st.text(max_size=30), max_size=5))),
        last_refresh=maybe(times),
        last_attempt=maybe(times),
        # As stored: the state module keeps no control characters in them (issue #10).
        last_error=maybe(st.text(max_size=200).map(stored_text)),
        last_error_code=maybe(st.text(max_size=30).map(stored_text)),
        error_since=maybe(times),
        failures=draw(st.integers(min_value=0, max_value=2**63 - 1)),
    )


# --- helpers -----------------------------------------------------------------


def full_state(**changes: object) -> AccountState:
    """A state with every field filled in, tokens set to recognisable values."""
    base = AccountState(
        account="work",
        status=state.OK,
        access_token=Secret(ACCESS),
        expires_at=T0 + timedelta(hours=1),
        refresh_token=Secret(REFRESH),
        refresh_token_issued_at=T0 - timedelta(days=3),
        scopes=("https://outlook.office.com/IMAP.AccessAsUser.All", "offline_access"),
        last_refresh=T0,
        last_attempt=T0,
        failures=0,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def token_set(refresh: str | None = None, scopes: tuple[str, ...] | None = None) -> TokenSet:
    """A parsed token response with a fresh access token."""
    return TokenSet(
        access_token=Secret("at-fresh"),
        token_type="Bearer",  # noqa: S106 - a token type, not a secret
        expires_at=T0 + timedelta(hours=2),
        refresh_token=None if refresh is None else Secret(refresh),
        scopes=scopes,
    )


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run code in a fresh interpreter of this venv, as a second daemon would be."""
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def snapshot(path: Path) -> tuple[bytes, int, int]:
    """The bytes, inode and mtime of a file: enough to see any modification."""
    info = os.lstat(path)
    return path.read_bytes(), info.st_ino, info.st_mtime_ns


@pytest.fixture
def umask0() -> Iterator[None]:
    """Run with umask 0, so that every mode we see is the one the code asked for."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TokenStore]:
    """An opened store in a fresh directory."""
    s = TokenStore(tmp_path / "state")
    s.open()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenStore]:
    """One opened store for every Hypothesis example (function-scoped fixtures are not reset)."""
    s = TokenStore(tmp_path_factory.mktemp("hypothesis") / "state")
    s.open()
    try:
        yield s
    finally:
        s.close()


# --- round trips -------------------------------------------------------------


class TestRoundTrip:
    @pytest.mark.slow
    @settings(database=None)
    @given(account_states())
    def test_toml_round_trip(self, original: AccountState) -> None:
        """Any state survives to_toml and from_toml unchanged."""
        assert original == from_toml(to_toml(original), source="<test>")

    @pytest.mark.slow
    @settings(max_examples=50, deadline=None, database=None)
    @given(account_states(names=account_names))
    def test_disk_round_trip(self, shared_store: TokenStore, original: AccountState) -> None:
        """Any state survives TokenStore.save and TokenStore.load unchanged."""
        shared_store.save(original)
        assert original == shared_store.load(original.account)

    def test_times_without_offset_are_read_as_utc(self) -> None:
        """A local date-time in the file (edited by hand) is taken as UTC, not as local time."""
        text = 'version = 1\naccount = "work"\nstatus = "ok"\nexpires_at = 2026-11-01T12:00:00\n'
        assert T0 == from_toml(text, source="<test>").expires_at


# --- save --------------------------------------------------------------------


class TestSave:
    @pytest.mark.usefixtures("umask0")
    def test_file_mode_is_0600(self, store: TokenStore) -> None:
        """A saved file is readable by its owner only, even replacing a more open one."""
        store.path("work").write_text("old")
        os.chmod(store.path("work"), 0o644)
        store.save(full_state())
        assert 0o600 == stat.S_IMODE(os.lstat(store.path("work")).st_mode)

    @pytest.mark.usefixtures("umask0")
    @pytest.mark.parametrize("existing", [None, 0o755, 0o777, 0o711])
    def test_directory_mode_is_0700_after_open(self, tmp_path: Path, existing: int | None) -> None:
        """open() leaves the state directory at mode 0700, whether it made it or found it."""
        directory = tmp_path / "state"
        if existing is not None:
            directory.mkdir(mode=existing)
            os.chmod(directory, existing)
        s = TokenStore(directory)
        s.open()
        s.close()
        assert 0o700 == stat.S_IMODE(os.lstat(directory).st_mode)

    def test_no_temp_file_left_behind(self, store: TokenStore) -> None:
        """After saves only the lock and the account's file are in the directory."""
        store.save(full_state())
        store.save(full_state(failures=3))
        assert {".lock", "work.toml"} == {p.name for p in store.directory.iterdir()}

    def test_existing_file_is_replaced_whole(self, store: TokenStore) -> None:
        """A save swaps in a new file rather than rewriting the old one in place."""
        big = full_state(scopes=tuple(f"scope-{i}" for i in range(200)), last_error="x" * 5000)
        small = full_state(scopes=("mail",))
        store.save(big)
        old_link = store.directory / "old-link"
        os.link(store.path("work"), old_link)
        old_bytes, old_inode, _ = snapshot(store.path("work"))

        store.save(small)

        new_bytes, new_inode, _ = snapshot(store.path("work"))
        assert to_toml(small).encode() == new_bytes
        assert new_inode != old_inode
        assert old_bytes == old_link.read_bytes()  # the old inode was never written to
        assert small == store.load("work")

    @pytest.mark.integration
    def test_failed_write_leaves_old_file_intact(self, tmp_path: Path) -> None:
        """A write that fails half-way (file size limit) leaves the old file whole and no temp."""
        directory = tmp_path / "state"
        old = full_state()
        first = TokenStore(directory)
        first.open()
        first.save(old)
        first.close()
        before = snapshot(first.path("work"))
        code = """
import resource, signal, sys
from pathlib import Path
from mailoauthd.storage.state import AccountState, TokenStore

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
store = TokenStore(Path(sys.argv[1]))
store.open()
resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))
try:
    store.save(AccountState(account="work", scopes=("x" * 100,) * 100))
except OSError as exc:
    print(exc.errno)
else:
    print("saved")
"""
        result = run_python(code, str(directory))
        assert (str(errno.EFBIG), "") == (result.stdout.strip(), result.stderr)
        assert before == snapshot(first.path("work"))
        assert {".lock", "work.toml"} == {p.name for p in directory.iterdir()}
        again = TokenStore(directory)
        again.open()
        try:
            assert old == again.load("work")
        finally:
            again.close()


# --- the lock ----------------------------------------------------------------

_SECOND_OPEN = """
import sys
from pathlib import Path
from mailoauthd.errors import StateLocked
from mailoauthd.storage.state import TokenStore

try:
    TokenStore(Path(sys.argv[1])).open()
except StateLocked as exc:
    print("locked:", exc.message)
else:
    print("opened")
"""


class TestLock:
    @pytest.mark.integration
    def test_second_daemon_is_refused(self, store: TokenStore) -> None:
        """A second process opening the directory gets StateLocked naming it and our pid."""
        result = run_python(_SECOND_OPEN, str(store.directory))
        assert "" == result.stderr
        assert result.stdout.startswith("locked:")
        assert str(store.directory) in result.stdout
        assert f"pid {os.getpid()}" in result.stdout

    def test_second_store_in_same_process_is_refused(self, store: TokenStore) -> None:
        """A second TokenStore on the same directory in this process is refused too."""
        with pytest.raises(StateLocked, match=f"pid {os.getpid()}") as info:
            TokenStore(store.directory).open()
        assert str(store.directory) in info.value.message
        assert "state-locked" == info.value.code

    @pytest.mark.integration
    def test_lock_can_be_taken_after_close(self, tmp_path: Path) -> None:
        """Once close() has run, another process and then this one can take the lock."""
        first = TokenStore(tmp_path / "state")
        first.open()
        first.close()
        assert "opened" == run_python(_SECOND_OPEN, str(first.directory)).stdout.strip()
        again = TokenStore(first.directory)
        again.open()
        again.close()

    def test_lock_file_names_the_holder(self, store: TokenStore) -> None:
        """The lock file holds the pid of the process that has the lock, and nothing more."""
        assert f"{os.getpid()}\n" == (store.directory / state.LOCK_NAME).read_text()

    def test_stale_temp_files_are_removed_at_open(self, tmp_path: Path) -> None:
        """Temp files a crash left behind are deleted at open; real state files stay."""
        directory = tmp_path / "state"
        directory.mkdir(mode=0o700)
        (directory / ".work.toml.4242.tmp").write_text("half a file")
        (directory / ".home.toml.1.tmp").write_text("")
        (directory / "work.toml").write_text(to_toml(full_state()))
        s = TokenStore(directory)
        s.open()
        s.close()
        assert {".lock", "work.toml"} == {p.name for p in directory.iterdir()}


# --- directory and symlink safety -----------------------------------------------


class TestSafety:
    def test_directory_of_another_user_is_refused(self, tmp_path: Path) -> None:
        """open() refuses a state directory owned by another uid and leaves it untouched."""
        directory = tmp_path / "state"
        directory.mkdir(mode=0o700)
        os.chown(directory, NOBODY, NOBODY)
        with pytest.raises(StateError) as info:
            TokenStore(directory).open()
        assert not isinstance(info.value, StateLocked)
        assert str(directory) in info.value.message
        assert f"uid {NOBODY}" in info.value.message
        assert [] == list(directory.iterdir())

    def test_symlinked_directory_is_refused(self, tmp_path: Path) -> None:
        """open() refuses a state directory that is a symlink, even to a directory of ours."""
        real = tmp_path / "real"
        real.mkdir(mode=0o700)
        (tmp_path / "state").symlink_to(real)
        with pytest.raises(StateError, match="not a directory"):
            TokenStore(tmp_path / "state").open()
        assert [] == list(real.iterdir())

    def test_load_does_not_follow_a_symlink(self, store: TokenStore, tmp_path: Path) -> None:
        """A symlink planted at <dir>/<account>.toml is refused, not read through."""
        target = tmp_path / "elsewhere.toml"
        target.write_text(to_toml(full_state()))
        store.path("work").symlink_to(target)
        with pytest.raises(StateError) as info:
            store.load("work")
        assert str(store.path("work")) in info.value.message
        assert REFRESH not in str(info.value)

    def test_save_does_not_follow_a_symlink(self, store: TokenStore, tmp_path: Path) -> None:
        """Saving over a planted symlink replaces the link and leaves its target alone."""
        target = tmp_path / "precious"
        target.write_text("do not touch\n")
        before = snapshot(target)
        store.path("work").symlink_to(target)
        store.save(full_state())
        assert before == snapshot(target)
        assert not store.path("work").is_symlink()
        assert full_state() == store.load("work")

    def test_save_does_not_follow_a_symlink_at_the_temp_path(
        self, store: TokenStore, tmp_path: Path
    ) -> None:
        """A symlink planted where the temp file goes is removed, never written through."""
        target = tmp_path / "precious"
        target.write_text("do not touch\n")
        before = snapshot(target)
        planted = store.directory / f".work.toml.{os.getpid()}.tmp"
        planted.symlink_to(target)
        store.save(full_state())
        assert before == snapshot(target)
        assert not os.path.lexists(planted)
        assert stat.S_ISREG(os.lstat(store.path("work")).st_mode)
        assert store.load("work") == full_state()


# --- load and set_aside --------------------------------------------------------

_HEADER = 'version = 1\naccount = "work"\nstatus = "ok"\n'

CORRUPT = [
    pytest.param(b"\x00\x01\x02 garbage = = =\n", id="garbage"),
    pytest.param(b"", id="empty"),
    pytest.param(_HEADER.encode()[:-1] + b"\xff\xfe\n", id="invalid-utf8"),
    pytest.param(b'version = 1\naccount = "work"\nstatus = "ok', id="truncated"),
    pytest.param(b'version = 2\naccount = "work"\nstatus = "ok"\n', id="future-version"),
    pytest.param(b'version = "1"\naccount = "work"\nstatus = "ok"\n', id="version-string"),
    pytest.param(b'account = "work"\nstatus = "ok"\n', id="no-version"),
    pytest.param(b'version = 1\naccount = "work"\nstatus = "great"\n', id="unknown-status"),
    pytest.param(b'version = 1\naccount = "work"\n', id="no-status"),
    pytest.param(b'version = 1\naccount = 7\nstatus = "ok"\n', id="account-int"),
    pytest.param((_HEADER + "access_token = 42\n").encode(), id="token-int"),
    pytest.param((_HEADER + 'expires_at = "tomorrow"\n').encode(), id="time-string"),
    pytest.param((_HEADER + "expires_at = 2026-11-01\n").encode(), id="time-date-only"),
    pytest.param((_HEADER + 'scopes = "mail"\n').encode(), id="scopes-string"),
    pytest.param((_HEADER + "scopes = [1, 2]\n").encode(), id="scopes-ints"),
    pytest.param((_HEADER + 'failures = "3"\n').encode(), id="failures-string"),
    pytest.param((_HEADER + "failures = true\n").encode(), id="failures-bool"),
    pytest.param((_HEADER + 'last_error = ["x"]\n').encode(), id="error-list"),
    pytest.param(b'version = 1\naccount = "home"\nstatus = "ok"\n', id="another-account"),
]


class TestLoad:
    def test_missing_file_is_none(self, store: TokenStore) -> None:
        """An account without a file has no stored state."""
        assert store.load("work") is None

    @pytest.mark.parametrize("content", CORRUPT)
    def test_unreadable_file_is_named_and_kept(self, store: TokenStore, content: bytes) -> None:
        """A file that is not a valid state of this account raises StateError naming its path."""
        path = store.path("work")
        path.write_bytes(content)
        before = snapshot(path)
        with pytest.raises(StateError) as info:
            store.load("work")
        assert str(path) in info.value.message
        assert before == snapshot(path)

    def test_load_does_not_modify_a_good_file(self, store: TokenStore) -> None:
        """Reading a valid file leaves its bytes, inode and mtime alone."""
        store.save(full_state())
        before = snapshot(store.path("work"))
        assert full_state() == store.load("work")
        assert before == snapshot(store.path("work"))

    def test_directory_in_place_of_file_is_a_state_error(self, store: TokenStore) -> None:
        """A directory where the account's file should be is reported as a StateError."""
        store.path("work").mkdir()
        with pytest.raises(StateError, match=str(store.path("work"))):
            store.load("work")

    @pytest.mark.parametrize("version", ["true", "1.0"])
    def test_version_of_wrong_type_is_refused(self, store: TokenStore, version: str) -> None:
        """A format version that is not the integer 1 is refused."""
        store.path("work").write_text(f'version = {version}\naccount = "work"\nstatus = "ok"\n')
        with pytest.raises(StateError, match="version"):
            store.load("work")


class TestSetAside:
    def test_moves_file_aside_keeping_its_bytes(self, store: TokenStore) -> None:
        """set_aside renames the file to <name>.toml.corrupt-<timestamp> with the same bytes."""
        path = store.path("work")
        path.write_bytes(b"\xff not a state file")
        aside = store.set_aside("work", T0)
        assert store.directory / "work.toml.corrupt-20261101T120000Z" == aside
        assert b"\xff not a state file" == aside.read_bytes()
        assert not path.exists()
        assert store.load("work") is None

    def test_nothing_to_set_aside(self, store: TokenStore) -> None:
        """set_aside of an account without a file does nothing and returns None."""
        assert store.set_aside("work", T0) is None
        assert [".lock"] == [p.name for p in store.directory.iterdir()]

    def test_remove_deletes_the_file(self, store: TokenStore) -> None:
        """remove() deletes the state file and tolerates a missing one."""
        store.save(full_state())
        store.remove("work")
        store.remove("work")
        assert store.load("work") is None


# --- transitions -------------------------------------------------------------


class TestTransitions:
    def test_refreshed_keeps_refresh_token_when_none_is_sent(self) -> None:
        """A response without a refresh token keeps the old one and when it was issued."""
        before = full_state(failures=2, last_error="boom", error_since=T0 - timedelta(hours=1))
        after = state.refreshed(before, token_set(), T0 + timedelta(minutes=5))
        assert Secret(REFRESH) == after.refresh_token
        assert before.refresh_token_issued_at == after.refresh_token_issued_at
        assert Secret("at-fresh") == after.access_token
        assert T0 + timedelta(hours=2) == after.expires_at

    def test_refreshed_takes_a_rotated_refresh_token(self) -> None:
        """A new refresh token replaces the old one and records when it was issued."""
        now = T0 + timedelta(minutes=5)
        after = state.refreshed(full_state(), token_set(refresh=NEW_REFRESH), now)
        assert Secret(NEW_REFRESH) == after.refresh_token
        assert now == after.refresh_token_issued_at

    def test_refreshed_with_the_same_refresh_token_is_no_rotation(self) -> None:
        """A provider echoing the same refresh token does not reset its issue time."""
        before = full_state()
        after = state.refreshed(before, token_set(refresh=REFRESH), T0 + timedelta(minutes=5))
        assert before.refresh_token_issued_at == after.refresh_token_issued_at

    def test_refreshed_clears_errors(self) -> None:
        """Success sets status ok, resets failures and errors, and records the time."""
        before = full_state(
            status=state.FAILING,
            failures=4,
            last_error="the provider is failing",
            last_error_code="provider-unavailable",
            error_since=T0 - timedelta(hours=1),
        )
        now = T0 + timedelta(minutes=5)
        after = state.refreshed(before, token_set(), now)
        assert (state.OK, 0, None, None, None) == (
            after.status,
            after.failures,
            after.last_error,
            after.last_error_code,
            after.error_since,
        )
        assert (now, now) == (after.last_refresh, after.last_attempt)

    def test_refreshed_scopes(self) -> None:
        """Granted scopes replace the stored ones; a response without scope keeps them."""
        before = full_state(scopes=("a", "b"))
        assert ("a", "b") == state.refreshed(before, token_set(), T0).scopes
        assert ("c",) == state.refreshed(before, token_set(scopes=("c",)), T0).scopes

    @pytest.mark.parametrize(
        ("error", "status"),
        [
            (TransientGrantError("the provider is failing"), state.FAILING),
            (ReauthorizationRequired("refresh token rejected"), state.NEEDS_AUTHORIZATION),
            (Misconfigured("client refused"), state.MISCONFIGURED),
        ],
    )
    def test_failed_keeps_tokens_and_counts(self, error: GrantError, status: str) -> None:
        """A failure keeps every token, counts itself and remembers when failing began."""
        before = full_state()
        first = state.failed(before, error, status, T0)
        second = state.failed(first, error, status, T0 + timedelta(minutes=1))
        for after in (first, second):
            assert (before.access_token, before.expires_at, before.refresh_token) == (
                after.access_token,
                after.expires_at,
                after.refresh_token,
            )
            assert before.refresh_token_issued_at == after.refresh_token_issued_at
            assert status == after.status
            assert error.message == after.last_error
            assert error.code == after.last_error_code
        assert (1, T0, T0) == (first.failures, first.error_since, first.last_attempt)
        assert (2, T0, T0 + timedelta(minutes=1)) == (
            second.failures,
            second.error_since,
            second.last_attempt,
        )

    def test_imported(self) -> None:
        """An imported grant is a refresh token issued now, with no access token yet."""
        after = state.imported("work", Secret(REFRESH), T0)
        assert (
            AccountState(
                account="work",
                status=state.OK,
                refresh_token=Secret(REFRESH),
                refresh_token_issued_at=T0,
            )
            == after
        )
        assert 0.0 == after.valid_for(T0)

    def test_forgotten(self) -> None:
        """Forgetting drops every token and error and waits for authorization."""
        after = state.forgotten(full_state(failures=3, last_error="x"))
        assert AccountState(account="work", status=state.NEEDS_AUTHORIZATION) == after

    def test_valid_for(self) -> None:
        """valid_for counts down to the expiry and never goes below zero."""
        s = full_state()
        assert 3600.0 == s.valid_for(T0)
        assert 0.0 == s.valid_for(T0 + timedelta(hours=2))
        assert 0.0 == full_state(access_token=None).valid_for(T0)


# --- secrets -----------------------------------------------------------------


class TestSecrets:
    def test_repr_and_str_hide_tokens(self) -> None:
        """Printing a state, in any form, never shows its access or refresh token."""
        s = full_state()
        for text in (repr(s), str(s), f"{s}", f"{s!r}", repr([s])):
            assert ACCESS not in text
            assert REFRESH not in text
            assert "***" in text

    def test_to_toml_is_where_tokens_are_revealed(self) -> None:
        """The state file's text holds the tokens in clear, so that they can be read back."""
        text = to_toml(full_state())
        assert ACCESS in text
        assert REFRESH in text

    def test_state_errors_hide_tokens(self, store: TokenStore) -> None:
        """A file that fails to parse is reported without the tokens it contains."""
        text = to_toml(full_state()).replace('status = "ok"', 'status = "weird"')
        store.path("work").write_text(text)
        with pytest.raises(StateError) as info:
            store.load("work")
        assert ACCESS not in str(info.value)
        assert REFRESH not in str(info.value)
