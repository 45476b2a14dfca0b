"""Fixtures of the reliability suite: the run's figures, the secret ledger, and the report."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .report import render
from .support import Daemon, Figures, Ledger

_OUTCOMES: dict[str, int] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Count this suite's outcomes, for the report's verdict."""
    if "reliability/" not in report.nodeid:
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _OUTCOMES[report.outcome] = _OUTCOMES.get(report.outcome, 0) + 1


@pytest.fixture(scope="session")
def figures() -> Iterator[Figures]:
    """The run's counts; written to $MAILOAUTHD_RELIABILITY_REPORT at the end, if set."""
    collected = Figures()
    started = time.monotonic()
    yield collected
    target = os.environ.get("MAILOAUTHD_RELIABILITY_REPORT")
    if target:
        report = render(collected, seconds=time.monotonic() - started, outcomes=_OUTCOMES)
        Path(target).write_text(report)


@pytest.fixture(autouse=True)
def no_daemon_left() -> Iterator[None]:
    """Kill every daemon a test started, also when it failed: a daemon left running would
    unlink its socket path on exit, which the next run may be using."""
    before = len(Daemon.running)  # a module's daemon, started earlier, lives on
    yield
    while len(Daemon.running) > before:
        Daemon.running.pop().stop(signal.SIGKILL)


@pytest.fixture(scope="session")
def ledger(figures: Figures) -> Ledger:
    """Checks texts for secrets, and counts what it checked."""
    return Ledger(figures)
