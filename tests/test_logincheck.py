"""The pure parts of `mailoauth test`; the logins themselves run against Dovecot in tests/e2e."""

from __future__ import annotations

import base64
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import USER, DaemonProcess, config_text, helper

from mailoauthd.helper import logincheck, sasl
from mailoauthd.helper.logincheck import Server, parse_server
from mailoauthd.testing import DevProvider


class TestServers:
    @pytest.mark.parametrize(
        ("value", "security", "expected"),
        [
            (
                "outlook.office365.com:993",
                None,
                Server("IMAP", "outlook.office365.com", 993, "tls"),
            ),
            ("smtp.office365.com:587", None, Server("IMAP", "smtp.office365.com", 587, "starttls")),
            ("mail.example.com:465", None, Server("IMAP", "mail.example.com", 465, "tls")),
            ("[::1]:1143", "none", Server("IMAP", "::1", 1143, "none")),
            ("127.0.0.1:2525", "tls", Server("IMAP", "127.0.0.1", 2525, "tls")),
        ],
    )
    def test_security_follows_the_port_unless_given(
        self, value: str, security: str | None, expected: Server
    ) -> None:
        """Ports 993 and 465 mean implicit TLS, others STARTTLS, unless the config says."""
        assert parse_server("IMAP", value, security) == expected

    def test_unset(self) -> None:
        """No server configured is None, not an error."""
        assert parse_server("SMTP", None, None) is None

    def test_label(self) -> None:
        """An IPv6 address is bracketed in what is printed."""
        assert Server("SMTP", "::1", 587, "starttls").label == "SMTP [::1]:587 (STARTTLS)"


class TestInitialResponse:
    def test_matches_the_helpers_sasl_output(self) -> None:
        """`mailoauth test` sends what `mailoauth sasl` would print, for both mechanisms."""
        server = Server("SMTP", "smtp.example.com", 587, "starttls")
        for mechanism in ("xoauth2", "oauthbearer"):
            raw = logincheck.initial_response("a@b.c", "tok", mechanism, server)
            expected = sasl.sasl_response(
                "a@b.c", "tok", mechanism=mechanism, host="smtp.example.com", port="587"
            )
            assert base64.b64encode(raw.encode()).decode() == expected

    def test_oauthbearer_escapes_the_authzid(self) -> None:
        """RFC 5801: ',' and '=' in the user are escaped in the GS2 header."""
        server = Server("IMAP", "h", 993, "tls")
        raw = logincheck.initial_response("a=b,c", "t", "oauthbearer", server)
        assert raw.startswith("n,a=a=3Db=2Cc,\x01")


@pytest.mark.slow
class TestAgainstTheDaemon:
    def test_no_servers_configured_says_which_key_to_set(
        self, tmp_path: Path, provider: DevProvider, start_daemon: Callable[..., DaemonProcess]
    ) -> None:
        """An account whose provider has no preset servers is told to set imap_server."""
        config = tmp_path / "config.toml"
        config.write_text(config_text(tmp_path, provider))
        d = start_daemon(config)
        run = helper("test", "work", socket=d.socket)
        assert run.returncode == 1
        assert run.stdout == ""
        assert run.stderr == (
            "mailoauth: work: no imap_server or smtp_server is configured (set it in "
            "[accounts.work], e.g. imap_server = 'outlook.office365.com:993')\n"
        )

    def test_unreachable_server_is_a_clear_failure(
        self, tmp_path: Path, provider: DevProvider, start_daemon: Callable[..., DaemonProcess]
    ) -> None:
        """Nothing listening on the IMAP port: exit 1, the address and the OS's reason."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # closed again when the test connects
        keys = f'imap_server = "127.0.0.1:{port}"\nimap_security = "none"'
        config = tmp_path / "config.toml"
        config.write_text(config_text(tmp_path, provider, account_keys=keys))
        d = start_daemon(config)
        imported = helper(
            "import", "work", socket=d.socket, stdin=provider.issue_refresh_token(USER) + "\n"
        )
        assert imported.returncode == 0, imported.stderr
        run = helper("test", "work", "--timeout", "5", socket=d.socket)
        assert run.returncode == 1
        assert f"IMAP 127.0.0.1:{port} (NONE)" in run.stdout
        assert run.stderr == (
            f"mailoauth: work: IMAP 127.0.0.1:{port} (NONE): cannot connect: Connection refused\n"
        )
        token = helper("token", "work", socket=d.socket).stdout.strip()
        assert token not in run.stdout + run.stderr
