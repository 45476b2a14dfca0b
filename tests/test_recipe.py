"""`mailoauth recipe CLIENT ACCOUNT`: the e2e suite's recipes, filled in from a running daemon."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import DaemonProcess, config_text, helper
from e2e.recipes import DOCS, recipe

from mailoauthd.helper import recipes
from mailoauthd.testing import DevProvider

ROOT = Path(__file__).resolve().parents[1]
Start = Callable[..., DaemonProcess]
SERVERS = 'imap_server = "imap.example.net:143"\nsmtp_server = "smtp.example.net:465"\n'


@pytest.fixture
def socket(tmp_path: Path, provider: DevProvider, start_daemon: Start) -> Path:
    """A daemon with `home` (servers set; user alice@example.com) and `bare` (no servers)."""
    config_path = tmp_path / "config.toml"
    text = config_text(tmp_path, provider, accounts=("home",), account_keys=SERVERS)
    text += '\n[accounts.bare]\nprovider = "dev"\nusername = "bob@example.org"\n'
    config_path.write_text(text)
    return start_daemon(config_path).socket


def test_same_source_as_the_e2e_suite() -> None:
    """The recipes are read from the pages tests/e2e runs; every client there has one."""
    assert recipes._directory() == DOCS
    found = recipes.pages()
    for client in ("msmtp", "mbsync", "neomutt", "offlineimap", "getmail", "curl", "fetchmail"):
        assert client in found
    assert recipes.blocks(found["msmtp"]) == [("msmtprc", recipe("msmtp", "msmtprc"))]


def test_every_client_page_is_installed() -> None:
    """A wheel carries every page `recipe` may read (pyproject.toml's data-files)."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    shipped = set(data["data-files"]["share/mailoauthd/clients"])
    pages = {f"docs/clients/{page.name}" for page in DOCS.glob("*.md")}
    assert pages - shipped == set(), "add these to share/mailoauthd/clients in pyproject.toml"


@pytest.mark.slow
def test_msmtp_filled_in(socket: Path) -> None:
    """User, servers and the account's command replace the documentation's example."""
    done = helper("recipe", "msmtp", "home", socket=socket)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    for line in (
        "host smtp.example.net",
        "port 465",
        "user alice@example.com",
        "from alice@example.com",
        'passwordeval "mailoauth token home"',
        "account home",
    ):
        assert line in lines, done.stdout
    assert "contoso" not in done.stdout
    assert "office365" not in done.stdout
    assert not re.search(r"\bwork\b", done.stdout)


@pytest.mark.slow
def test_every_client(socket: Path) -> None:
    """Each client's recipes come out, the example's values all replaced."""
    for client, page in recipes.pages().items():
        done = helper("recipe", client, "home", socket=socket)
        assert done.returncode == 0, (client, done.stderr)
        assert "contoso" not in done.stdout, client
        for name, _ in recipes.blocks(page):
            if len(recipes.blocks(page)) > 1:
                assert f"# --- {name} ---" in done.stdout
    neomutt = helper("recipe", "neomutt", "home", socket=socket).stdout
    assert 'set folder = "imaps://imap.example.net:143/"' in neomutt
    assert "smtp://alice%40example.com@smtp.example.net:465/" in neomutt
    mbsync = helper("recipe", "mbsync", "home", socket=socket).stdout
    assert "Host imap.example.net\nPort 143\n" in mbsync


@pytest.mark.slow
def test_without_servers_says_so(socket: Path) -> None:
    done = helper("recipe", "getmail", "bare", socket=socket)
    assert done.returncode == 0
    assert "username = bob@example.org" in done.stdout
    assert "bare has no imap_server or smtp_server" in done.stderr


@pytest.mark.slow
def test_unknown_client_and_account(socket: Path) -> None:
    unknown = helper("recipe", "pine", "home", socket=socket)
    assert unknown.returncode == 2
    assert "no recipe for 'pine'; there are recipes for: curl, " in unknown.stderr
    nobody = helper("recipe", "msmtp", "nobody", socket=socket)
    assert nobody.returncode == 1
    assert "nobody: no such account" in nobody.stderr
