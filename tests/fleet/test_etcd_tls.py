"""
TLS to etcd as docs/fleet.md sets it up, against a real etcd: mutual TLS, etcd's own users.

The certificates are made by the doc's own `openssl` commands (its step 1, for one host on
127.0.0.1), one etcd member runs with the doc's TLS flags, and the doc's `etcdctl` commands
(step 3) make the user limited to the prefix and enable authentication. A real daemon then
serves a token through it; a missing client certificate, a wrong password and a CA that did
not sign etcd's certificate each stop the daemon's start with an error naming what is wrong.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mailoauthd.testing import DevProvider
from tests.certs import self_signed
from tests.conftest import MAILOAUTH, USER, DaemonProcess, config_text, helper
from tests.fleet.cluster import free_port
from tests.fleet.nodes import FLEET_KEY

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "fleet.md"
ETCDCTL = shutil.which("etcdctl")
PASSWORD = "fleet-password"  # etcd's user's password in this test only
PREFIX = "/mailoauthd/"  # the prefix the doc's role is limited to
# A daemon that cannot open its store stops within this (no 30 s wait: nothing to wait for).
EXIT_SECONDS = 20
# Another daemon's write reaches a daemon through its watch within a moment; this is ample.
WATCH_SECONDS = 10


def doc_block(after: str) -> str:
    """The first ```sh block of docs/fleet.md after the text `after`, dedented."""
    text = DOC.read_text()
    start = text.index(after)
    block = re.search(r"```sh\n(.*?)```", text[start:], re.S)
    assert block is not None, f"no sh block after {after!r} in {DOC}"
    return textwrap.dedent(block.group(1))


@dataclass
class Etcd:
    """One etcd member with client TLS, its certificates, and etcdctl as the doc runs it."""

    dir: Path
    url: str
    proc: subprocess.Popen[bytes]

    def etcdctl(self, *args: str, user: str | None = None, stdin: str = "") -> str:
        assert ETCDCTL is not None
        tls = ["--cacert", "ca.pem", "--cert", "client1.pem", "--key", "client1.key"]
        login = [f"--user={user}"] if user else []
        done = subprocess.run(
            [ETCDCTL, f"--endpoints={self.url}", *tls, *login, *args],
            cwd=self.dir,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        assert done.returncode == 0, f"etcdctl {args}: {done.stderr}"
        return done.stdout


def make_certificates(directory: Path) -> None:
    """The doc's step 1, for one host on 127.0.0.1."""
    script = doc_block("1. **Certificates.**")
    script = script.replace("for i in 1 2 3;", "for i in 1;").replace("10.0.0.$i", "127.0.0.$i")
    assert "for i in 1;" in script, "the doc's commands changed"
    assert "IP:127.0.0.$i" in script, "the doc's commands changed"
    done = subprocess.run(
        ["bash", "-euc", script], cwd=directory, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


def start_etcd(directory: Path) -> Etcd:
    """One member with the doc's TLS flags (step 2), on free loopback ports."""
    url = f"https://127.0.0.1:{free_port()}"
    peer = f"https://127.0.0.1:{free_port()}"
    log = (directory / "etcd.log").open("ab")
    proc = subprocess.Popen(
        [
            *("etcd", "--name", "etcd1", "--data-dir", str(directory / "data")),
            *("--listen-client-urls", url, "--advertise-client-urls", url),
            *("--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer),
            *("--initial-cluster", f"etcd1={peer}"),
            *("--cert-file", "etcd1.pem", "--key-file", "etcd1.key"),
            *("--trusted-ca-file", "ca.pem", "--client-cert-auth"),
            *("--peer-cert-file", "etcd1.pem", "--peer-key-file", "etcd1.key"),
            *("--peer-trusted-ca-file", "ca.pem", "--peer-client-cert-auth"),
            *("--logger=zap", "--log-outputs=stderr", "--log-level=warn"),
        ],
        cwd=directory,
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    log.close()
    return Etcd(directory, url, proc)


def wait_healthy(etcd: Etcd, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while True:
        done = subprocess.run(
            [str(ETCDCTL), f"--endpoints={etcd.url}", "--cacert", "ca.pem"]
            + ["--cert", "client1.pem", "--key", "client1.key", "endpoint", "health"],
            cwd=etcd.dir,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode == 0:
            return
        if time.monotonic() > deadline or etcd.proc.poll() is not None:
            log = (etcd.dir / "etcd.log").read_text(errors="replace")[-3000:]
            raise AssertionError(f"etcd not healthy: {done.stderr}\n{log}")
        time.sleep(0.1)


def enable_auth(etcd: Etcd) -> None:
    """The doc's step 3, line by line; passwords on stdin where the doc lets etcdctl ask."""
    for line in doc_block("3. **A user limited to the prefix**").splitlines():
        command = line.split("#")[0].split()
        assert command[0] == "etcdctl", line
        args = command[1:]
        if args[:2] == ["user", "add"]:
            password = "root-password" if args[2] == "root" else PASSWORD
            etcd.etcdctl(*args, "--interactive=false", stdin=password + "\n")
        else:
            etcd.etcdctl(*args)


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Etcd]:
    if shutil.which("etcd") is None or ETCDCTL is None:
        pytest.skip("etcd is not installed (Debian: etcd-server, etcd-client)")
    directory = tmp_path_factory.mktemp("etcd-tls")
    make_certificates(directory)
    server = start_etcd(directory)
    try:
        wait_healthy(server)
        enable_auth(server)
        yield server
    finally:
        server.proc.kill()
        server.proc.wait()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def provider() -> Iterator[DevProvider]:
    with DevProvider() as p:
        yield p


def write_config(tmp: Path, provider: DevProvider, etcd: Etcd, **store: str) -> Path:
    """The doc's step 5 for one host, with files from `etcd.dir`; `store` overrides keys."""
    key = tmp / "fleet.key"
    key.write_text(FLEET_KEY + "\n")
    password = tmp / "etcd.password"
    password.write_text(PASSWORD + "\n")
    for path in (key, password):
        path.chmod(0o600)
    values = {
        "ca_file": str(etcd.dir / "ca.pem"),
        "cert_file": str(etcd.dir / "client1.pem"),
        "key_file": str(etcd.dir / "client1.key"),
        "username": "mailoauthd",
        "password_file": str(password),
    } | store
    lines = "".join(f'{name} = "{value}"\n' for name, value in values.items() if value)
    text = (
        config_text(tmp, provider)
        + f"""
[store]
backend = "etcd"
endpoints = ["{etcd.url}"]
prefix = "{PREFIX}"
lease_ttl = "2s"
encryption_key_file = "{key}"
{lines}"""
    )
    config = tmp / "config.toml"
    config.write_text(text)
    return config


def refused_start(tmp: Path, config: Path) -> str:
    """Start a daemon that must not start; its log."""
    daemon = DaemonProcess(config, tmp / "run" / "socket", tmp / "daemon.log")
    try:
        code = daemon.proc.wait(EXIT_SECONDS)
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()
        daemon._log.close()
    log = daemon.log_path.read_text(errors="replace")
    assert code != 0, log
    assert not (tmp / "run" / "socket").exists(), log
    return log


def test_daemons_serve_tokens_through_etcd_with_mutual_tls_and_a_password(
    etcd: Etcd, provider: DevProvider, tmp_path: Path
) -> None:
    """Imported on one daemon, served by the other: the watch, too, signs in to etcd."""
    daemons = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        config = write_config(tmp_path / name, provider, etcd)
        socket = tmp_path / name / "run" / "socket"
        daemons.append(DaemonProcess(config, socket, tmp_path / name / "daemon.log"))
    a, b = daemons
    try:
        for daemon in daemons:
            daemon.wait_ready(30)
        imported = subprocess.run(
            [str(MAILOAUTH), "--socket", str(a.socket), "import", "work"],
            input=provider.issue_refresh_token(f"work-{USER}") + "\n",
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert imported.returncode == 0, imported.stderr + a.log()
        deadline = time.monotonic() + WATCH_SECONDS  # b holds nothing until the watch brings it
        while (token := helper("token", "work", socket=b.socket)).returncode:
            assert time.monotonic() < deadline, token.stderr + b.log()
            time.sleep(0.1)
        assert provider.introspect(token.stdout.strip())["active"]
        for daemon in daemons:
            deadline = time.monotonic() + 15
            while (check := helper("status", "--check", socket=daemon.socket)).returncode:
                assert time.monotonic() < deadline, check.stdout + check.stderr + daemon.log()
                time.sleep(0.1)
    finally:
        for daemon in daemons:
            daemon.proc.terminate()
            daemon.proc.wait(15)
            daemon._log.close()
    # The grant is in etcd under the prefix, sealed: etcd's root sees no token in it.
    stored = etcd.etcdctl("get", "--prefix", PREFIX, user="root:root-password")
    assert f"{PREFIX}grants/work" in stored
    assert token.stdout.strip() not in stored


def test_no_client_certificate_is_named(etcd: Etcd, provider: DevProvider, tmp_path: Path) -> None:
    config = write_config(tmp_path, provider, etcd, cert_file="", key_file="")
    log = refused_start(tmp_path, config)
    # etcd's TLS alert, or on a busy machine the reset that beats it (etcd._why): both name
    # the missing certificate, and the daemon stops at once instead of waiting for etcd.
    assert "client certificate (cert_file/key_file: none" in log, log


def test_a_wrong_password_is_named(etcd: Etcd, provider: DevProvider, tmp_path: Path) -> None:
    config = write_config(tmp_path, provider, etcd)
    (tmp_path / "etcd.password").write_text("not-the-password\n")
    log = refused_start(tmp_path, config)
    assert "authentication as 'mailoauthd' refused" in log, log
    assert "invalid user ID or password" in log, log
    assert "not-the-password" not in log


def test_a_ca_that_did_not_sign_etcd_is_named(
    etcd: Etcd, provider: DevProvider, tmp_path: Path
) -> None:
    other_ca, _ = self_signed(tmp_path, "other-ca")
    config = write_config(tmp_path, provider, etcd, ca_file=str(other_ca))
    log = refused_start(tmp_path, config)
    assert "etcd's certificate is not trusted" in log, log


def test_a_client_certificate_with_a_common_name_is_refused_with_etcds_reason(
    etcd: Etcd, provider: DevProvider, tmp_path: Path
) -> None:
    """etcd's gateway refuses such a certificate (why the doc's has none): its words are shown."""
    script = doc_block("1. **Certificates.**")
    request = next(line for line in script.splitlines() if "-subj /O=mailoauthd" in line)
    assert request.strip().startswith("openssl req"), request
    ca = etcd.dir
    commands = [
        f"openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=mailoauthd"
        f" -keyout {tmp_path}/cn.key -out {tmp_path}/cn.csr",
        f"openssl x509 -req -in {tmp_path}/cn.csr -CA {ca}/ca.pem -CAkey {ca}/ca.key -days 1"
        f" -out {tmp_path}/cn.pem -extfile <(printf 'extendedKeyUsage=clientAuth')",
    ]
    done = subprocess.run(
        ["bash", "-euc", "\n".join(commands)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    config = write_config(
        tmp_path, provider, etcd, cert_file=f"{tmp_path}/cn.pem", key_file=f"{tmp_path}/cn.key"
    )
    log = refused_start(tmp_path, config)
    assert "CommonName of client sending a request against gateway" in log, log
