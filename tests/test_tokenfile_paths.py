"""
token_file paths under a daemon that runs as root (issue #10, §3): no symlink on the way is
followed, not even one swapped in after the file was first written; directories others
may write and the daemon's own directories are refused; and directories the daemon
creates are 0700 whatever the umask. Real files; needs root (chown to another uid).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailoauthd.config import Account, Provider
from mailoauthd.secret import Secret
from mailoauthd.serve.server import bind
from mailoauthd.storage import tokenfile
from mailoauthd.storage.state import TokenStore

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="gives files to another uid")
USER_UID = 65534


def account(path: Path) -> Account:
    provider = Provider(name="dev", client_id="demo-client")
    return Account(
        name="work",
        provider=provider,
        token_file=path,
        token_file_owner=USER_UID,
        token_file_mode=0o600,
    )


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A directory owned by the user the token file is for (who may rename in it)."""
    directory = tmp_path / "home"
    directory.mkdir()
    os.chown(directory, USER_UID, USER_UID)
    (directory / "tokens").mkdir()
    os.chown(directory / "tokens", USER_UID, USER_UID)
    return directory


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A root-only directory with a root-only file: what the user wants to get at."""
    directory = tmp_path / "secret"
    directory.mkdir(mode=0o700)
    (directory / "work.token").write_text("root's own\n")
    return directory


def swap(home: Path, secret: Path) -> None:
    """What the user does: put a symlink to the secret directory where `tokens` was."""
    (home / "tokens").rename(home / "tokens.old")
    (home / "tokens").symlink_to(secret)


class TestSymlinks:
    def test_a_swapped_directory_is_not_written_through(self, home: Path, secret: Path) -> None:
        """The user swaps `tokens` for a symlink to a root-only directory after the first
        write: the next write is refused, and nothing in that directory is created or
        given to the user (it used to be chowned to them)."""
        path = home / "tokens" / "work.token"
        tokenfile.write(account(path), Secret("tok-1"))
        assert path.stat().st_uid == USER_UID
        swap(home, secret)
        with pytest.raises(OSError, match="symbolic link"):
            tokenfile.write(account(path), Secret("tok-2"))
        assert sorted(p.name for p in secret.iterdir()) == ["work.token"]
        assert (secret / "work.token").read_text() == "root's own\n"
        assert (secret / "work.token").stat().st_uid == 0

    def test_revoke_does_not_delete_through_a_swapped_directory(
        self, home: Path, secret: Path
    ) -> None:
        """`revoke` removes the token file: not the one a swapped symlink points to."""
        path = home / "tokens" / "work.token"
        tokenfile.write(account(path), Secret("tok-1"))
        swap(home, secret)
        with pytest.raises(OSError, match="symbolic link"):
            tokenfile.remove(account(path))
        assert (secret / "work.token").exists()

    def test_a_symlink_higher_up_is_refused(self, home: Path, secret: Path) -> None:
        (home / "link").symlink_to(home / "tokens")
        with pytest.raises(OSError, match="symbolic link"):
            tokenfile.write(account(home / "link" / "work.token"), Secret("tok"))

    def test_the_file_itself_as_a_symlink_is_replaced_not_followed(
        self, home: Path, secret: Path
    ) -> None:
        path = home / "tokens" / "work.token"
        path.symlink_to(secret / "work.token")
        tokenfile.write(account(path), Secret("tok"))
        assert not path.is_symlink()
        assert path.read_text() == "tok\n"
        assert (secret / "work.token").read_text() == "root's own\n"
        tokenfile.remove(account(path))
        assert (secret / "work.token").exists()


class TestDirectories:
    def test_a_directory_every_user_may_write_is_refused(self, tmp_path: Path) -> None:
        shared = tmp_path / "shared"
        shared.mkdir()
        shared.chmod(0o777)
        with pytest.raises(OSError, match="every user may write"):
            tokenfile.write(account(shared / "work.token"), Secret("tok"))
        shared.chmod(0o1777)  # sticky, but the file's own directory: still refused
        with pytest.raises(OSError, match="every user may write"):
            tokenfile.write(account(shared / "work.token"), Secret("tok"))
        assert list(shared.iterdir()) == []

    def test_a_sticky_directory_above_is_allowed(self, tmp_path: Path) -> None:
        """/tmp/a/b/work.token: /tmp is 1777 but nobody else can rename `a` in it."""
        sticky = tmp_path / "sticky"
        sticky.mkdir()
        sticky.chmod(0o1777)
        (sticky / "mine").mkdir(mode=0o755)
        path = sticky / "mine" / "work.token"
        tokenfile.write(account(path), Secret("tok"))
        assert path.read_text() == "tok\n"

    @pytest.fixture
    def protected(self) -> Iterator[None]:
        saved = set(tokenfile._protected)
        yield
        tokenfile._protected.clear()
        tokenfile._protected.update(saved)

    def test_the_state_and_socket_directories_are_refused(
        self, tmp_path: Path, protected: None
    ) -> None:
        state = tmp_path / "state"
        (state / "sub").mkdir(parents=True)
        tokenfile.protect(state)
        for path in (state / "work.toml", state / "sub" / "work.token"):
            with pytest.raises(OSError, match="state or socket directory"):
                tokenfile.write(account(path), Secret("tok"))
        assert sorted(p.name for p in state.iterdir()) == ["sub"]


class TestUmask:
    @pytest.fixture
    def umask_000(self) -> Iterator[None]:
        old = os.umask(0)
        yield
        os.umask(old)

    def test_missing_parents_of_the_state_directory_are_0700(
        self, tmp_path: Path, umask_000: None
    ) -> None:
        """With umask 000, Path.mkdir(parents=True) made the parents 0777."""
        store = TokenStore(tmp_path / "xdg" / "state" / "mailoauthd")
        store.open()
        store.close()
        for directory in ("xdg", "xdg/state", "xdg/state/mailoauthd"):
            assert stat.S_IMODE((tmp_path / directory).stat().st_mode) == 0o700, directory

    def test_missing_parents_of_the_socket_directory_are_0700(
        self, tmp_path: Path, umask_000: None
    ) -> None:
        listener = bind(tmp_path / "run" / "user" / "mailoauthd" / "socket")
        listener.close()
        for directory in ("run", "run/user", "run/user/mailoauthd"):
            assert stat.S_IMODE((tmp_path / directory).stat().st_mode) == 0o700, directory
