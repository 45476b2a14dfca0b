"""
`mailoauthd check-config --online` (issue 15): the real program against development
providers served over TLS with a test certificate, one trusted (through SSL_CERT_FILE)
and one not, each profile's block read from its output.
"""

from __future__ import annotations

import os
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MAILOAUTHD

from mailoauthd.testing import DevProvider

CLIENTS = {"demo-client": "demo-secret", "old-client": "old-secret", "public-client": None}


def certificate(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
        + ["-nodes", "-days", "2", "-subj", "/CN=localhost", "-keyout", str(key)]
        + ["-out", str(cert), "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def tls_provider(cert: Path, key: Path) -> DevProvider:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return DevProvider(clients=CLIENTS, ssl_context=context)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    directory = tmp_path_factory.mktemp("tls")
    return {name: certificate(directory, name) for name in ("trusted", "untrusted")}


@pytest.fixture
def tls(certs: dict[str, tuple[Path, Path]]) -> Iterator[DevProvider]:
    """The development provider over https, with the certificate the tests trust."""
    with tls_provider(*certs["trusted"]) as provider:
        yield provider


@pytest.fixture
def untrusted(certs: dict[str, tuple[Path, Path]]) -> Iterator[DevProvider]:
    """Another one, whose self-signed certificate nobody trusts."""
    with tls_provider(*certs["untrusted"]) as provider:
        yield provider


def write_config(tmp: Path, tls: DevProvider, untrusted: DevProvider) -> Path:
    for name, value in (
        ("good", "demo-secret"),
        ("bad", "a3f~secret-id-not-value"),
        ("old", "old-secret"),
    ):
        (tmp / f"{name}.secret").write_text(value + "\n")
    port = tls.url.rsplit(":", 1)[1]

    def profile(name: str, client: str, secret: str | None, endpoint: str, extra: str = "") -> str:
        line = f'client_secret_file = "{tmp / f"{secret}.secret"}"\n' if secret else ""
        return (
            f'\n[providers.{name}]\nclient_id = "{client}"\n{line}'
            f'token_endpoint = "{endpoint}"\n{extra}'
        )

    ms = tls.microsoft_endpoint
    text = f'[daemon]\nstate_dir = "{tmp / "state"}"\nsocket = "{tmp / "run" / "socket"}"\n'
    text += profile("good", "demo-client", "good", ms("dev-tenant"))
    text += profile("wrong_secret", "demo-client", "bad", ms("dev-tenant"))
    text += profile("wrong_client", "no-such-app", "good", ms("dev-tenant"))
    text += profile("unknown_tenant", "demo-client", "good", ms("contoso.example"))
    text += profile("expired_secret", "old-client", "old", ms("dev-tenant"))
    text += profile("public", "public-client", None, ms("dev-tenant"))
    text += profile("plain_refusal", "demo-client", "bad", tls.url + "/token")
    text += profile("self_signed", "demo-client", "good", untrusted.url + "/token")
    text += f'\n[providers.discovered]\nclient_id = "demo-client"\nissuer = "{tls.url}"\n'
    text += f'client_secret_file = "{tmp / "good.secret"}"\n'
    text += '\n[providers.wrong_issuer]\nclient_id = "demo-client"\n'
    text += f'issuer = "https://localhost:{port}"\n'
    text += profile("app", "demo-client", "good", tls.url + "/token")
    text += '\n[accounts.service]\nprovider = "app"\nflow = "client_credentials"\n'
    text += 'scopes = ["mail.read"]\n'
    path = tmp / "config.toml"
    path.write_text(text)
    return path


def check_online(path: Path, trusted: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SSL_CERT_FILE": str(trusted)}
    env.pop("SSL_CERT_DIR", None)
    return subprocess.run(
        [str(MAILOAUTHD), "--config", str(path), "check-config", "--online", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def blocks(out: str) -> dict[str, str]:
    """Each profile's block of the report."""
    found: dict[str, str] = {}
    for chunk in out.split("\n[providers.")[1:]:
        name, _, rest = chunk.partition("]\n")
        found[name] = rest.split("\n\n")[0]
    return found


@pytest.mark.integration  # ,  # `mailoauthd check-config --online`
@pytest.mark.slow
class TestCheckOnline:
    @pytest.fixture
    def report(
        self,
        tmp_path: Path,
        tls: DevProvider,
        untrusted: DevProvider,
        certs: dict[str, tuple[Path, Path]],
    ) -> tuple[subprocess.CompletedProcess[str], dict[str, str]]:
        tls.expire_client_secret("old-client")
        done = check_online(write_config(tmp_path, tls, untrusted), certs["trusted"][0])
        return done, blocks(done.stdout)

    def test_one_block_per_profile_and_the_exit_status(
        self, report: tuple[subprocess.CompletedProcess[str], dict[str, str]], tmp_path: Path
    ) -> None:
        """Every profile has its block; a failure anywhere exits 1; nothing is stored."""
        done, found = report
        assert done.returncode == 1, done.stderr
        assert set(found) == {
            "good", "wrong_secret", "wrong_client", "unknown_tenant", "expired_secret",
            "public", "plain_refusal", "self_signed", "discovered", "wrong_issuer", "app",
        }  # fmt: skip
        assert "7 of 11 profiles failed a check." in done.stdout
        assert not (tmp_path / "state").exists()
        for secret in ("demo-secret", "old-secret", "a3f~secret-id-not-value"):
            assert secret not in done.stdout + done.stderr

    def test_correct_profile(
        self, report: tuple[subprocess.CompletedProcess[str], dict[str, str]], tls: DevProvider
    ) -> None:
        """A correct profile: the token endpoint answers over TLS and the client is accepted."""
        good = report[1]["good"]
        assert f"✓ token endpoint {tls.microsoft_endpoint('dev-tenant')} answers over TLS" in good
        assert "✓ client authentication: the provider accepted client_id and secret" in good
        assert "✗" not in good

    @pytest.mark.parametrize(
        ("profile", "cause", "fix"),
        [
            ("wrong_secret", "AADSTS7000215: the client secret is wrong", "not its Secret ID"),
            ("wrong_client", "AADSTS700016: the application (client_id) was not found", "tenant"),
            ("unknown_tenant", "AADSTS90002: the tenant was not found", "check tenant"),
            ("expired_secret", "AADSTS7000222: the client secret has expired", "new client"),
            ("plain_refusal", "refused (invalid_client: unknown client or wrong secret)", "its"),
            ("self_signed", "CERTIFICATE_VERIFY_FAILED", "is not trusted"),
            ("wrong_issuer", "names issuer", "set issuer to exactly"),
        ],
    )
    def test_failures_name_the_cause_and_the_fix(
        self,
        report: tuple[subprocess.CompletedProcess[str], dict[str, str]],
        profile: str,
        cause: str,
        fix: str,
    ) -> None:
        block = report[1][profile]
        failed = [line for line in block.splitlines() if "✗" in line]
        assert len(failed) == 1, block
        assert cause in failed[0]
        assert "fix:" in block
        assert fix in block.split("fix:", 1)[1]

    def test_public_client(
        self, report: tuple[subprocess.CompletedProcess[str], dict[str, str]]
    ) -> None:
        """A public client has no secret to check, and is said to be one."""
        public = report[1]["public"]
        assert "· client: a public client (no secret), so there is no secret to check" in public
        assert "✗" not in public

    def test_discovery(
        self, report: tuple[subprocess.CompletedProcess[str], dict[str, str]], tls: DevProvider
    ) -> None:
        """The issuer's document is fetched and matched; every endpoint it names answers."""
        block = report[1]["discovered"]
        assert f"✓ discovery: the document of {tls.url} names it as issuer" in block
        for name in ("authorization endpoint", "device authorization endpoint"):
            assert f"✓ {name} {tls.url}/" in block
        assert "✓ client authentication: the provider accepted" in block
        assert "✗" not in block

    def test_client_credentials(
        self, report: tuple[subprocess.CompletedProcess[str], dict[str, str]], tls: DevProvider
    ) -> None:
        """A client_credentials profile gets a real token: its lifetime and scope, not kept."""
        block = report[1]["app"]
        assert "✓ client_credentials for service: a token valid for 60 min" in block
        assert "scope: mail.read (not kept)" in block
        assert tls.count(grant_type="client_credentials") == 1

    def test_one_profile_one_request(
        self,
        tmp_path: Path,
        tls: DevProvider,
        untrusted: DevProvider,
        certs: dict[str, tuple[Path, Path]],
    ) -> None:
        """--profile checks that one only, with one request per check; all passed: exit 0."""
        done = check_online(
            write_config(tmp_path, tls, untrusted), certs["trusted"][0], "--profile", "good"
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert list(blocks(done.stdout)) == ["good"]
        assert "1 profile: every check passed." in done.stdout
        assert [r.grant_type for r in tls.requests] == ["refresh_token"]
        assert untrusted.requests == []

    def test_unknown_profile(
        self,
        tmp_path: Path,
        tls: DevProvider,
        untrusted: DevProvider,
        certs: dict[str, tuple[Path, Path]],
    ) -> None:
        done = check_online(
            write_config(tmp_path, tls, untrusted), certs["trusted"][0], "--profile", "nope"
        )
        assert done.returncode == 1
        assert "there is no [providers.nope]" in done.stderr
