"""
Telling a person: `notify_command` runs when an account newly needs a person, and again
every `notify_interval` until it is fixed; refresh-token cut-offs and the warning before them.

The command is an argv list from the configuration, run without a shell; it
learns the account, the event and what to do from MAILOAUTHD_* environment
variables. Nothing secret is ever put there or on its command line: messages
are the same words `mailoauth status` shows. (Telling systemd is systemd.py.)
"""

from __future__ import annotations

import dataclasses
import subprocess
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta

import structlog
import trio

from mailoauthd.config import Account, Provider
from mailoauthd.lastresort import guarded
from mailoauthd.protocol import Status
from mailoauthd.provider.provider_input import MAX_MESSAGE, clean_text

log = structlog.get_logger(__name__)

# 30 s: long enough for a mailer or a chat webhook, short enough that a hung
# command cannot pile up behind the next reminder.
COMMAND_TIMEOUT_SECONDS = 30
# Wake up at least this often to look at the wall clock again (suspend/resume).
MAX_WAIT_SECONDS = 37
# Warn this long before a refresh token's known cut-off: a day's notice to sign
# in again at a convenient moment; for short limits, half of the limit.
AGE_WARNING = timedelta(days=1)
# Variables of ours the command must not inherit: systemd's belong to the daemon.
_DROPPED = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")

# The events a person is told of: an account newly in that status (protocol.Status),
# and a refresh token near its cut-off.
NEEDS_AUTHORIZATION = Status.NEEDS_AUTHORIZATION
REFRESH_TOKEN_EXPIRING = "refresh_token_expiring"  # noqa: S105 - an event's name


def refresh_token_deadline(
    provider: Provider, issued_at: datetime | None, last_used: datetime | None
) -> datetime | None:
    """
    When a refresh token stops working, as far as the profile's limits say; None if unknown.

    Args:
        provider: its refresh_token_max_age and refresh_token_max_idle.
        issued_at: when we got the refresh token.
        last_used: when we last used it successfully (None: not since it was issued).
    """
    if issued_at is None:
        return None
    limits = []
    if provider.refresh_token_max_age is not None:
        limits.append(issued_at + provider.refresh_token_max_age)
    if provider.refresh_token_max_idle is not None:
        limits.append(max(issued_at, last_used or issued_at) + provider.refresh_token_max_idle)
    return min(limits) if limits else None


def warning_time(provider: Provider, deadline: datetime) -> datetime:
    """When to warn about a cut-off at `deadline`."""
    limits = [x for x in (provider.refresh_token_max_age, provider.refresh_token_max_idle) if x]
    ahead = min([AGE_WARNING, *(limit / 2 for limit in limits)])
    return deadline - ahead


def command_env(
    base: Mapping[str, str], *, account: Account, event: str, message: str, action: str
) -> dict[str, str]:
    """
    The environment of one notify_command run.

    Args:
        base: the daemon's environment (PATH, HOME, DISPLAY, DBUS_SESSION_BUS_ADDRESS …).
        account: what it is about.
        event: needs_authorization or refresh_token_expiring.
        message: what happened, as `mailoauth status` says it.
        action: what to do, e.g. "run 'mailoauth authorize work'".
    """
    env = {k: v for k, v in base.items() if k not in _DROPPED and not k.startswith("MAILOAUTHD_")}
    env.update(
        MAILOAUTHD_ACCOUNT=account.name,
        MAILOAUTHD_USERNAME=account.username or "",
        MAILOAUTHD_PROVIDER=account.provider.name,
        MAILOAUTHD_EVENT=event,
        # Provider text may be in these: no NUL (which no environment can hold) nor
        # other control characters, and bounded, whatever an older state file held.
        MAILOAUTHD_MESSAGE=clean_text(message, MAX_MESSAGE),
        MAILOAUTHD_ACTION=clean_text(action, MAX_MESSAGE),
    )
    return env


@dataclasses.dataclass(eq=False)
class _Alert:
    account: Account
    event: str
    message: str
    action: str
    repeat: bool
    due: datetime
    running: bool = False


class Reminders:
    """The alerts that wait for a person, and the runs of their notify_command."""

    def __init__(self, *, env: Mapping[str, str], now: Callable[[], datetime]) -> None:
        self.env = dict(env)
        self.now = now
        self._alerts: dict[tuple[str, str], _Alert] = {}
        self._wakeup = trio.Event()

    def raise_alert(
        self, account: Account, event: str, *, message: str, action: str, repeat: bool
    ) -> None:
        """
        Tell a person now, and every notify_interval after if `repeat`, until `clear`.

        An alert already raised for the account and event keeps its schedule: a
        second failure does not mean a second message.
        """
        key = (account.name, event)
        if key in self._alerts:
            alert = self._alerts[key]
            alert.account, alert.message, alert.action = account, message, action
            return
        self._alerts[key] = _Alert(account, event, message, action, repeat, due=self.now())
        self._wakeup.set()

    def clear(self, name: str, event: str = NEEDS_AUTHORIZATION) -> None:
        """A person has acted: no more reminders of `event` for account `name`."""
        self._alerts.pop((name, event), None)

    def reconfigure(self, accounts: Mapping[str, Account]) -> None:
        """Adopt reloaded accounts (their commands and intervals); forget removed ones."""
        for key, alert in list(self._alerts.items()):
            if key[0] in accounts:
                alert.account = accounts[key[0]]
            else:
                del self._alerts[key]
        self._wakeup.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run due commands forever; `started` at once."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                now = self.now()
                wake = now + timedelta(seconds=MAX_WAIT_SECONDS)
                for key, alert in list(self._alerts.items()):
                    if alert.due <= now:
                        if not alert.running:
                            alert.running = True
                            # Under the last resort: a command that cannot be started
                            # for a reason nobody foresaw must not end the daemon.
                            nursery.start_soon(guarded, "notify_command", self._run_command, alert)
                        if alert.repeat:
                            alert.due = now + alert.account.notify_interval
                        else:
                            del self._alerts[key]
                    if key in self._alerts:
                        wake = min(wake, alert.due)
                self._wakeup = trio.Event()
                with trio.move_on_after(max(0.0, (wake - self.now()).total_seconds())):
                    await self._wakeup.wait()

    async def _run_command(self, alert: _Alert) -> None:
        # Any fault beyond what _run_command_once handles goes to the caller's last
        # resort (lastresort.guarded), which logs it and keeps the daemon going.
        try:
            await self._run_command_once(alert)
        finally:
            alert.running = False

    async def _run_command_once(self, alert: _Alert) -> None:
        try:
            argv = alert.account.notify_command
            if not argv:
                return
            env = command_env(
                self.env,
                account=alert.account,
                event=alert.event,
                message=alert.message,
                action=alert.action,
            )
            fields = {"account": alert.account.name, "notify_event": alert.event}
            try:
                with trio.move_on_after(COMMAND_TIMEOUT_SECONDS) as scope:
                    done = await trio.run_process(
                        list(argv),
                        env=env,
                        stdin=b"",
                        stdout=subprocess.DEVNULL,
                        capture_stderr=True,
                        check=False,
                    )
            except (OSError, ValueError) as exc:
                # ValueError: something in argv or env the kernel cannot take.
                error = exc.strerror if isinstance(exc, OSError) else None
                log.error("notify.failed", **fields, program=argv[0], error=error or str(exc))
                return
            if scope.cancelled_caught:
                log.error("notify.failed", **fields, program=argv[0], error="timed out, killed")
            elif done.returncode:
                stderr = " ".join(done.stderr.decode("utf-8", "replace").split())[:200]
                log.warning(
                    "notify.failed",
                    **fields,
                    program=argv[0],
                    status=done.returncode,
                    stderr=stderr,
                )
            else:
                log.info("notify.sent", **fields, program=argv[0])
        finally:
            alert.running = False
