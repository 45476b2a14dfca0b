"""
`mailoauth import ACCOUNT --from TOOL`: refresh tokens written by the other tools themselves
where they run here (mutt's mutt_oauth2.py through GnuPG, getmail's token script, and
email-oauth2-proxy's own encryption when it installs from the package index), against the
development provider; oama's record as its source documents it (oama is not packaged here).
The imported token must then work: the daemon refreshes with it.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import MAILOAUTH, USER, DaemonProcess, config_text

from mailoauthd.testing import DevProvider

Start = Callable[..., DaemonProcess]
MUTT_OAUTH2 = Path("/usr/share/doc/mutt/examples/mutt_oauth2.py")
GETMAIL_TOKENS = Path("/usr/bin/getmail-gmail-xoauth-tokens")


def mailoauth(
    *args: str, socket: Path, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(MAILOAUTH), "--socket", str(socket), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )


@pytest.fixture
def socket(tmp_path: Path, provider: DevProvider, start_daemon: Start) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(config_text(tmp_path, provider))
    return start_daemon(config).socket


def works(socket: Path) -> None:
    """The imported grant is usable: a refresh with it succeeds."""
    refreshed = mailoauth("refresh", "work", socket=socket)
    assert refreshed.returncode == 0, refreshed.stderr


@pytest.fixture(scope="module")
def gnupg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A GnuPG home with one key without passphrase; its agent stopped at the end.

    One for the module: making the key and starting the agent took seconds per test, and
    the tests only encrypt to and decrypt with it.
    """
    if not shutil.which("gpg"):
        pytest.skip("needs gpg (gnupg)")
    home = tmp_path_factory.mktemp("gnupg")
    home.chmod(0o700)
    env = {**os.environ, "GNUPGHOME": str(home)}
    subprocess.run(
        [
            "gpg",
            "--batch",
            "--passphrase",
            "",
            "--quick-gen-key",
            "Mutt <mutt@example.com>",
            "default",
            "default",
            "never",
        ],
        env=env,
        capture_output=True,
        check=True,
        timeout=120,
    )
    try:
        yield env
    finally:
        subprocess.run(["gpgconf", "--kill", "all"], env=env, capture_output=True, check=False)


@pytest.mark.slow
@pytest.mark.skipif(not MUTT_OAUTH2.exists(), reason="needs Debian's mutt (mutt_oauth2.py)")
def test_mutt_oauth2_real_script(
    tmp_path: Path, provider: DevProvider, socket: Path, gnupg: dict[str, str]
) -> None:
    """mutt_oauth2.py signs in (authcode flow) and encrypts its file; we decrypt and import."""
    endpoints = provider.endpoints
    registration = {
        "authorize_endpoint": f"{provider.url}/authorize",
        "devicecode_endpoint": f"{provider.url}/devicecode",
        "token_endpoint": endpoints["token_endpoint"],
        "redirect_uri": "http://127.0.0.1:9/",
        "imap_endpoint": "127.0.0.1",
        "pop_endpoint": "127.0.0.1",
        "smtp_endpoint": "127.0.0.1",
        "sasl_method": "XOAUTH2",
        "scope": "offline_access mail",
        "client_id": "demo-client",
        "client_secret": "demo-secret",
    }
    script = MUTT_OAUTH2.read_text()
    script = script.replace("'YOUR_GPG_IDENTITY'", "'mutt@example.com'")
    script = script.replace(
        "registrations = {", f"registrations = {{\n    'dev': {registration!r},", 1
    )
    (tmp_path / "mutt_oauth2.py").write_text(script)
    tokenfile = tmp_path / "mutt.token"
    proc = subprocess.Popen(
        [sys.executable, str(tmp_path / "mutt_oauth2.py"), "--authorize", str(tokenfile)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=gnupg,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    proc.stdin.write(f"dev\nauthcode\n{USER}\n")
    proc.stdin.flush()
    url = ""
    while not url:
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else "mutt_oauth2.py ended early"
        if found := re.search(r"(http://127\.0\.0\.1:\d+/authorize\?\S+)", line):
            url = found.group(1)

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        opener.open(url, timeout=10)  # noqa: S310 - the development provider on 127.0.0.1
        raise AssertionError("the provider did not redirect")
    except urllib.error.HTTPError as redirect:
        location = redirect.headers["Location"]
        redirect.close()
    code = urllib.parse.parse_qs(urllib.parse.urlsplit(location).query)["code"][0]
    out, err = proc.communicate(code + "\n", timeout=120)
    assert proc.returncode == 0, out + err
    assert tokenfile.read_bytes()[:1] != b"{"  # encrypted, not JSON

    done = mailoauth(
        "import", "work", "--from", "mutt_oauth2", str(tokenfile), socket=socket, env=gnupg
    )
    assert done.returncode == 0, done.stderr
    assert f"read a refresh token from mutt_oauth2 {tokenfile}" in done.stderr
    assert "names the registration 'dev'" in done.stderr
    assert "stored" in done.stderr
    works(socket)


@pytest.mark.slow
def test_mutt_oauth2_wrong_decryption(tmp_path: Path, socket: Path) -> None:
    """A file the command cannot decrypt: the command and its reason, never the content."""
    tokenfile = tmp_path / "mutt.token"
    tokenfile.write_bytes(b"not encrypted at all")
    done = mailoauth("import", "work", "--from", "mutt_oauth2", str(tokenfile), socket=socket)
    assert done.returncode == 1
    assert "could not decrypt" in done.stderr


@pytest.mark.slow
@pytest.mark.skipif(not GETMAIL_TOKENS.exists(), reason="needs Debian's getmail6")
def test_getmail_real_script(tmp_path: Path, provider: DevProvider, socket: Path) -> None:
    """getmail-gmail-xoauth-tokens refreshes its file against the provider; we import it."""
    tokenfile = tmp_path / "getmail.json"
    tokenfile.write_text(
        json.dumps(
            {
                "scope": "https://mail.google.com/",
                "user": USER,
                "client_id": "demo-client",
                "client_secret": "demo-secret",
                "token_uri": provider.endpoints["token_endpoint"],
                "auth_uri": f"{provider.url}/authorize",
                "refresh_token": provider.issue_refresh_token(USER),
                "access_token": "",
                "expires_at": 0,
            }
        )
    )
    run = subprocess.run(
        [str(GETMAIL_TOKENS), str(tokenfile)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    done = mailoauth("import", "work", "--from", "getmail", str(tokenfile), socket=socket)
    assert done.returncode == 0, done.stderr
    assert "client demo-client" in done.stderr
    works(socket)


@pytest.mark.slow
def test_another_clients_token_is_refused(
    tmp_path: Path, provider: DevProvider, socket: Path
) -> None:
    """A token issued to another client is not imported: it could never be refreshed."""
    tokenfile = tmp_path / "getmail.json"
    tokenfile.write_text(json.dumps({"client_id": "other-client", "refresh_token": "rt-1"}))
    done = mailoauth("import", "work", "--from", "getmail", str(tokenfile), socket=socket)
    assert done.returncode == 2, done.stderr
    assert "issued to client 'other-client', but [providers.dev] has client_id 'demo-client'" in (
        done.stderr
    )
    status = json.loads(mailoauth("status", "--json", socket=socket).stdout)
    assert status["accounts"][0]["status"] == "needs_authorization"


@pytest.mark.slow
def test_oama_gpg_record(
    tmp_path: Path, provider: DevProvider, socket: Path, gnupg: dict[str, str]
) -> None:
    """oama's GPG-encrypted AuthRecord (lib/OAMa/Environment.hs) and its config.yaml."""
    home = tmp_path / "home"
    (home / ".local/var/oama").mkdir(parents=True)
    (home / ".config/oama").mkdir(parents=True)
    (home / ".config/oama/config.yaml").write_text(
        "encryption:\n  tag: GPG\n  contents: mutt@example.com\n\nservices:\n"
        "  google:\n    client_id: other-client\n    client_secret: x\n"
        "  dev:\n    client_id: demo-client  # ours\n    client_secret: demo-secret\n"
    )
    record = {
        "email": USER,
        "service": "dev",
        "scope": "mail",
        "refresh_token": provider.issue_refresh_token(USER),
        "access_token": "at",
        "token_type": "Bearer",
        "exp_date": "2026-11-01 12:00:00 UTC",
        "expires_in": 3599,
    }
    subprocess.run(
        [
            "gpg",
            "--batch",
            "--yes",
            "--trust-model",
            "always",
            "--encrypt",
            "--recipient",
            "mutt@example.com",
            "--output",
            str(home / f".local/var/oama/{USER}.oauth"),
        ],
        input=json.dumps(record).encode(),
        env=gnupg,
        check=True,
        capture_output=True,
    )
    env = {**gnupg, "HOME": str(home)}
    env.pop("XDG_CONFIG_HOME", None)
    done = mailoauth("import", "work", "--from", "oama", socket=socket, env=env)
    assert done.returncode == 0, done.stderr
    assert "client demo-client" in done.stderr
    works(socket)


def _emailproxy_python() -> Path | None:
    """A Python that has email-oauth2-proxy (`emailproxy`, in the test extras), if ours has it.

    It used to be installed from the package index into a venv of its own on every run:
    20 s or more, and not offline.
    """
    return Path(sys.executable) if importlib.util.find_spec("emailproxy") is not None else None


@pytest.mark.slow
def test_email_oauth2_proxy_sealed_by_the_proxy(
    tmp_path: Path, provider: DevProvider, socket: Path
) -> None:
    """
    The proxy's own Cryptographer seals the token with the account's password (at its own
    1,200,000 PBKDF2 rounds, so this test takes seconds); without it, the scheme its source
    documents.
    """
    pytest.importorskip("cryptography")
    token = provider.issue_refresh_token(USER)
    config = tmp_path / "emailproxy.config"
    python = _emailproxy_python()
    if python is not None:
        seal = (
            "import configparser, sys, emailproxy\n"
            "config = configparser.ConfigParser()\n"
            "config.read_string('[%s]\\nclient_id = demo-client\\n' % sys.argv[1])\n"
            "c = emailproxy.Cryptographer(config, sys.argv[1], sys.argv[2])\n"
            "config.set(sys.argv[1], 'token_salt', c.salt)\n"
            "config.set(sys.argv[1], 'token_iterations', str(c.iterations))\n"
            "config.set(sys.argv[1], 'refresh_token', c.encrypt(sys.argv[3]))\n"
            "config.write(open(sys.argv[4], 'w'))\n"
        )
        subprocess.run(
            [str(python), "-c", seal, USER, "hunter2", token, str(config)],
            check=True,
            timeout=300,
            capture_output=True,
        )
    else:
        from cryptography.fernet import Fernet
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

        salt = os.urandom(16)
        kdf = PBKDF2HMAC(algorithm=hashes.SHA256(), length=32, salt=salt, iterations=1000)
        key = base64.urlsafe_b64encode(kdf.derive(b"hunter2"))
        sealed = Fernet(key).encrypt(token.encode()).decode()
        config.write_text(
            f"[{USER}]\nclient_id = demo-client\ntoken_salt = {base64.b64encode(salt).decode()}\n"
            f"token_iterations = 1000\nrefresh_token = {sealed}\n"
        )
    wrong = mailoauth(
        "import",
        "work",
        "--from",
        "email-oauth2-proxy",
        str(config),
        socket=socket,
        stdin="wrong\n",
    )
    assert wrong.returncode == 1
    assert f"wrong password for {USER}" in wrong.stderr
    done = mailoauth(
        "import",
        "work",
        "--from",
        "email-oauth2-proxy",
        str(config),
        socket=socket,
        stdin="hunter2\n",
    )
    assert done.returncode == 0, done.stderr
    assert "client demo-client" in done.stderr
    assert "hunter2" not in done.stderr + done.stdout
    works(socket)
