"""
The disk: full while writing state (a file size limit on the real daemon, a full
tmpfs under the in-process one), and state files that are truncated or garbage.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from conftest import helper, in_process_daemon, mock_now, quiet

from mailoauthd import config as config_module

from .support import (
    Daemon,
    Figures,
    Ledger,
    ask,
    new_provider,
    seed_accounts,
    stored,
    write_config,
)

FAST = 'refresh_spread = "0s"'


def test_file_size_limit_keeps_old_state_and_serving(
    tmp_path: Path, figures: Figures, ledger: Ledger
) -> None:
    """When state cannot be written (EFBIG), the old file stays, old tokens are served, the new
    ones are held in memory and nothing new is asked of the provider until they are on disk."""
    provider, client_secret = new_provider(refresh_token_rotation="strict")
    try:
        config = write_config(tmp_path, provider, client_secret, daemon_keys=FAST)
        state_dir, socket_path = tmp_path / "state", tmp_path / "run" / "socket"
        seed_accounts(tmp_path, provider, ["work"])
        daemon = Daemon(config, socket_path, tmp_path / "daemon.log")
        daemon.wait_ready()
        assert provider.wait_for(lambda: len(provider.rotations) == 1, 10)  # due at start
        assert eventually_true(lambda: daemon.status()["work"]["status"] == "ok")
        first = ask(socket_path, {"v": 1, "op": "token", "account": "work"})["token"]
        provider.add_fault("delay", seconds=0.3)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(socket_path))
            sock.sendall(b'{"v": 1, "op": "refresh", "account": "work"}\n')
            assert provider.wait_for(lambda: provider.received == 2, 10)
            before = (state_dir / "work.toml").read_bytes()
            # The disk "fills" while the provider is answering: the rotated tokens
            # arrive and cannot be written. SIGXFSZ is ignored by Python: EFBIG.
            resource.prlimit(daemon.pid, resource.RLIMIT_FSIZE, (64, resource.RLIM_INFINITY))
            answer = receive_json(sock)
        assert answer["ok"] is False
        assert "File too large" in answer["message"]
        assert provider.wait_for(lambda: len(provider.rotations) == 2, 10)
        spent, held = provider.rotations[-1].used, provider.rotations[-1].issued
        assert (state_dir / "work.toml").read_bytes() == before  # the old state, whole
        assert stored(state_dir, "work").refresh_token.reveal() == spent  # type: ignore[union-attr]
        # Serving on: the token on disk is still good for an hour.
        for _ in range(20):
            assert ask(socket_path, {"v": 1, "op": "token", "account": "work"})["token"] == first
        row = daemon.status()["work"]
        assert "cannot write" in str(row["last_error"])
        assert str(state_dir / "work.toml") in str(row["last_error"])
        # Asking again retries the write first, and asks the provider for nothing.
        again = ask(socket_path, {"v": 1, "op": "refresh", "account": "work"})
        assert again["ok"] is False
        assert provider.count(grant_type="refresh_token") == 2
        assert len(daemon.events("state.write_failed")) >= 2
        assert not list(state_dir.glob(".*.tmp"))  # a failed write leaves no temp file
        resource.prlimit(daemon.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
        fixed = ask(socket_path, {"v": 1, "op": "refresh", "account": "work"})
        assert fixed["ok"] is True, fixed
        # The held answer went to disk, and being fresh, nothing more was asked.
        assert stored(state_dir, "work").refresh_token.reveal() == held  # type: ignore[union-attr]
        assert provider.refresh_token_status(held or "") == "valid"
        assert len(provider.rotations) == 2
        assert ask(socket_path, {"v": 1, "op": "token", "account": "work"})["token"] != first
        assert daemon.status()["work"]["status"] == "ok"
        assert daemon.stop() == 0
        figures.add(
            "disk", "writes refused by a file size limit", len(daemon.events("state.write_failed"))
        )
        figures.held(
            "disk",
            "file size limit (EFBIG): old state file intact, old token served, new tokens held "
            "in memory, nothing new requested, written once the limit is lifted",
        )
        ledger.scan(
            provider.issued_secrets(),
            [("daemon log", daemon.log()), ("answers", f"{answer}{again}{fixed}")],
        )
    finally:
        provider.stop()


def eventually_true(condition: object, seconds: float = 10.0) -> bool:
    """Poll `condition` (a callable) in real time."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


def receive_json(sock: socket.socket) -> dict[str, object]:
    import json

    from .support import receive_all

    sock.settimeout(20)
    return json.loads(receive_all(sock))  # type: ignore[no-any-return]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs as the state directory, so that the test can fill it."""
    mount = tmp_path / "state"
    mount.mkdir(mode=0o700)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the EFBIG test stands in")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> Path:
    """Fill the file system under `directory` to the last byte; returns the filler."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for chunk in (4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * chunk)
    finally:
        os.close(fd)
    return filler


async def test_full_disk_is_retried_on_schedule(
    clock: trio.testing.MockClock,
    tmp_path: Path,
    small_disk: Path,
    figures: Figures,
    ledger: Ledger,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """On a full disk (ENOSPC) the write is retried every 30 s, old tokens are served meanwhile,
    and once there is room the held tokens are written, with no new request to the provider."""
    provider, client_secret = new_provider(
        refresh_token_rotation="strict", clock=lambda: mock_now(clock)().timestamp()
    )
    try:
        config_path = write_config(tmp_path, provider, client_secret, daemon_keys=FAST)
        cfg = config_module.load(config_path)
        seed_accounts(tmp_path, provider, ["work"])
        async with in_process_daemon(cfg, now=mock_now(clock)) as d:
            await quiet(d.scheduler)  # the start-up check's refresh
            assert len(provider.rotations) == 1
            first = (await d.scheduler.token("work", None, trio.current_time() + 5)).access_token
            provider.add_fault("delay", seconds=0.3)
            failures: list[str] = []

            async def refresh() -> None:
                try:
                    await d.scheduler.refresh("work")
                except Exception as exc:  # noqa: BLE001 - the failure is what we look at
                    failures.append(str(exc))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(refresh)
                assert await trio.to_thread.run_sync(
                    provider.wait_for, lambda: provider.received == 2, 10
                )
                before = (small_disk / "work.toml").read_bytes()
                filler = await trio.to_thread.run_sync(fill, small_disk)
            assert "No space left on device" in failures[0]
            assert (small_disk / "work.toml").read_bytes() == before
            held = provider.rotations[-1].issued
            retries = []
            for _ in range(3):
                row = d.scheduler.status()[0]
                assert row["status"] == "ok"
                assert "No space left" in str(row["last_error"])
                served = await d.scheduler.token("work", None, trio.current_time() + 5)
                assert served.access_token == first  # the old token, still good
                retries.append(row["next_check"])
                clock.jump(29)
                await quiet(d.scheduler)
                assert d.scheduler.status()[0]["next_check"] == row["next_check"]  # not yet
                clock.jump(2)
                await quiet(d.scheduler)
                assert d.scheduler.status()[0]["next_check"] != row["next_check"]
            assert provider.count(grant_type="refresh_token") == 2  # nothing new asked for
            assert (small_disk / "work.toml").read_bytes() == before
            filler.unlink()
            clock.jump(31)
            await quiet(d.scheduler)
            assert d.scheduler.status()[0]["last_error"] is None
            assert stored(small_disk, "work").refresh_token.reveal() == held  # type: ignore[union-attr]
            served = await d.scheduler.token("work", None, trio.current_time() + 5)
            assert served.access_token != first
            assert provider.count(grant_type="refresh_token") == 2
        gaps = [(time_of(b) - time_of(a)) for a, b in zip(retries, retries[1:], strict=False)]
        assert gaps == [31.0, 31.0]  # 30 s after each failure, seen at 1 s resolution
        figures.add("disk", "writes refused by a full tmpfs (ENOSPC)", len(retries) + 1)
        figures.held(
            "disk",
            "full tmpfs (ENOSPC): write retried every 30 s, old token served, held tokens "
            "written once there is room, no new request meanwhile",
        )
        ledger.scan(
            provider.issued_secrets(),
            [("daemon log", capsys.readouterr().out), ("failures", str(failures))],
        )
    finally:
        provider.stop()


def time_of(iso: object) -> float:
    from datetime import datetime

    return datetime.fromisoformat(str(iso)).timestamp()


BROKEN = {
    "truncated": None,  # a real state file cut in the middle of its refresh token
    "garbage": os.urandom(512),
    "empty": b"",
    "wrong": b'version = 1\naccount = "someone-else"\nstatus = "ok"\n',
}


def test_broken_state_files_are_named_kept_and_set_aside(
    tmp_path: Path, figures: Figures, ledger: Ledger
) -> None:
    """Truncated, garbage, empty and foreign state files are reported by name, served by no
    one, never written over, and kept aside (bytes intact) when the account is re-imported."""
    provider, client_secret = new_provider(refresh_token_rotation="strict")
    try:
        names = (*BROKEN, "good")
        config = write_config(tmp_path, provider, client_secret, accounts=names, daemon_keys=FAST)
        state_dir, socket_path = tmp_path / "state", tmp_path / "run" / "socket"
        seed_accounts(tmp_path, provider, names)
        whole = (state_dir / "truncated.toml").read_bytes()
        cut = whole.index(b"dev-rt-") + 20
        contents = {
            name: data if data is not None else whole[:cut] for name, data in BROKEN.items()
        }
        for name, data in contents.items():
            (state_dir / f"{name}.toml").write_bytes(data)
        daemon = Daemon(config, socket_path, tmp_path / "daemon.log")
        daemon.wait_ready()
        assert eventually_true(lambda: daemon.status()["good"]["status"] == "ok")
        texts = []
        rows = daemon.status()
        for name in BROKEN:
            path = str(state_dir / f"{name}.toml")
            assert rows[name]["status"] == "state_error"
            assert path in str(rows[name]["last_error"])
            answer = ask(socket_path, {"v": 1, "op": "token", "account": name})
            assert answer["error"] == "state"
            assert path in str(answer["message"])
            forced = ask(socket_path, {"v": 1, "op": "refresh", "account": name})
            assert forced["ok"] is False
            run = helper("token", name, socket=socket_path)
            assert run.returncode == 1
            assert path in run.stderr
            assert run.stdout == ""
            texts += [("answers", f"{answer}{forced}"), ("helper stderr", run.stderr)]
            figures.add("disk", "broken state files reported by name")
        assert ask(socket_path, {"v": 1, "op": "token", "account": "good"})["ok"] is True
        logged = " ".join(str(e) for e in daemon.events("state.unreadable"))
        assert all(str(state_dir / f"{name}.toml") in logged for name in BROKEN)
        for name, data in contents.items():
            assert (state_dir / f"{name}.toml").read_bytes() == data  # never written over
        # A person re-imports one: the broken file is kept aside, whole, first.
        fresh = provider.issue_refresh_token("garbage-again@example.com")
        imported = helper("import", "garbage", socket=socket_path, stdin=fresh + "\n")
        assert imported.returncode == 0, imported.stderr
        aside = list(state_dir.glob("garbage.toml.corrupt-*"))
        assert [p.read_bytes() for p in aside] == [contents["garbage"]]
        assert not aside[0].stat().st_mode & 0o077
        assert daemon.status()["garbage"]["status"] == "ok"
        figures.add("disk", "broken state files kept aside on import", len(aside))
        assert daemon.stop() == 0
        for name, data in contents.items():
            if name != "garbage":
                assert (state_dir / f"{name}.toml").read_bytes() == data
        figures.held(
            "disk",
            "truncated, garbage, empty and foreign state files: reported by name in status, "
            "answers, helper errors and the log; never overwritten; kept aside whole on import",
        )
        texts.append(("daemon log", daemon.log()))
        ledger.scan(provider.issued_secrets(), texts)
    finally:
        provider.stop()
