"""
The man pages and shell completions in share/: generated from the argument parsers and the
config key table (mailoauthd/manpages.py), current, rendered by man, loaded by bash, zsh
and fish, and completing account names from a running daemon.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import BIN, DaemonProcess, config_text

from mailoauthd import config, manpages
from mailoauthd.testing import DevProvider

SHARE = Path(__file__).resolve().parents[1] / "share"
PAGES = ["man/man1/mailoauth.1", "man/man8/mailoauthd.8", "man/man5/mailoauthd.toml.5"]


def test_committed_files_are_current() -> None:
    """share/ holds exactly what the generator writes from today's parsers and keys."""
    stale = [
        name
        for name, text in manpages.generated().items()
        if not (SHARE / name).is_file() or (SHARE / name).read_text() != text
    ]
    assert stale == [], f"out of date: {', '.join(stale)}; run 'make man' and commit share/"


def test_every_config_key_has_a_meaning() -> None:
    """mailoauthd.toml(5) describes every key the checker accepts (from README.md's tables)."""
    page = manpages.config_page()
    for table, (_, keys) in config.TABLES.items():
        for key in keys:
            assert f"\\fB{key.replace('-', chr(92) + '-')}\\fR" in page, (table, key)
    missing = [
        f"[{table}] {key}"
        for table, _, rows in manpages.config_keys()
        for key, text in rows
        if not text
    ]
    assert missing == []


def test_pages_say_what_help_says() -> None:
    """An option's help text in --help is the one in the page."""
    page = manpages.helper_page()
    assert "wait at most this long for the provider's answer" in page
    assert "print only the account names" in page


@pytest.mark.integration  # ,  # man, bash, zsh, fish
@pytest.mark.skipif(not shutil.which("man"), reason="needs man (man-db)")
@pytest.mark.parametrize("page", PAGES)
def test_man_renders(page: str) -> None:
    """`man -l` renders each page without a warning from groff."""
    done = subprocess.run(
        ["man", "--warnings", "-l", str(SHARE / page)],
        capture_output=True,
        text=True,
        env={**os.environ, "MANPAGER": "cat", "MANWIDTH": "80"},
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "NAME" in done.stdout


Start = Callable[..., DaemonProcess]


@pytest.fixture
def daemon_socket(tmp_path: Path, provider: DevProvider, start_daemon: Start) -> Path:
    config_path = tmp_path / "config.toml"
    config_path.write_text(config_text(tmp_path, provider, accounts=("work", "home")))
    return start_daemon(config_path).socket


def shell_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MAILOAUTHD_SOCKET"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    return env


@pytest.mark.integration  # ,
@pytest.mark.skipif(not shutil.which("bash"), reason="needs bash")
class TestBash:
    def complete(self, *words: str) -> list[str]:
        script = (
            f"source {SHARE / 'bash-completion/completions/mailoauth'}\n"
            f"COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}\n"
            '_mailoauth; printf "%s\\n" "${COMPREPLY[@]}"\n'
        )
        done = subprocess.run(
            ["bash", "--norc", "-c", script],
            capture_output=True,
            text=True,
            env=shell_env(),
            check=True,
            timeout=30,
        )
        return sorted(line for line in done.stdout.splitlines() if line)

    def test_commands_and_options(self) -> None:
        assert self.complete("mailoauth", "re") == ["recipe", "refresh", "reload", "revoke"]
        assert self.complete("mailoauth", "sasl", "--mech") == ["--mechanism"]
        assert self.complete("mailoauth", "sasl", "--mechanism", "o") == ["oauthbearer"]
        assert self.complete("mailoauth", "recipe", "ms") == ["msmtp"]

    @pytest.mark.slow
    def test_account_names_from_the_daemon(self, daemon_socket: Path) -> None:
        words = ("mailoauth", "--socket", str(daemon_socket), "token", "w")
        assert self.complete(*words) == ["work"]
        assert self.complete("mailoauth", "--socket", str(daemon_socket), "status", "") == [
            "home",
            "work",
        ]

    def test_daemon_completion_loads(self) -> None:
        script = (
            f"source {SHARE / 'bash-completion/completions/mailoauthd'}; complete -p mailoauthd"
        )
        done = subprocess.run(["bash", "--norc", "-c", script], capture_output=True, text=True)
        assert done.stdout.strip() == "complete -F _mailoauthd mailoauthd"


@pytest.mark.integration  # ,
@pytest.mark.skipif(not shutil.which("zsh"), reason="needs zsh")
@pytest.mark.parametrize("program", ["mailoauth", "mailoauthd"])
def test_zsh_loads(tmp_path: Path, program: str) -> None:
    """compinit finds both functions in the directory they are installed to."""
    script = (
        f"fpath=({SHARE / 'zsh/site-functions'} $fpath)\n"
        f"autoload -U compinit && compinit -u -d {tmp_path / 'zcompdump'}\n"
        f"print -r -- $_comps[{program}]\n"
        f"autoload -Uz +X _{program} && print loaded\n"
    )
    done = subprocess.run(
        ["zsh", "-f", "-c", script], capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [f"_{program}", "loaded"]


@pytest.mark.integration  # ,
@pytest.mark.skipif(not shutil.which("fish"), reason="needs fish")
class TestFish:
    def complete(self, line: str, tmp_path: Path, socket: Path | None = None) -> list[str]:
        script = (
            f"source {SHARE / 'fish/vendor_completions.d/mailoauth.fish'}\n"
            f"source {SHARE / 'fish/vendor_completions.d/mailoauthd.fish'}\n"
            f"complete -C '{line}'\n"
        )
        env = {**shell_env(), "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}
        if socket is not None:
            env["MAILOAUTHD_SOCKET"] = str(socket)
        done = subprocess.run(
            ["fish", "--no-config", "-c", script],
            capture_output=True,
            text=True,
            env=env,
            check=True,
            timeout=60,
        )
        return sorted(line.split("\t")[0] for line in done.stdout.splitlines())

    def test_commands(self, tmp_path: Path) -> None:
        assert self.complete("mailoauth re", tmp_path) == ["recipe", "refresh", "reload", "revoke"]
        assert "example-config" in self.complete("mailoauthd ", tmp_path)

    @pytest.mark.slow
    def test_account_names_from_the_daemon(self, tmp_path: Path, daemon_socket: Path) -> None:
        names = self.complete("mailoauth token ", tmp_path, daemon_socket)
        assert names == ["home", "work"]
        clients = self.complete("mailoauth recipe ", tmp_path, daemon_socket)
        assert "msmtp" in clients
        assert "work" not in clients
        assert self.complete("mailoauth recipe msmtp ", tmp_path, daemon_socket) == names
