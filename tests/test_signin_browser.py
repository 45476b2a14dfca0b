"""
Where the sign-in address goes and what the browser sees at the end (issue 17): the real
`mailoauth authorize` with $BROWSER or --browser-command and no display, and the result
pages of the daemon's loopback listener (text, Content-Security-Policy, the style's hash).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from conftest import MAILOAUTH, USER, DaemonProcess, config_text, in_process_daemon, make_config
from test_authorize import Conversation, browse, finish, query, read_until, sign_in_keys

from mailoauthd.authorization import signin_page
from mailoauthd.testing import DevProvider

Start = Callable[..., DaemonProcess]


@pytest.fixture
def setup(tmp_path: Path, provider: DevProvider) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(config_text(tmp_path, provider, provider_keys=sign_in_keys(provider)))
    return path


def opener(tmp: Path, name: str, *, status: int = 0, said: str = "") -> tuple[Path, Path]:
    """A BROWSER command that records each argument it got in a file; and that file."""
    record = tmp / f"{name}.got"
    script = tmp / name
    script.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        f"open({str(record)!r}, 'a').write('\\n'.join(sys.argv[1:]) + '\\n')\n"
        f"sys.stderr.write({said!r})\n"
        f"sys.exit({status})\n"
    )
    script.chmod(0o755)
    return script, record


def authorize(socket: Path, *args: str, **env: str) -> subprocess.Popen[str]:
    """`mailoauth authorize work` with no display: only the variables given."""
    environ = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    environ.pop("BROWSER", None)
    environ.update(env)
    return subprocess.Popen(
        [str(MAILOAUTH), "--socket", str(socket), "authorize", "work", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environ,
    )


@pytest.mark.slow
class TestOpeningTheAddress:
    def test_browser_without_a_display(
        self, setup: Path, tmp_path: Path, start_daemon: Start
    ) -> None:
        """With only $BROWSER set, that command gets the address, and the helper says so."""
        d = start_daemon(setup)
        command, record = opener(tmp_path, "open-url")
        proc = authorize(d.socket, BROWSER=str(command))
        seen: list[str] = []
        url = read_until(proc, "/authorize?", seen).strip()
        read_until(proc, "Waiting up to", seen)
        assert f"(Opened it with {command}.)" in "".join(seen)
        assert record.read_text() == url + "\n"
        assert httpx.get(url, follow_redirects=True).status_code == 200
        status, out, err = finish(proc, seen)
        assert status == 0, err
        assert f"(Opened it with {command}.)" in out
        assert "work: signed in" in out

    def test_failing_browser_falls_back_to_the_printed_address(
        self, setup: Path, tmp_path: Path, start_daemon: Start
    ) -> None:
        """A $BROWSER that fails is named with why; the address is printed to open by hand."""
        d = start_daemon(setup)
        broken, record = opener(tmp_path, "broken-opener", status=3, said="no way to open it\n")
        proc = authorize(d.socket, BROWSER=f"{broken}{os.pathsep}/nonexistent/opener")
        seen: list[str] = []
        url = read_until(proc, "/authorize?", seen).strip()
        read_until(proc, "Waiting up to", seen)
        line = "".join(seen)
        assert "Could not open a browser" in line
        assert f"'{broken}' failed (exit status 3: no way to open it)" in line
        assert "'/nonexistent/opener' failed (No such file or directory)" in line
        assert "open the address yourself" in line
        assert record.read_text() == url + "\n"  # it was tried, with the address
        assert httpx.get(url, follow_redirects=True).status_code == 200
        status, out, err = finish(proc, seen)
        assert status == 0, err
        assert "Opened it with" not in out

    def test_browser_command_option(self, setup: Path, tmp_path: Path, start_daemon: Start) -> None:
        """--browser-command wins over $BROWSER, and takes %s as the address's place."""
        d = start_daemon(setup)
        chosen, record = opener(tmp_path, "chosen")
        ignored, ignored_record = opener(tmp_path, "ignored")
        proc = authorize(
            d.socket, "--browser-command", f"{chosen} --new-window %s", BROWSER=str(ignored)
        )
        seen: list[str] = []
        url = read_until(proc, "/authorize?", seen).strip()
        read_until(proc, "Waiting up to", seen)
        assert "Opened it with" in "".join(seen)
        assert record.read_text() == f"--new-window\n{url}\n"
        assert not ignored_record.exists()
        assert httpx.get(url, follow_redirects=True).status_code == 200
        assert finish(proc, seen)[0] == 0

    def test_no_browser_opens_nothing(
        self, setup: Path, tmp_path: Path, start_daemon: Start
    ) -> None:
        """--no-browser prints the address and runs no $BROWSER."""
        d = start_daemon(setup)
        command, record = opener(tmp_path, "open-url")
        proc = authorize(d.socket, "--no-browser", BROWSER=str(command))
        seen: list[str] = []
        url = read_until(proc, "/authorize?", seen).strip()
        assert httpx.get(url, follow_redirects=True).status_code == 200
        status, out, _ = finish(proc, seen)
        assert status == 0
        assert not record.exists()
        assert "Opened it" not in out
        assert "Could not open" not in out


# --- the pages ----------------------------------------------------------------------------


def policy(response: httpx.Response) -> dict[str, list[str]]:
    """The Content-Security-Policy header as directive -> sources."""
    directives = {}
    for part in response.headers["Content-Security-Policy"].split(";"):
        name, *sources = part.split()
        directives[name] = sources
    return directives


def check_page(page: httpx.Response) -> str:
    """The page's rules that hold whatever it says; returns its visible text."""
    csp = policy(page)
    assert csp["default-src"] == ["'none'"]  # no script, image, font, frame, connection
    assert "script-src" not in csp
    assert "'unsafe-inline'" not in page.headers["Content-Security-Policy"]
    for closed in ("base-uri", "form-action", "frame-ancestors"):
        assert csp[closed] == ["'none'"]
    # The one inline style is allowed by its hash, and that hash is the style's.
    styles = re.findall(r"<style>(.*?)</style>", page.text, re.S)
    assert len(styles) == 1
    digest = base64.b64encode(hashlib.sha256(styles[0].encode()).digest()).decode()
    assert csp["style-src"] == [f"'sha256-{digest}'"]
    assert "system-ui" in styles[0]
    assert "<script" not in page.text.lower()
    assert " style=" not in page.text  # an inline style attribute would be blocked
    # Nothing is loaded from anywhere: no URL at all in the page.
    assert not re.search(r"(src|href)\s*=|url\(|@import|https?://", page.text)
    assert page.headers["Referrer-Policy"] == "no-referrer"
    assert page.headers["Cache-Control"] == "no-store"
    text = re.sub(r"<style>.*?</style>|</?(b|code)>", "", page.text, flags=re.S)
    return " ".join(re.sub(r"<[^>]+>", " ", text).split())


class TestPages:
    async def test_signed_in(self, provider: DevProvider, tmp_path: Path) -> None:
        """The success page names the account and mailbox, the expiry and the next step."""
        cfg = make_config(tmp_path, provider, provider_keys=sign_in_keys(provider))
        async with in_process_daemon(cfg) as d:
            conv = await Conversation.start(d)
            first = await conv.next()
            url = str(first["url"])
            location = (await browse(url, follow=False)).headers["Location"]
            page = await browse(location)
            _, final = await conv.final()
        assert page.status_code == 200
        text = check_page(page)
        assert "Signed in" in text
        assert f"mailoauthd now holds the tokens for work, signed in as {USER}." in text
        expires = str(final["expires_at"]).replace("T", " ")[:16]
        assert f"valid until {expires} UTC" in text
        assert "You can close this window and return to your terminal." in text
        secrets = {query(url)["state"], query(location)["code"], *provider.issued_secrets()}
        assert [s for s in secrets if s in page.text] == []

    async def test_refused(self, provider: DevProvider, tmp_path: Path) -> None:
        """The refusal page states the provider's error once, and the command to retry."""
        cfg = make_config(tmp_path, provider, provider_keys=sign_in_keys(provider))
        async with in_process_daemon(cfg) as d:
            conv = await Conversation.start(d)
            first = await conv.next()
            provider.deny_next_authorization("access_denied")
            page = await browse(str(first["url"]))
            _, final = await conv.final()
        assert page.status_code == 403
        assert final["ok"] is False
        text = check_page(page)
        assert "Sign-in refused" in text
        assert text.count("access_denied") == 1
        assert text.count("mailoauth authorize work") == 1
        assert "To try again, run mailoauth authorize work in your terminal." in text
        assert query(str(first["url"]))["state"] not in page.text

    async def test_other_pages(self, provider: DevProvider, tmp_path: Path) -> None:
        """A stray request gets the same well-formed page: styled, no script, no loads."""
        cfg = make_config(tmp_path, provider, provider_keys=sign_in_keys(provider))
        async with in_process_daemon(cfg) as d:
            conv = await Conversation.start(d)
            first = await conv.next()
            redirect = str(first["redirect_uri"])
            missing = await browse(redirect + "favicon.ico")
            foreign = await browse(redirect + "?code=x&state=forged")
            await conv.close()
        assert missing.status_code == 404
        check_page(missing)
        assert foreign.status_code == 400
        assert "not the answer to this sign-in" in check_page(foreign)


def test_escaping() -> None:
    """Provider text and names reach the page as text, never as markup."""
    page = signin_page.failed(
        403, "Sign-in refused", "w<b>", "w<b>: the provider said <script>x</script>", "a & b"
    )
    body = signin_page.render(page).decode()
    assert "<script>" not in body
    assert "&lt;script&gt;x&lt;/script&gt;" in body
    assert "mailoauth authorize w&lt;b&gt;" in body
