"""
A new installation's first day: what a person meets between `pip install` and a working
mailbox. The programs run as subprocesses, as a person would run them; daemons against
the development provider on 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import MAILOAUTH, MAILOAUTHD, DaemonProcess, config_text, helper

from mailoauthd import __version__, paths
from mailoauthd.testing import DevProvider

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "etc" / "mailoauthd.toml"
SERVICE_DOC = ROOT / "docs" / "service.md"
Start = Callable[..., DaemonProcess]


def run(
    *argv: str, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=env,
        input=stdin,
    )


def example_secrets(directory: Path) -> Path:
    """The secret files the example configuration names, as LoadCredential= would provide."""
    directory.mkdir(exist_ok=True)
    for name in ("office365", "office365-app", "gmail"):
        (directory / f"{name}.secret").write_text(f"{name}-secret\n")
    return directory


# --- the helper ----------------------------------------------------------------------------


@pytest.mark.integration
class TestHelper:
    def test_version(self) -> None:
        """`mailoauth --version` works like `mailoauthd --version`."""
        done = run(MAILOAUTH, "--version")
        assert (done.returncode, done.stdout.strip()) == (0, f"mailoauth {__version__}")

    @pytest.mark.parametrize("command", ["token", "sasl"])
    def test_token_help_on_stdout(self, command: str) -> None:
        """`mailoauth token --help` is asked for: stdout, exit 0."""
        done = run(MAILOAUTH, command, "--help")
        assert done.returncode == 0
        assert done.stderr == ""
        assert "--timeout SECONDS" in done.stdout

    @pytest.mark.parametrize("command", ["refresh", "import"])
    def test_timeout_has_help(self, command: str) -> None:
        """Every option says what it does."""
        done = run(MAILOAUTH, command, "--help")
        assert done.returncode == 0
        assert re.search(r"--timeout SECONDS\s+wait at most", done.stdout), done.stdout

    def test_unreachable_says_which_path_gave_which_error(self, tmp_path: Path) -> None:
        """Each socket tried is named with its own error, and the hint fits the mode."""
        runtime = tmp_path / "runtime"
        (runtime / "mailoauthd").mkdir(parents=True)
        (runtime / "mailoauthd" / "socket").write_text("not a socket")
        env = {k: v for k, v in os.environ.items() if k != "MAILOAUTHD_SOCKET"}
        env["XDG_RUNTIME_DIR"] = str(runtime)
        done = run(MAILOAUTH, "token", "work", env=env)
        assert done.returncode == 3
        user_socket = runtime / "mailoauthd" / "socket"
        assert f"{user_socket}: Connection refused" in done.stderr
        system_error = "Connection refused" if Path(paths.SYSTEM_SOCKET).exists() else "No such"
        assert f"{paths.SYSTEM_SOCKET}: {system_error}" in done.stderr
        if os.geteuid() == 0 or Path(paths.SYSTEM_SOCKET).exists():
            assert "systemctl start mailoauthd" in done.stderr
        else:
            assert "systemctl --user start mailoauthd" in done.stderr

    def test_unreachable_named_socket(self, tmp_path: Path) -> None:
        """With --socket the hint is about that socket, not a unit."""
        done = helper("token", "work", socket=tmp_path / "nope")
        assert done.returncode == 3
        assert f"{tmp_path / 'nope'}: No such file or directory" in done.stderr
        assert "the mailoauthd that listens there" in done.stderr

    @pytest.mark.slow
    def test_did_you_mean(self, tmp_path: Path, provider: DevProvider, start_daemon: Start) -> None:
        """A misspelt account gets the closest name the caller may use."""
        config_path = tmp_path / "config.toml"
        config_path.write_text(config_text(tmp_path, provider, accounts=("work", "home")))
        d = start_daemon(config_path)
        done = helper("token", "wrok", socket=d.socket)
        assert done.returncode == 1
        assert "wrok: no such account" in done.stderr
        assert "did you mean 'work'?" in done.stderr
        far = helper("token", "zzzzzz", socket=d.socket)
        assert "did you mean" not in far.stderr

    @pytest.mark.slow
    def test_import_says_stored_when_the_first_refresh_fails(
        self, tmp_path: Path, provider: DevProvider, start_daemon: Start
    ) -> None:
        """A refresh token kept although its first refresh failed is said to be kept."""
        config_path = tmp_path / "config.toml"
        config_path.write_text(
            config_text(tmp_path, provider, provider_keys="", accounts=())
            + '\n[providers.down]\nclient_id = "c"\ntoken_endpoint = "http://127.0.0.1:1/t"\n'
            + '\n[accounts.work]\nprovider = "down"\nusername = "a@example.com"\n'
        )
        d = start_daemon(config_path)
        done = helper("import", "work", "--timeout", "5", socket=d.socket, stdin="rt-1\n")
        assert done.returncode == 5, done.stderr
        assert "the refresh token is stored, but the first refresh with it failed" in (done.stderr)
        check = helper("status", "--check", socket=d.socket)
        assert check.returncode == 5, check.stdout
        assert check.stdout.startswith("UNHEALTHY: 1 of 1 account: work failing")


# --- check-config -------------------------------------------------------------------------


@pytest.mark.integration
class TestCheckConfig:
    def test_example_as_installed_passes(self, tmp_path: Path) -> None:
        """The example, printed by example-config, passes with its secret files in place."""
        printed = run(MAILOAUTHD, "example-config")
        assert printed.returncode == 0
        assert printed.stdout == EXAMPLE.read_text()
        cfg = tmp_path / "cfg.toml"
        cfg.write_text(printed.stdout)
        creds = example_secrets(tmp_path / "creds")
        done = run(MAILOAUTHD, "check-config", "--config", cfg, "--credentials-directory", creds)
        assert done.returncode == 0, done.stderr
        assert done.stderr == ""
        assert done.stdout == f"{cfg}: OK (4 providers, 4 accounts)\n"

    def test_credentials_directory_unset_says_how_to_check(self, tmp_path: Path) -> None:
        """Outside systemd the error names the option that fixes it, not 'run check-config'."""
        cfg = tmp_path / "cfg.toml"
        cfg.write_text(EXAMPLE.read_text())
        env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
        done = run(MAILOAUTHD, "check-config", "--config", cfg, env=env)
        assert done.returncode == 1
        assert "--credentials-directory DIR" in done.stderr
        assert "run 'mailoauthd check-config'" not in done.stderr
        assert done.stderr.splitlines()[-1] == "mailoauthd: fix the configuration file"

    def test_missing_config_points_at_what_an_installation_has(self, tmp_path: Path) -> None:
        """No config file: the hint is a command every installation has, not a checkout's file."""
        done = run(MAILOAUTHD, "check-config", "--config", tmp_path / "nope.toml")
        assert done.returncode == 1
        assert "'mailoauthd example-config' prints an annotated example" in done.stderr
        assert "etc/mailoauthd.toml" not in done.stderr

    def test_missing_secret_file_named_by_its_key(self, tmp_path: Path) -> None:
        """The error names client_secret_file, the key that is set."""
        cfg = tmp_path / "cfg.toml"
        cfg.write_text(
            '[providers.p]\nclient_id = "c"\ntoken_endpoint = "https://sso.example.org/t"\n'
            'client_secret_file = "nope.secret"\n'
            '[accounts.a]\nprovider = "p"\nusername = "a@example.org"\n'
        )
        done = run(MAILOAUTHD, "check-config", "--config", cfg)
        assert done.returncode == 1
        assert f"{cfg}: [providers.p] client_secret_file: cannot read" in done.stderr

    def test_empty_config_is_not_silent(self, tmp_path: Path) -> None:
        """A configuration without accounts passes, with a warning saying so."""
        cfg = tmp_path / "cfg.toml"
        cfg.write_text("")
        done = run(MAILOAUTHD, "check-config", "--config", cfg)
        assert done.returncode == 0
        assert "warning: there are no [accounts.NAME] tables" in done.stderr
        assert done.stdout == f"{cfg}: OK (0 providers, 0 accounts)\n"

    def test_grammar(self, tmp_path: Path) -> None:
        """One provider, one account."""
        cfg = tmp_path / "cfg.toml"
        cfg.write_text(
            '[providers.p]\nclient_id = "c"\ntoken_endpoint = "https://sso.example.org/t"\n'
            '[accounts.a]\nprovider = "p"\nusername = "a@example.org"\n'
        )
        done = run(MAILOAUTHD, "check-config", "--config", cfg)
        assert done.stdout == f"{cfg}: OK (1 provider, 1 account)\n"

    def test_service_doc_steps(self, tmp_path: Path) -> None:
        """
        docs/service.md's system set-up, followed with /etc/mailoauthd in a temporary
        directory: the example installed as config.toml, the secret put where the doc puts
        it, its credentials config, then the doc's own check-config command.
        """
        doc = SERVICE_DOC.read_text()
        doc = doc[doc.index("## System service") : doc.index("## Per-user service")]
        etc = tmp_path / "etc" / "mailoauthd"
        etc.mkdir(parents=True)

        def local(text: str) -> str:
            return text.replace("/etc/mailoauthd", str(etc))

        shell = "\n".join(re.findall(r"```sh\n(.*?)```", doc, re.S)).replace("\\\n", " ")
        commands = [
            shlex.split(local(line.split("#")[0]))
            for line in shell.splitlines()
            if line.lstrip().startswith("mailoauthd ")
        ]
        checks = [c for c in commands if c[:1] == ["mailoauthd"] and "check-config" in c]
        assert checks, "docs/service.md no longer runs check-config"
        # Step: install -m 644 ... mailoauthd.toml /etc/mailoauthd/config.toml
        installs = [c for c in commands if c[:1] == ["mailoauthd"] and "example-config" in c]
        assert installs, "docs/service.md no longer installs the example"
        (etc / "config.toml").write_text(run(MAILOAUTHD, "example-config").stdout)
        for name in ("office365", "office365-app", "gmail"):
            (etc / f"{name}.secret").write_text("s3cret\n")
        for check in checks:
            argv = [str(MAILOAUTHD), "--config", str(etc / "config.toml")]
            argv += [a for a in check[1:] if a != "--system"]
            done = run(*argv)
            assert done.returncode == 0, (check, done.stderr)
        # Step: the credentials section's config replaces the example's provider.
        block = next(b for b in re.findall(r"```toml\n(.*?)```", doc, re.S) if "CREDENTIALS" in b)
        (etc / "config.toml").write_text(
            local(block) + '[accounts.a]\nprovider = "office365"\nusername = "a@contoso.com"\n'
        )
        for check in checks:
            argv = [str(MAILOAUTHD), "--config", str(etc / "config.toml")]
            argv += [a for a in check[1:] if a != "--system"]
            done = run(*argv)
            assert done.returncode == 0, (check, done.stderr)


# --- make demo ----------------------------------------------------------------------------


@pytest.mark.slow
class TestDemo:
    @pytest.mark.integration
    def test_never_system_paths(self, tmp_path: Path) -> None:
        """Without a runtime directory (root's case) the demo's socket is its own, in /tmp."""
        env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR",)}
        env.pop("MAILOAUTHD_SOCKET", None)
        if os.geteuid() != 0:
            env["XDG_RUNTIME_DIR"] = str(tmp_path / "missing")
        proc = subprocess.Popen(
            [str(MAILOAUTHD), "demo"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        try:
            assert proc.stderr is not None
            lines = []
            for line in proc.stderr:
                lines.append(line)
                if "Ctrl-C" in line:
                    break
            text = "".join(lines)
            command = next(line for line in lines if " token demo" in line).split()
            assert command[1] == "--socket"
            assert not command[2].startswith("/run/"), text
            token = run(*command)
            assert token.returncode == 0, token.stderr
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=15)
            assert proc.stderr is not None
            proc.stderr.close()

    def test_no_banner_when_the_socket_is_taken(
        self, tmp_path: Path, provider: DevProvider, start_daemon: Start
    ) -> None:
        """Another daemon on the socket: the demo fails without telling you to try it."""
        config_path = tmp_path / "config.toml"
        config_path.write_text(config_text(tmp_path, provider))
        d = start_daemon(config_path)
        done = run(MAILOAUTHD, "demo", "--socket", d.socket)
        assert done.returncode == 1
        assert "in another terminal" not in done.stderr
        assert "mailoauthd:" in done.stderr


# --- the documentation stands alone and agrees with itself --------------------------------


class TestDocs:
    @pytest.mark.integration
    def test_no_file_cites_a_document_the_repository_lacks(self) -> None:
        """Nothing refers to the CONTRACT.md of the project's planning: the repo stands alone."""
        listed = subprocess.run(
            ["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True, check=True
        ).stdout.split()
        citing = [
            name
            for name in listed
            if name != f"tests/{Path(__file__).name}"
            and (ROOT / name).is_file()
            and b"CONTRACT.md" in (ROOT / name).read_bytes()
        ]
        assert citing == []

    def test_one_hardening_score(self) -> None:
        """The unit's comment and docs/service.md give the same systemd-analyze score."""
        unit = (ROOT / "systemd" / "mailoauthd.service").read_text()
        doc = SERVICE_DOC.read_text()
        in_unit = re.findall(r"about (\d\.\d) \(\"OK\"", unit)
        in_doc = re.findall(r"rates the unit about (\d\.\d)", doc)
        assert in_unit
        assert in_unit == in_doc

    def test_paste_back_example_uses_the_microsoft_host(self) -> None:
        """Microsoft profiles come back to localhost; the example is a Microsoft sign-in."""
        doc = (ROOT / "docs" / "authorization.md").read_text()
        example = doc[doc.index("## Anywhere: paste the address back") :]
        example = example[: example.index("The pasted address")]
        assert "login.microsoftonline.com" in example
        assert "http://127.0.0.1:41807" not in example
        assert "http://localhost:41807/?code=" in example

    def test_provider_walkthroughs(self) -> None:
        """The registration walkthroughs cover what people get stuck on."""
        doc = (ROOT / "docs" / "providers.md").read_text()
        for needed in (
            "IMAP.AccessAsUser.All",
            "POP.AccessAsUser.All",
            "SMTP.Send",
            "offline_access",
            "Allow public client flows",
            "admin consent",
            "Desktop app",
            "consent screen",
            "In production",
            "535 5.7.139",
            "Set-CASMailbox -Identity",
            "-SmtpClientAuthenticationDisabled $false",
        ):
            assert needed in doc, needed

    def test_readme_says_what_make_test_does_as_root(self) -> None:
        readme = (ROOT / "README.md").read_text()
        assert "as root" in readme
        assert "useradd" in readme


@pytest.mark.integration
@pytest.mark.skipif(not shutil.which("make"), reason="needs make")
def test_make_demo_installs_only_the_program(tmp_path: Path) -> None:
    """`make demo` on a fresh machine installs mailoauthd alone: no pytest, ruff or mypy."""
    plan = subprocess.run(
        ["make", "-n", "-C", str(ROOT), "demo", f"VENV={tmp_path / 'venv'}"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    installs = [line for line in plan.splitlines() if " install " in line]
    assert any(line.endswith("install --quiet -e .") for line in installs), plan
    assert not any("[" in line for line in installs), plan
    assert "mailoauthd demo" in plan
