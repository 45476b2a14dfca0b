"""
`mailoauth inspect` and the advice of `mailoauth test`: JWT access tokens from the development
provider, refusals from small real IMAP and SMTP servers on 127.0.0.1 that answer as
Microsoft's and Google's do.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import USER, DaemonProcess, config_text, helper

from mailoauthd.helper import tokeninfo
from mailoauthd.testing import DevProvider

Start = Callable[..., DaemonProcess]
TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
GOOD = {"aud": "https://outlook.office.com", "tid": TENANT}


def jwt(payload: dict[str, object]) -> str:
    def part(obj: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    return f"{part({'alg': 'none'})}.{part(payload)}.sig"


class TestClaims:
    def test_jwt_and_opaque(self) -> None:
        assert tokeninfo.claims(jwt({"aud": "x", "exp": 5})) == {"aud": "x", "exp": 5}
        assert tokeninfo.claims("EwBwA8l6BAAU...opaque") is None
        assert tokeninfo.claims("a.b.c") is None
        assert tokeninfo.claims("a.W10.c") is None  # '[]': not an object

    def test_describe(self) -> None:
        lines = dict(
            tokeninfo.describe(
                {
                    "aud": "https://outlook.office.com",
                    "scp": "IMAP.AccessAsUser.All SMTP.Send",
                    "upn": USER,
                    "tid": TENANT,
                    "exp": 1000,
                },
                now=400,
            )
        )
        assert lines["audience (aud)"] == "https://outlook.office.com"
        assert lines["scopes (scp)"] == "IMAP.AccessAsUser.All SMTP.Send"
        assert lines["user (upn)"] == USER
        assert lines["tenant (tid)"] == TENANT
        assert lines["expires (exp)"] == "1970-01-01T00:16:40Z, in 600 s"


class TestAdvice:
    @pytest.mark.parametrize(
        ("proto", "answer", "payload", "expected"),
        [
            (
                "SMTP",
                "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is "
                "disabled for the Tenant.",
                None,
                "-SmtpClientAuthenticationDisabled $false",
            ),
            (
                "SMTP",
                "534 5.7.9 Application-specific password required.",
                None,
                "https://mail.google.com/",
            ),
            (
                "IMAP",
                "NO AUTHENTICATE failed.",
                {"aud": "https://graph.microsoft.com", "scp": "Mail.Read"},
                "not for Exchange Online",
            ),
            (
                "SMTP",
                "535 5.7.3 Authentication unsuccessful",
                {**GOOD, "scp": "IMAP.AccessAsUser.All"},
                "it lacks SMTP.Send",
            ),
            (
                "IMAP",
                "NO AUTHENTICATE failed.",
                {**GOOD, "scp": "IMAP.AccessAsUser.All", "upn": "bob@contoso.com"},
                "the token is bob@contoso.com's but username is",
            ),
            (
                "IMAP",
                "NO AUTHENTICATE failed.",
                {**GOOD, "scp": "IMAP.AccessAsUser.All", "upn": USER},
                "-ImapEnabled $true",
            ),
        ],
    )
    def test_recognised(
        self, proto: str, answer: str, payload: dict[str, object] | None, expected: str
    ) -> None:
        token = jwt(payload) if payload else "opaque-token"
        advice = tokeninfo.advice(proto, answer, token, USER)
        assert advice is not None
        assert expected in advice

    def test_app_only_token_is_judged_by_its_roles(self) -> None:
        token = jwt({**GOOD, "roles": ["IMAP.AccessAsApp"], "upn": USER})
        assert "lacks" not in (tokeninfo.advice("IMAP", "NO failed", token, USER) or "")

    def test_unrecognised(self) -> None:
        assert tokeninfo.advice("IMAP", "NO [AUTHENTICATIONFAILED] x", "opaque", USER) is None


# --- against the daemon ---------------------------------------------------------------------


def daemon(tmp_path: Path, provider: DevProvider, start: Start, keys: str = "") -> DaemonProcess:
    config = tmp_path / "config.toml"
    config.write_text(config_text(tmp_path, provider, account_keys=keys))
    d = start(config)
    imported = helper(
        "import", "work", socket=d.socket, stdin=provider.issue_refresh_token(USER) + "\n"
    )
    assert imported.returncode == 0, imported.stderr
    return d


@pytest.mark.slow
class TestInspect:
    def test_jwt_claims_never_the_token(
        self, tmp_path: Path, provider: DevProvider, start_daemon: Start
    ) -> None:
        provider.set_options(access_token_claims=GOOD)
        d = daemon(tmp_path, provider, start_daemon)
        run = helper("inspect", "work", socket=d.socket)
        assert run.returncode == 0, run.stderr
        token = helper("token", "work", socket=d.socket).stdout.strip()
        assert token.count(".") == 2
        assert token not in run.stdout
        assert token.split(".")[1] not in run.stdout
        for shown in (
            "audience (aud)  https://outlook.office.com",
            f"tenant (tid)  {TENANT}",
            f"user (upn)  {USER}",
            "expires (exp)",
        ):
            assert " ".join(shown.split()) in " ".join(run.stdout.split()), run.stdout

    def test_opaque(self, tmp_path: Path, provider: DevProvider, start_daemon: Start) -> None:
        d = daemon(tmp_path, provider, start_daemon)
        run = helper("inspect", "work", socket=d.socket)
        assert run.returncode == 0
        assert "opaque token" in run.stdout


# --- mail servers that refuse as the big providers do ---------------------------------------


@pytest.fixture
def refusing_server() -> Iterator[Callable[[str], int]]:
    """start(kind) -> port: an IMAP or SMTP server on 127.0.0.1 that refuses every login."""
    servers: list[socket.socket] = []
    threads: list[threading.Thread] = []

    def serve_one(listener: socket.socket, kind: str) -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn, conn.makefile("rwb", buffering=0) as stream:
            send = stream.write
            if kind == "smtp":
                send(b"220 mail.example ESMTP\r\n")
                for line in stream:
                    words = line.decode().split()
                    if not words:
                        continue
                    if words[0].upper() == "EHLO":
                        send(b"250-mail.example\r\n250 AUTH XOAUTH2\r\n")
                    elif words[0].upper() == "AUTH":
                        if len(words) < 3:
                            send(b"334 \r\n")
                            stream.readline()
                        send(
                            b"535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication "
                            b"is disabled for the Tenant.\r\n"
                        )
                    elif words[0].upper() == "QUIT":
                        send(b"221 bye\r\n")
                        return
                    else:
                        send(b"250 ok\r\n")
            else:
                send(b"* OK IMAP ready\r\n")
                for line in stream:
                    tag, _, rest = line.decode().strip().partition(" ")
                    command = rest.split(" ")[0].upper()
                    if command == "CAPABILITY":
                        send(b"* CAPABILITY IMAP4rev1 AUTH=XOAUTH2\r\n")
                        send(f"{tag} OK done\r\n".encode())
                    elif command == "AUTHENTICATE":
                        send(b"+ \r\n")
                        stream.readline()
                        send(f"{tag} NO AUTHENTICATE failed.\r\n".encode())
                    elif command == "LOGOUT":
                        send(f"* BYE\r\n{tag} OK bye\r\n".encode())
                        return
                    else:
                        send(f"{tag} BAD what\r\n".encode())

    def start(kind: str) -> int:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        servers.append(listener)
        thread = threading.Thread(target=serve_one, args=(listener, kind), daemon=True)
        thread.start()
        threads.append(thread)
        return int(listener.getsockname()[1])

    yield start
    for listener in servers:
        listener.close()
    for thread in threads:
        thread.join(timeout=5)


@pytest.mark.slow
class TestRefusals:
    def test_smtp_auth_disabled(
        self,
        tmp_path: Path,
        provider: DevProvider,
        start_daemon: Start,
        refusing_server: Callable[[str], int],
    ) -> None:
        """Microsoft's 535 5.7.139: the advice is the Exchange setting, by name."""
        port = refusing_server("smtp")
        keys = f'smtp_server = "127.0.0.1:{port}"\nsmtp_security = "none"'
        d = daemon(tmp_path, provider, start_daemon, keys)
        run = helper("test", "work", "--timeout", "5", socket=d.socket)
        assert run.returncode == 1
        assert "535 5.7.139" in run.stdout
        assert (
            f"Set-CASMailbox -Identity {USER} -SmtpClientAuthenticationDisabled $false"
            in run.stderr
        )

    def test_imap_wrong_audience(
        self,
        tmp_path: Path,
        provider: DevProvider,
        start_daemon: Start,
        refusing_server: Callable[[str], int],
    ) -> None:
        """A token for Microsoft Graph refused by IMAP: the advice names the audience."""
        provider.set_options(access_token_claims={"aud": "https://graph.microsoft.com"})
        port = refusing_server("imap")
        keys = f'imap_server = "127.0.0.1:{port}"\nimap_security = "none"'
        d = daemon(tmp_path, provider, start_daemon, keys)
        run = helper("test", "work", "--timeout", "5", socket=d.socket)
        assert run.returncode == 1
        assert "rejected: AUTHENTICATE failed." in run.stdout
        assert "the token is for 'https://graph.microsoft.com', not for Exchange Online" in (
            run.stderr
        )
        assert "))" not in run.stderr
