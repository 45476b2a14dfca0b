"""
The proxy's pieces without mail servers: its configuration, what each protocol says
before the login on a listener others can reach, the wrong-password penalty, the
socketmap's netstrings, and hostile input to the line reader.
"""

from __future__ import annotations

import base64
import resource
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing
from certs import self_signed
from hypothesis import given, settings
from hypothesis import strategies as st

from mailoauthd import hostport
from mailoauthd.config import Account, parse
from mailoauthd.errors import ConfigError
from mailoauthd.proxy import imap, pop3, smtp
from mailoauthd.proxy.common import (
    CHUNK,
    Closed,
    LineReader,
    LineTooLong,
    Penalties,
    plain_credentials,
)
from mailoauthd.proxy.service import Client, Proxy
from mailoauthd.proxy.socketmap import BadNetstring, netstring, read_netstring
from mailoauthd.proxy.tls import TLSStream
from mailoauthd.storage.state import AccountState

BASE = """
[providers.dev]
client_id = "x"
token_endpoint = "https://login.example.com/token"

[accounts.work]
provider = "dev"
username = "alice@example.com"
"""


def proxy_config(table: str, account: str = "") -> str:
    return BASE + account + "\n[proxy]\n" + table


class TestConfig:
    def test_listeners_and_account_keys(self, tmp_path: Path) -> None:
        """The [proxy] table and the account's proxy keys, as documented."""
        cfg = parse(
            proxy_config(
                'imap = "127.0.0.1:1143"\npop3 = "[::1]:1110"\nsmtp = "localhost:1587"\n'
                'socketmap = "/run/mailoauthd/socketmap"\n',
                'proxy_password_file = "work.proxy"\npop3_server = "pop.example.com:995"\n'
                'socketmap_keys = ["[smtp.example.com]:587"]\n',
            ),
            source=str(tmp_path / "c.toml"),
        )
        assert cfg.proxy.imap == "127.0.0.1:1143"
        assert cfg.proxy.pop3 == "[::1]:1110"
        assert cfg.proxy.socketmap == Path("/run/mailoauthd/socketmap")
        work = cfg.accounts["work"]
        assert work.proxy_password is not None
        assert work.proxy_password.file == tmp_path / "work.proxy"
        assert work.socketmap_keys == ("[smtp.example.com]:587",)

    def test_presets_know_pop3(self) -> None:
        """pop3_server comes from the preset, like imap_server and smtp_server."""
        cfg = parse(
            '[providers.o]\npreset = "microsoft"\nclient_id = "x"\n'
            '[accounts.work]\nprovider = "o"\nusername = "a@b.c"\n',
            source="c.toml",
        )
        assert cfg.accounts["work"].pop3_server == "outlook.office365.com:995"

    @pytest.mark.parametrize("where", ["0.0.0.0:1143", "192.168.1.5:1143", "[::]:1143"])
    def test_remote_listener_needs_a_certificate(self, where: str) -> None:
        """A listener others can reach is refused without tls_certificate_file."""
        with pytest.raises(ConfigError) as info:
            parse(proxy_config(f'imap = "{where}"\n'), source="c.toml")
        assert "c.toml: [proxy] imap:" in info.value.message
        assert "tls_certificate_file" in info.value.message
        ok = f'imap = "{where}"\ntls_certificate_file = "/c.pem"\ntls_key_file = "/k.pem"\n'
        assert parse(proxy_config(ok), source="c.toml").proxy.imap == where

    @pytest.mark.parametrize(
        ("table", "key"),
        [
            ('imap = "mail.example.com:1143"\n', "imap"),
            ('imap = "::1:1143"\n', "imap"),
            ('smtp = "127.0.0.1"\n', "smtp"),
            ('socketmap = "relative"\n', "socketmap"),
            ('tls_certificate_file = "/c.pem"\n', "tls_key_file"),
            ('imap4 = "127.0.0.1:1"\n', "imap4"),
        ],
    )
    def test_bad_values_name_the_key(self, table: str, key: str) -> None:
        with pytest.raises(ConfigError, match=rf"\[proxy\] {key}:"):
            parse(proxy_config(table), source="c.toml")

    def test_one_password_source(self) -> None:
        account = 'proxy_password_file = "p"\nproxy_password_command = ["pass", "x"]\n'
        with pytest.raises(ConfigError, match=r"\[accounts.work\] proxy_password_command:"):
            parse(BASE + account, source="c.toml")

    def test_loopback(self) -> None:
        for where in ("127.0.0.2:1", "[::1]:1", "localhost:1"):
            assert hostport.is_loopback(hostport.parse(where).host)
        for where in ("0.0.0.0:1", "[::]:1"):
            assert not hostport.is_loopback(hostport.parse(where).host)


@pytest.mark.integration
def test_check_config_refuses_a_remote_listener_without_certificate(tmp_path: Path) -> None:
    """`mailoauthd check-config` names the file, the table and the key, and exits 1."""
    import sys

    path = tmp_path / "config.toml"
    path.write_text(proxy_config('smtp = "0.0.0.0:1587"\n'))
    mailoauthd = Path(sys.executable).parent / "mailoauthd"
    run = subprocess.run(
        [str(mailoauthd), "--config", str(path), "check-config"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode == 1
    assert f"{path}: [proxy] smtp: '0.0.0.0:1587' is not a loopback address" in run.stderr


class NoAccounts:
    """A token service without accounts: every login is a wrong password."""

    names: list[str] = []

    def account(self, name: str) -> Account:
        raise KeyError(name)

    def token_now(self, name: str, min_validity: float | None) -> AccountState | None:
        raise KeyError(name)

    async def token(self, name: str, min_validity: float | None, deadline: float) -> AccountState:
        raise KeyError(name)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("cert"))


@pytest.fixture(scope="module")
def other_certificate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second self-signed certificate for localhost: not the one the test server has."""
    return self_signed(tmp_path_factory.mktemp("other"))[0]


def server_context(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(certificate[0]), str(certificate[1]))
    return context


class Conversation:
    """The client's end of a memory stream to one protocol handler."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.reader = LineReader(stream)

    async def line(self) -> str:
        return (await self.reader.line(5)).decode().rstrip("\r\n")

    async def say(self, text: str) -> str:
        await self.stream.send_all(text.encode() + b"\r\n")
        return await self.line()

    async def starttls(self, cert: Path) -> None:
        context = ssl.create_default_context(cafile=str(cert))
        context.check_hostname = False
        tls = trio.SSLStream(self.stream, context, server_hostname="localhost")
        await tls.do_handshake()
        self.stream = tls
        self.reader = LineReader(tls)


async def converse(
    handler: Callable[[Client], object],
    certificate: tuple[Path, Path],
    script: Callable[[Conversation], object],
) -> Proxy:
    """Run `handler` on a listener others can reach (STARTTLS required) against `script`."""
    from mailoauthd.config import ProxySettings

    proxy = Proxy(ProxySettings(), NoAccounts(), {}, penalties=Penalties(base=0))
    ours, theirs = trio.testing.memory_stream_pair()
    client = Client(proxy, "imap", ours, "192.0.2.1", server_context(certificate), True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handler, client)  # type: ignore[arg-type]
        await script(Conversation(theirs))  # type: ignore[misc]
        nursery.cancel_scope.cancel()
    return proxy


PLAIN = base64.b64encode(b"\0work\0guess").decode()


async def test_imap_refuses_login_before_starttls(certificate: tuple[Path, Path]) -> None:
    async def script(c: Conversation) -> None:
        greeting = await c.line()
        assert "LOGINDISABLED" in greeting
        assert "STARTTLS" in greeting
        assert "AUTH=PLAIN" not in greeting
        assert (await c.say("a LOGIN work guess")).startswith("a NO [PRIVACYREQUIRED]")
        assert (await c.say(f"b AUTHENTICATE PLAIN {PLAIN}")).startswith("b NO [PRIVACYREQUIRED]")
        assert (await c.say("c STARTTLS")).startswith("c OK")
        await c.starttls(certificate[0])
        assert "AUTH=PLAIN" in await c.say("d CAPABILITY")
        await c.line()
        answer = await c.say("e LOGIN work guess")
        assert answer.startswith("e NO [AUTHENTICATIONFAILED]"), answer

    await converse(imap.handle, certificate, script)


async def test_pop3_refuses_login_before_stls(certificate: tuple[Path, Path]) -> None:
    async def script(c: Conversation) -> None:
        assert (await c.line()).startswith("+OK")
        assert (await c.say("USER work")).startswith("-ERR [AUTH]")
        assert (await c.say(f"AUTH PLAIN {PLAIN}")).startswith("-ERR [AUTH]")
        assert (await c.say("STLS")).startswith("+OK")
        await c.starttls(certificate[0])
        assert (await c.say("USER work")).startswith("+OK")
        assert (await c.say("PASS guess")).startswith("-ERR [AUTH]")

    await converse(pop3.handle, certificate, script)


async def test_smtp_refuses_auth_before_starttls(certificate: tuple[Path, Path]) -> None:
    async def script(c: Conversation) -> None:
        assert (await c.line()).startswith("220 ")
        await c.stream.send_all(b"EHLO me\r\n")
        ehlo = [await c.line()]
        while ehlo[-1][3] == "-":
            ehlo.append(await c.line())
        assert not any("AUTH" in line for line in ehlo)
        assert (await c.say(f"AUTH PLAIN {PLAIN}")).startswith("530 5.7.0")
        assert (await c.say("STARTTLS")).startswith("220 ")
        await c.starttls(certificate[0])
        assert (await c.say(f"AUTH PLAIN {PLAIN}")).startswith("503 ")  # EHLO again first
        await c.stream.send_all(b"EHLO me\r\n")
        while (await c.line())[3] == "-":
            pass
        assert (await c.say(f"AUTH PLAIN {PLAIN}")).startswith("535 5.7.8")

    await converse(smtp.handle, certificate, script)


def test_penalties_grow_per_source_and_are_forgotten() -> None:
    now = [0.0]
    penalties = Penalties(base=0.5, cap=4, memory=100, clock=lambda: now[0])
    assert [penalties.failed("a") for _ in range(5)] == [0.5, 1, 2, 4, 4]
    assert penalties.failed("b") == 0.5
    now[0] = 1000
    assert penalties.failed("a") == 0.5


def test_plain_credentials() -> None:
    def b64(text: bytes) -> bytes:
        return base64.b64encode(text)

    assert plain_credentials(b64(b"\0u\0p")) == ("u", "p")
    assert plain_credentials(b64(b"u\0u\0p")) == ("u", "p")
    assert plain_credentials(b64(b"other\0u\0p")) is None
    assert plain_credentials(b64(b"\0u\0")) is None
    assert plain_credentials(b"not base64!") is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=3000), max_size=8))
def test_line_reader_is_bounded(chunks: list[bytes]) -> None:
    """Whatever arrives, a line is at most the limit and the buffer never grows past it."""

    async def main() -> None:
        ours, theirs = trio.testing.memory_stream_pair()
        reader = LineReader(ours, limit=1024)
        for chunk in chunks:
            await theirs.send_all(chunk)
        await theirs.send_eof()
        while True:
            try:
                line = await reader.line(5)
            except (Closed, LineTooLong):
                break
            assert len(line) <= 2 * 1024
            assert len(reader.buffer) <= 2 * 1024

    trio.run(main)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_netstrings(data: bytes) -> None:
    """A netstring round-trips; garbage is refused, never a crash or an unbounded read."""

    async def main() -> None:
        ours, theirs = trio.testing.memory_stream_pair()
        await theirs.send_all(netstring(data.decode("latin-1")) + data)
        await theirs.send_eof()
        buffer = bytearray()
        assert await read_netstring(ours, buffer, 5) == data.decode("latin-1").encode()  # type: ignore[arg-type]
        try:
            await read_netstring(ours, buffer, 5)  # type: ignore[arg-type]
        except (Closed, BadNetstring):
            pass

    trio.run(main)


async def test_a_silent_client_is_dropped(
    certificate: tuple[Path, Path], autojump_clock: trio.testing.MockClock
) -> None:
    """Every read before the login is bounded: a client that says nothing is let go."""
    from mailoauthd.config import ProxySettings

    proxy = Proxy(ProxySettings(), NoAccounts(), {}, read_timeout=60)
    ours, theirs = trio.testing.memory_stream_pair()
    client = Client(proxy, "imap", ours, "192.0.2.1", None, False)
    started = trio.current_time()
    with pytest.raises(trio.TooSlowError):
        await imap.handle(client)
    assert trio.current_time() - started == pytest.approx(60)
    assert (await theirs.receive_some(1000)).startswith(b"* OK")


class TestUpstreamTLS:
    """The upstream's TLS stream (proxy/tls.py) against trio's own TLS server."""

    @staticmethod
    def pair(
        certificate: tuple[Path, Path], cafile: Path | None = None
    ) -> tuple[TLSStream, trio.SSLStream[trio.abc.Stream]]:
        ours, theirs = trio.testing.memory_stream_pair()
        context = ssl.create_default_context(cafile=str(cafile or certificate[0]))
        client = TLSStream(ours, context, server_hostname="localhost")
        server = trio.SSLStream(theirs, server_context(certificate), server_side=True)
        return client, server

    async def test_reads_several_records_at_once_and_no_more_than_asked(
        self, certificate: tuple[Path, Path]
    ) -> None:
        """A megabyte arrives intact, in reads larger than one 16 KB record, each ≤ max_bytes."""
        client, server = self.pair(certificate)
        payload = bytes(range(256)) * 4096  # 1 MiB, in 64 records of 16 KB
        sizes: list[int] = []
        received = bytearray()
        async with trio.open_nursery() as nursery:

            async def serve() -> None:
                await server.do_handshake()
                await server.send_all(payload)
                await server.aclose()  # close_notify: the client reads the end

            nursery.start_soon(serve)
            await client.do_handshake()
            while data := await client.receive_some(CHUNK):
                sizes.append(len(data))
                received += data
        assert received == payload
        assert max(sizes) <= CHUNK
        assert max(sizes) > 16384, sizes  # several records per read: the point of the stream
        assert await client.receive_some(CHUNK) == b""  # the end stays the end

    async def test_both_ways_at_once(self, certificate: tuple[Path, Path]) -> None:
        """The splice's use: one task sends while another receives; the server echoes."""
        client, server = self.pair(certificate)
        payload = b"".join(b"%08d\r\n" % n for n in range(100000))  # 1 MB
        echoed = bytearray()
        async with trio.open_nursery() as nursery:

            async def echo() -> None:
                await server.do_handshake()
                while data := await server.receive_some(CHUNK):
                    await server.send_all(data)

            async def send() -> None:
                await client.send_all(payload)

            nursery.start_soon(echo)
            await client.do_handshake()
            nursery.start_soon(send)
            while len(echoed) < len(payload):
                echoed += await client.receive_some(CHUNK)
            nursery.cancel_scope.cancel()
        assert echoed == payload

    async def test_an_untrusted_certificate_breaks_the_handshake(
        self, certificate: tuple[Path, Path], other_certificate: Path
    ) -> None:
        client, server = self.pair(certificate, cafile=other_certificate)
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:

                async def serve() -> None:
                    with pytest.raises(trio.BrokenResourceError):
                        await server.do_handshake()

                nursery.start_soon(serve)
                with pytest.raises(trio.BrokenResourceError) as raised:
                    await client.do_handshake()
                await client.aclose()
        assert isinstance(raised.value.__cause__, ssl.SSLCertVerificationError)

    async def test_one_receiver_at_a_time(self, certificate: tuple[Path, Path]) -> None:
        client, server = self.pair(certificate)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.do_handshake)
            await client.do_handshake()
            nursery.start_soon(client.receive_some, 10)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await client.receive_some(10)
            nursery.cancel_scope.cancel()


@pytest.mark.integration
def test_the_open_files_limit_is_lifted_to_the_hard_one() -> None:
    """1,024 sessions need over 2,048 descriptors; systemd's default soft limit is 1,024."""
    code = (
        "import resource\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
        "from mailoauthd.proxy.common import raise_open_files_limit\n"
        "new = raise_open_files_limit()\n"
        "print(new, resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    new, soft, hard = (int(x) for x in run.stdout.split())
    assert new == soft > 256
    assert soft == hard or hard == resource.RLIM_INFINITY
