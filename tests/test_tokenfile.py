"""The per-account token file: written atomically with its mode and owner, kept by the scheduler."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import trio
import trio.testing
from conftest import USER, in_process_daemon, make_config, mock_now

from mailoauthd.config import Account, Provider
from mailoauthd.secret import Secret
from mailoauthd.storage import tokenfile
from mailoauthd.testing import DevProvider


def account(path: Path | None, **kw: object) -> Account:
    provider = Provider(name="dev", client_id="demo-client")
    return Account(name="work", provider=provider, token_file=path, **kw)  # type: ignore[arg-type]


class TestWrite:
    def test_writes_the_token_and_a_newline_with_mode_0600(self, tmp_path: Path) -> None:
        """By default the file holds the token and a newline, readable by its owner only."""
        path = tmp_path / "work.token"
        assert tokenfile.write(account(path), Secret("tok-1")) == path
        assert path.read_text() == "tok-1\n"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600

    def test_replaces_the_file_and_leaves_no_temp(self, tmp_path: Path) -> None:
        """A second write replaces the file (a new inode: readers see old or new) and cleans up."""
        path = tmp_path / "work.token"
        tokenfile.write(account(path), Secret("tok-1"))
        before = path.stat().st_ino
        tokenfile.write(account(path), Secret("tok-2"))
        assert path.read_text() == "tok-2\n"
        assert path.stat().st_ino != before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["work.token"]

    def test_mode_owner_and_group(self, tmp_path: Path) -> None:
        """The configured mode, owner and group are set on the file."""
        path = tmp_path / "work.token"
        uid, gid = os.getuid(), os.getgid()
        tokenfile.write(
            account(path, token_file_mode=0o440, token_file_owner=uid, token_file_group=gid),
            Secret("tok"),
        )
        info = path.stat()
        assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o440, uid, gid)

    def test_unknown_owner_is_an_error_and_changes_nothing(self, tmp_path: Path) -> None:
        """A user that does not exist is named, and the previous file stays as it was."""
        path = tmp_path / "work.token"
        tokenfile.write(account(path), Secret("old"))
        with pytest.raises(OSError, match="no user 'no-such-user-here'"):
            tokenfile.write(account(path, token_file_owner="no-such-user-here"), Secret("new"))
        assert path.read_text() == "old\n"

    def test_no_token_file_configured(self, tmp_path: Path) -> None:
        """An account without token_file writes nothing."""
        assert tokenfile.write(account(None), Secret("tok")) is None
        assert list(tmp_path.iterdir()) == []

    def test_a_symlink_in_the_temp_name_is_not_followed(self, tmp_path: Path) -> None:
        """A planted symlink at the temp path is replaced, never written through."""
        path = tmp_path / "work.token"
        victim = tmp_path / "victim"
        victim.write_text("keep")
        (tmp_path / f".work.token.{os.getpid()}.tmp").symlink_to(victim)
        tokenfile.write(account(path), Secret("tok"))
        assert victim.read_text() == "keep"
        assert path.read_text() == "tok\n"


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """A clock that stands still until the test jumps it."""
    return trio.testing.MockClock(rate=0)


@pytest.fixture
def dev(clock: trio.testing.MockClock) -> Iterator[DevProvider]:
    """A provider with 20-minute tokens, on the MockClock's time."""
    with DevProvider(
        access_token_lifetime=1200, clock=lambda: mock_now(clock)().timestamp()
    ) as provider:
        yield provider


class TestScheduler:
    async def test_kept_current_and_removed_on_revoke(
        self, clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path
    ) -> None:
        """The file follows each refresh, always matches the saved state, and goes on revoke."""
        path = tmp_path / "tokens" / "work.token"
        path.parent.mkdir()
        keys = f'token_file = "{path}"'
        cfg = make_config(tmp_path, dev, account_keys=keys, daemon_keys='refresh_spread = "0s"')
        async with in_process_daemon(cfg, now=mock_now(clock)) as d:
            assert not path.exists()
            await d.scheduler.import_token("work", Secret(dev.issue_refresh_token(USER)))
            first = d.scheduler.refresher.slots["work"].state.access_token
            assert first is not None
            assert path.read_text() == first.reveal() + "\n"
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            # Past refresh_before (10 min) of a 20-minute token: the scheduled check refreshes.
            clock.jump(timedelta(minutes=11).total_seconds())
            with trio.fail_after(5):
                while path.read_text() == first.reveal() + "\n":
                    await trio.to_thread.run_sync(lambda: None)
                    await trio.testing.wait_all_tasks_blocked()
            current = d.scheduler.refresher.slots["work"].state.access_token
            assert current is not None
            assert current != first
            assert path.read_text() == current.reveal() + "\n"
            assert d.store.load("work").access_token == current  # type: ignore[union-attr]
            await d.scheduler.forget("work")
            assert not path.exists()

    async def test_written_at_start_from_the_stored_state(
        self, clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path
    ) -> None:
        """A token_file added to the config gets the stored token when the daemon starts."""
        cfg = make_config(tmp_path, dev)
        async with in_process_daemon(cfg, now=mock_now(clock)) as d:
            await d.scheduler.import_token("work", Secret(dev.issue_refresh_token(USER)))
            token = d.scheduler.refresher.slots["work"].state.access_token
        assert token is not None
        path = tmp_path / "work.token"
        cfg = make_config(tmp_path, dev, account_keys=f'token_file = "{path}"')
        async with in_process_daemon(cfg, now=mock_now(clock)):
            assert path.read_text() == token.reveal() + "\n"
