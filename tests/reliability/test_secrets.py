"""
Secrets and the file system: sign-ins (authorization code with PKCE through the loopback
redirect, and device code) leave no code, verifier or token in any log, output or process
title; files are never readable by group or others; and no symlink planted in the state
or runtime directory is followed.

The other modules scan their own logs, answers, status output and process titles with
the same ledger; docs/reliability.md adds up what was scanned.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from conftest import MAILOAUTH, USER, helper

from mailoauthd.testing import DevProvider

from .support import (
    Daemon,
    Figures,
    Ledger,
    ask,
    cmdline,
    new_provider,
    private_files,
    seed_accounts,
    stored,
    write_config,
)

FAST = 'refresh_spread = "0s"'


def sign_in_keys(provider: DevProvider) -> str:
    endpoints = provider.endpoints
    return (
        f'authorization_endpoint = "{endpoints["authorization_endpoint"]}"\n'
        f'device_authorization_endpoint = "{endpoints["device_authorization_endpoint"]}"\n'
    )


class Helper:
    """A running `mailoauth authorize`: its output read line by line, its title sampled."""

    def __init__(self, socket: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [str(MAILOAUTH), "--socket", str(socket), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []

    def until(self, marker: str) -> str:
        assert self.proc.stdout is not None
        while line := self.proc.stdout.readline():
            self.lines.append(line)
            if marker in line:
                return line
        raise AssertionError(f"no {marker!r} in {''.join(self.lines)!r}")

    def finish(self) -> tuple[int, str, str]:
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        self.proc.wait(timeout=60)
        out, err = self.proc.stdout.read(), self.proc.stderr.read()
        self.proc.stdout.close()
        self.proc.stderr.close()
        return self.proc.returncode, "".join(self.lines) + out, err


def test_sign_ins_leak_no_secret(tmp_path: Path, figures: Figures, ledger: Ledger) -> None:
    """Both sign-in flows, then token, status, refresh and revoke: no code, PKCE verifier,
    device code, token or client secret in the log, any output, or any process title."""
    provider, client_secret = new_provider(refresh_token_rotation="strict")
    provider.set_options(device_interval=1)
    try:
        config = write_config(
            tmp_path,
            provider,
            client_secret,
            accounts=("work", "home"),
            daemon_keys=FAST,
            provider_keys=sign_in_keys(provider),
            account_keys='scopes = ["openid", "mail"]',
        )
        socket_path = tmp_path / "run" / "socket"
        daemon = Daemon(config, socket_path, tmp_path / "daemon.log")
        daemon.wait_ready()
        texts: list[tuple[str, str]] = []
        titles = 0

        def sample(*pids: int) -> None:
            nonlocal titles
            for pid in pids:
                texts.append((f"cmdline of {pid}", cmdline(pid)))
                titles += 1

        # Authorization code with PKCE, through the daemon's loopback redirect listener.
        browser = Helper(socket_path, "authorize", "work", "--no-browser")
        url = browser.until("/authorize?").strip()
        sample(daemon.pid, browser.proc.pid)
        assert "code_challenge=" in url
        assert "code_challenge_method=S256" in url
        assert httpx.get(url, follow_redirects=True).status_code == 200
        status, out, err = browser.finish()
        assert status == 0, err
        texts += [("authorize stdout", out), ("authorize stderr", err)]
        # Device code.
        device = Helper(socket_path, "authorize", "home", "--flow", "device_code")
        line = device.until("enter the code")
        sample(daemon.pid, device.proc.pid)
        # As the account's mailbox: with openid, the ID token's is checked against it.
        provider.approve_device(line.split()[-1], USER)
        status, out, err = device.finish()
        assert status == 0, err
        texts += [("device stdout", out), ("device stderr", err)]
        for args in (
            ("status",),
            ("status", "--json"),
            ("refresh", "work"),
            ("sasl", "work"),
            ("token", "nobody"),
            ("revoke", "home"),
            ("token", "home"),
        ):
            run = helper(*args, socket=socket_path)
            # sasl prints the token (base64 in XOAUTH2) by design, like `token`.
            if args[0] != "sasl":
                texts.append((f"mailoauth {' '.join(args)} stdout", run.stdout))
            texts.append((f"mailoauth {' '.join(args)} stderr", run.stderr))
        assert ask(socket_path, {"v": 1, "op": "token", "account": "work"})["ok"] is True
        assert daemon.stop() == 0
        log = daemon.log()
        assert "authorize.code_received" in log or "code_received" in log, "flows not logged"
        assert not private_files(tmp_path / "state")
        texts.append(("daemon log", log))
        ledger.scan(provider.issued_secrets(), texts)
        figures.add("secrets", "sign-ins (authorization code + PKCE, device code)", 2)
        figures.add("secrets", "process titles read", titles)
        figures.held(
            "secrets",
            "no access token, refresh token, client secret, authorization code, PKCE verifier or "
            "device code in any log line, error, status output, helper output or process title",
        )
    finally:
        provider.stop()


@pytest.fixture
def seeded(tmp_path: Path) -> tuple[DevProvider, Path]:
    """A provider and a config with one account, its grant on disk."""
    provider, client_secret = new_provider(refresh_token_rotation="rotate")
    config = write_config(tmp_path, provider, client_secret, daemon_keys=FAST)
    seed_accounts(tmp_path, provider, ["work"])
    yield provider, config  # type: ignore[misc]
    provider.stop()


def bait(tmp_path: Path) -> tuple[Path, bytes]:
    """A file outside the daemon's directories that a followed symlink would change."""
    target = tmp_path / "elsewhere" / "precious"
    target.parent.mkdir()
    content = b"must not change\n"
    target.write_bytes(content)
    target.chmod(0o644)
    return target, content


class TestSymlinks:
    def test_state_file(
        self, tmp_path: Path, seeded: tuple[DevProvider, Path], figures: Figures
    ) -> None:
        """A state file that is a symlink is reported, never read or written through, and
        is set aside (the link itself) on import."""
        provider, config = seeded
        target, content = bait(tmp_path)
        path = tmp_path / "state" / "work.toml"
        target.write_bytes(path.read_bytes())  # even a valid state behind it is not read
        content = target.read_bytes()
        path.unlink()
        path.symlink_to(target)
        daemon = Daemon(config, tmp_path / "run" / "socket", tmp_path / "daemon.log")
        daemon.wait_ready()
        row = daemon.status()["work"]
        assert row["status"] == "state_error"
        assert str(path) in str(row["last_error"])
        assert ask(daemon.socket, {"v": 1, "op": "refresh", "account": "work"})["ok"] is False
        fresh = provider.issue_refresh_token("again@example.com")
        assert helper("import", "work", socket=daemon.socket, stdin=fresh + "\n").returncode == 0
        assert daemon.stop() == 0
        assert target.read_bytes() == content
        assert target.stat().st_mode & 0o777 == 0o644
        assert not path.is_symlink()
        assert stored(tmp_path / "state", "work").status == "ok"
        aside = list(path.parent.glob("work.toml.corrupt-*"))
        assert len(aside) == 1
        assert aside[0].is_symlink()
        figures.add("secrets", "planted symlinks, none followed")

    def test_temp_file(
        self, tmp_path: Path, seeded: tuple[DevProvider, Path], figures: Figures
    ) -> None:
        """A symlink planted where the daemon writes its temp file is removed, not written
        through: the target is untouched and the state file is a regular file again."""
        provider, config = seeded
        target, content = bait(tmp_path)
        daemon = Daemon(config, tmp_path / "run" / "socket", tmp_path / "daemon.log")
        daemon.wait_ready()
        deadline = time.monotonic() + 10
        while daemon.status()["work"]["last_refresh"] is None:  # the start-up refresh is done
            assert time.monotonic() < deadline
            time.sleep(0.01)
        temp = tmp_path / "state" / f".work.toml.{daemon.pid}.tmp"
        temp.symlink_to(target)
        assert ask(daemon.socket, {"v": 1, "op": "refresh", "account": "work"})["ok"] is True
        assert len(provider.rotations) == 2
        assert not temp.is_symlink()
        state_file = tmp_path / "state" / "work.toml"
        assert not state_file.is_symlink()
        refresh_token = stored(tmp_path / "state", "work").refresh_token
        assert refresh_token is not None
        assert refresh_token.reveal() == provider.rotations[-1].issued
        assert daemon.stop() == 0
        assert target.read_bytes() == content
        figures.add("secrets", "planted symlinks, none followed")

    @pytest.mark.parametrize(
        "where", ["lock file", "state directory", "socket", "socket directory"]
    )
    def test_refuses_to_start(
        self, where: str, tmp_path: Path, seeded: tuple[DevProvider, Path], figures: Figures
    ) -> None:
        """A symlink as the lock file, the state directory, the socket or its directory: the
        daemon says which and exits 1, and the target is untouched."""
        _, config = seeded
        target, content = bait(tmp_path)
        state_dir, run_dir = tmp_path / "state", tmp_path / "run"
        if where == "lock file":
            (state_dir / ".lock").unlink(missing_ok=True)
            (state_dir / ".lock").symlink_to(target)
            named = state_dir / ".lock"
        elif where == "state directory":
            state_dir.rename(tmp_path / "real-state")
            state_dir.symlink_to(tmp_path / "real-state")
            named = state_dir
        elif where == "socket":
            run_dir.mkdir(mode=0o700)
            (run_dir / "socket").symlink_to(target)
            named = run_dir / "socket"
        else:
            (tmp_path / "real-run").mkdir(mode=0o700)
            run_dir.symlink_to(tmp_path / "real-run")
            named = run_dir
        daemon = Daemon(config, run_dir / "socket", tmp_path / "daemon.log")
        assert daemon.proc.wait(timeout=20) == 1
        daemon.stop()
        assert str(named) in daemon.log()
        assert target.read_bytes() == content
        assert target.stat().st_mode & 0o777 == 0o644
        assert not (tmp_path / "real-run" / "socket").exists()
        figures.add("secrets", "planted symlinks, none followed")

    def test_token_file(
        self, tmp_path: Path, seeded: tuple[DevProvider, Path], figures: Figures
    ) -> None:
        """A symlink planted as the token file, or as its temp file, is replaced, not followed;
        the token file is created 0600."""
        _, config = seeded
        target, content = bait(tmp_path)
        token_dir = tmp_path / "tokens"
        token_dir.mkdir(mode=0o700)
        token_file = token_dir / "work.token"
        token_file.symlink_to(target)
        text = config.read_text().replace(
            "[accounts.work]\n", f'[accounts.work]\ntoken_file = "{token_file}"\n'
        )
        config.write_text(text)
        daemon = Daemon(config, tmp_path / "run" / "socket", tmp_path / "daemon.log")
        daemon.wait_ready()
        deadline = time.monotonic() + 10
        while token_file.is_symlink():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert target.read_bytes() == content
        os.symlink(target, token_dir / f".work.token.{daemon.pid}.tmp")
        assert ask(daemon.socket, {"v": 1, "op": "refresh", "account": "work"})["ok"] is True
        token = ask(daemon.socket, {"v": 1, "op": "token", "account": "work"})["token"]
        deadline = time.monotonic() + 10
        while token_file.read_text().strip() != token:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert daemon.stop() == 0
        assert target.read_bytes() == content
        assert token_file.stat().st_mode & 0o777 == 0o600
        figures.add("secrets", "planted symlinks, none followed", 2)
