"""
The last resort (issue #10, §1): a fault nobody foresaw in a background task is logged
(its type and place, never its message) and the daemon goes on.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
import structlog
import structlog.testing
import trio
import trio.testing
from conftest import eventually

from mailoauthd import config
from mailoauthd.lastresort import guarded
from mailoauthd.refresh.alerts import NEEDS_AUTHORIZATION, Reminders

RECORDER = "import sys; open(sys.argv[1], 'a').write(sys.argv[2] + '\\n')"


@pytest.mark.integration
async def test_a_notify_command_that_cannot_start_ends_nothing(tmp_path: Path) -> None:
    """A command that cannot start (here a NUL byte in its argv; a NUL in a provider's
    error_description did it before provider text was cleaned) raises ValueError at the
    start; that used to end the daemon, and again at every start. Now it is logged
    without the argument, and the next alert's command runs."""
    out = tmp_path / "out"
    provider = config.Provider(name="p", client_id="c")
    accounts = [
        config.Account(
            name=name,
            provider=provider,
            notify_command=(sys.executable, "-c", RECORDER, str(out), argument),
        )
        for name, argument in (("bad", "secret\0x"), ("good", "good"))
    ]
    reminders = Reminders(env={"PATH": "/usr/bin:/bin"}, now=lambda: datetime.now(UTC))
    with structlog.testing.capture_logs() as logs:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await nursery.start(reminders.run)
                reminders.raise_alert(
                    accounts[0], NEEDS_AUTHORIZATION, message="fine", action="", repeat=False
                )
                await trio.sleep(0.5)
                reminders.raise_alert(
                    accounts[1], NEEDS_AUTHORIZATION, message="fine", action="", repeat=False
                )
                await eventually(out.exists)
                nursery.cancel_scope.cancel()
    assert out.read_text() == "good\n"
    failed = [e for e in logs if e["event"] == "notify.failed"]
    assert [e["account"] for e in failed] == ["bad"]
    assert not [e for e in logs if e["event"] == "task.failed"]
    assert "secret" not in repr(logs)


async def test_guarded_restarts_a_lifelong_task(autojump_clock: trio.testing.MockClock) -> None:
    """A lifelong task that fails is logged and started again after RESTART_DELAY."""
    runs = []

    async def flaky() -> None:
        runs.append(1)
        if len(runs) < 3:
            raise KeyError("a value that must not be logged")

    with structlog.testing.capture_logs() as logs:
        await guarded("flaky", flaky, restart=True)
    assert len(runs) == 3
    assert [e["error"] for e in logs] == ["KeyError", "KeyError"]
    assert "must not" not in repr(logs)
    assert all("test_lastresort.py" in e["at"] for e in logs)
