"""Shared fixtures: the development provider, configs for it, daemons in and out of process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import hypothesis
import pytest
import trio
import trio.testing

from mailoauthd import config, daemon
from mailoauthd.refresh.scheduler import Scheduler
from mailoauthd.testing import DevProvider

BIN = Path(sys.executable).parent
MAILOAUTH = BIN / "mailoauth"
MAILOAUTHD = BIN / "mailoauthd"
USER = "alice@example.com"
T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """
    A clock that stands still until the test jumps it.

    pytest-trio runs a test that asks for it on this clock (a Clock fixture).
    """
    return trio.testing.MockClock(rate=0)


@pytest.fixture
def dev(clock: trio.testing.MockClock) -> Iterator[DevProvider]:
    """A development provider on 127.0.0.1 whose clock is the MockClock's (its log in test time)."""
    with DevProvider(clock=lambda: mock_now(clock)().timestamp()) as p:
        yield p


@pytest.fixture
def provider() -> Iterator[DevProvider]:
    """A development provider on 127.0.0.1 with hour-long tokens."""
    with DevProvider() as p:
        yield p


def config_text(
    tmp: Path,
    provider: DevProvider,
    *,
    accounts: tuple[str, ...] = ("work",),
    daemon_keys: str = "",
    account_keys: str = "",
    provider_keys: str = "",
) -> str:
    """A config whose one profile points at the development provider."""
    secret = tmp / "client-secret"
    secret.write_text("demo-secret\n")
    endpoints = provider.endpoints
    text = f"""\
[daemon]
state_dir = "{tmp / "state"}"
socket = "{tmp / "run" / "socket"}"
log_level = "debug"
log_format = "json"
{daemon_keys}

[providers.dev]
client_id = "demo-client"
client_secret_file = "{secret}"
token_endpoint = "{endpoints["token_endpoint"]}"
revocation_endpoint = "{endpoints["revocation_endpoint"]}"
{provider_keys}
"""
    for name in accounts:
        text += f"""
[accounts.{name}]
provider = "dev"
username = "{USER}"
{account_keys}
"""
    return text


def make_config(tmp: Path, provider: DevProvider, **kw: str | tuple[str, ...]) -> config.Config:
    text = config_text(tmp, provider, **kw)  # type: ignore[arg-type]
    path = tmp / "config.toml"
    path.write_text(text)
    return config.load(path)


def mock_now(clock: trio.testing.MockClock) -> Callable[[], datetime]:
    """A wall clock that moves with trio's MockClock (safe to call from any thread)."""
    return lambda: T0 + timedelta(seconds=clock.current_time())


@asynccontextmanager
async def in_process_daemon(
    cfg: config.Config, *, now: Callable[[], datetime] | None = None
) -> AsyncIterator[daemon.Daemon]:
    """Run the daemon in this trio run; cancelled on exit."""
    async with trio.open_nursery() as nursery:
        kwargs = {} if now is None else {"now": now}
        d: daemon.Daemon = await nursery.start(
            partial(
                daemon.run,
                cfg,
                config_path=None,
                env={},
                system=False,
                handle_signals=False,
                **kwargs,  # type: ignore[arg-type]
            )
        )
        yield d
        nursery.cancel_scope.cancel()


async def quiet(scheduler: Scheduler) -> None:
    """
    Let the scheduler act on a clock jump, and every refresh it started end.

    First every task runs until it blocks (the refresher's loop has started what is
    due); then the refreshes in flight are waited for by their events, however
    long their HTTP requests and writes take: no real-time sleep.
    """
    while True:
        await trio.testing.wait_all_tasks_blocked()
        busy = [s.in_flight for s in scheduler.refresher.slots.values() if s.in_flight is not None]
        if not busy:
            return
        for done in busy:
            await done.wait()


class NewTasks(trio.abc.Instrument):
    """
    The trio tasks started since it was added (`watch_tasks`), as trio reports them.

    `ended()` waits until every one has exited: what the daemon started after a jump
    (a refresh, a notify command and the tasks that read its output) has finished. It
    waits on a threading.Event the instrument sets, never for a length of time.
    """

    def __init__(self) -> None:
        self.live: set[trio.lowlevel.Task] = set()
        self.none_left = threading.Event()
        self.none_left.set()

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.live.add(task)
        self.none_left.clear()

    def task_exited(self, task: trio.lowlevel.Task) -> None:
        self.live.discard(task)
        if not self.live:
            self.none_left.set()

    async def ended(self, seconds: float = 30.0) -> None:
        """Return once every task started since it was added has exited."""
        while True:
            await trio.testing.wait_all_tasks_blocked()
            if not self.live:
                return
            assert await trio.to_thread.run_sync(self.none_left.wait, seconds), self.live


@asynccontextmanager
async def watch_tasks() -> AsyncIterator[NewTasks]:
    """Track the tasks started from now on, in this trio run."""
    tasks = NewTasks()
    trio.lowlevel.add_instrument(tasks)
    try:
        yield tasks
    finally:
        trio.lowlevel.remove_instrument(tasks)


async def eventually(condition: Callable[[], bool], *, seconds: float = 10.0) -> None:
    """Wait in real time (in a thread, so a MockClock does not matter) until condition holds."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await trio.to_thread.run_sync(time.sleep, 0.005)


def helper(
    *args: str, socket: Path, stdin: str | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run the installed `mailoauth` as mail programs do."""
    return subprocess.run(
        [str(MAILOAUTH), "--socket", str(socket), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class DaemonProcess:
    """`mailoauthd --config PATH` as a subprocess, its stderr collected."""

    def __init__(self, config_path: Path, socket: Path, log_path: Path) -> None:
        self.socket = socket
        self.log_path = log_path
        self._log = log_path.open("ab")
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        self.proc = subprocess.Popen(
            [str(MAILOAUTHD), "--config", str(config_path)],
            stdout=self._log,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            env=env,
        )

    def wait_ready(self, seconds: float = 15.0) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"mailoauthd exited {self.proc.returncode}: {self.log()}")
            if self.socket.exists():
                status = helper("status", "--json", socket=self.socket)
                if status.returncode == 0:
                    return
            time.sleep(0.02)
        raise AssertionError(f"mailoauthd not ready: {self.log()}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def events(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.log().splitlines() if line.startswith("{")]

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=20)
        finally:
            self._log.close()


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[[Path], DaemonProcess]]:
    """Start real daemons; every one is stopped at the end of the test."""
    started: list[DaemonProcess] = []

    def start(config_path: Path, *, wait: bool = True) -> DaemonProcess:
        cfg = config.load(config_path)
        assert cfg.daemon.socket is not None
        proc = DaemonProcess(config_path, cfg.daemon.socket, tmp_path / f"daemon{len(started)}.log")
        started.append(proc)
        if wait:
            proc.wait_ready()
        return proc

    yield start  # type: ignore[misc]
    for proc in started:
        if proc.proc.poll() is None:
            proc.proc.kill()
            proc.proc.wait()
        proc._log.close()


# --- Test levels -------------------------------------------------------------------------
# Two levels, both run by `make test`: unit tests run in this process (`make unit` runs only
# these), integration tests start real programs (the daemon, the helper, mail clients,
# etcd, ...) as subprocesses. A test is integration when it lives in one of these places,
# uses one of these fixtures or is marked; otherwise it must not start a process, and a
# guard fails it if it does, so the unit level stays in-process and no mark is forgotten.

TESTS = Path(__file__).parent
# Whole suites whose every test runs real programs.
INTEGRATION_PATHS = (
    TESTS / "e2e",
    TESTS / "reliability",
    TESTS / "fleet",
    TESTS / "test_systemd.py",
)
# Fixtures that start `mailoauthd` as a program; a fixture built on one inherits it.
INTEGRATION_FIXTURES = frozenset({"start_daemon"})
# Any other test that starts a program carries `@pytest.mark.integration` in its file.


def is_integration(item: pytest.Item) -> bool:
    """Whether a test belongs to the integration level (explicitly or by place or fixture)."""
    if item.get_closest_marker("integration") is not None:
        return True
    if any(item.path == p or p in item.path.parents for p in INTEGRATION_PATHS):
        return True
    return not INTEGRATION_FIXTURES.isdisjoint(getattr(item, "fixturenames", ()))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the integration tests, so that `-m "not integration"` selects the unit level."""
    for item in items:
        if is_integration(item) and item.get_closest_marker("integration") is None:
            item.add_marker(pytest.mark.integration)


class SpawnInUnitTest(AssertionError):
    """A test not marked integration started a process."""


@contextmanager
def no_processes(item: pytest.Item) -> Iterator[None]:
    """In a unit test, refuse every way the standard library starts a process.

    The refusal raises at once, and the phase fails afterwards even if the code under test
    caught the error (a configured command that "failed" must not pass as tested).
    """
    if item.get_closest_marker("integration") is not None:
        yield
        return
    tried: list[str] = []

    def refuse(name: str) -> Callable[..., object]:
        def refused(*args: object, **kwargs: object) -> object:
            tried.append(f"{name}{args[1:2] if name == 'subprocess.Popen' else args[:1]}")
            raise SpawnInUnitTest(f"{item.nodeid} starts a process; mark it integration")

        return refused

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(subprocess.Popen, "__init__", refuse("subprocess.Popen"))
        for name in ("fork", "posix_spawn", "posix_spawnp", "system"):
            mp.setattr(os, name, refuse(f"os.{name}"))
        yield
    if tried:
        raise SpawnInUnitTest(
            f"{item.nodeid} is not marked integration but started a process: {tried[0]}"
        )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    """Fixtures of any scope set up for a unit test are guarded too."""
    with no_processes(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    with no_processes(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """The test's own teardown is guarded; not the end of a module or of the session, where
    pytest also tears down the shared fixtures (an e2e Dovecot, a module's system users) of
    the integration tests that came before, whatever test happens to be the last."""
    if nextitem is None or nextitem.path != item.path:
        return (yield)
    with no_processes(item):
        return (yield)


# --- Hypothesis on a shared machine ------------------------------------------------------
# The too-slow health check times the first examples' generation by the wall clock, so a
# busy machine (two cores, other suites running) failed a test whose data were fine. The
# other health checks (filters, data too large) and every test's examples stay as they are.
hypothesis.settings.register_profile(
    "mailoauthd", suppress_health_check=[hypothesis.HealthCheck.too_slow]
)
hypothesis.settings.load_profile("mailoauthd")
