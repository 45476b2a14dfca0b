"""
Telling a human: refresh-token cut-offs, the notify command's environment, and, with the
daemon in-process on trio's MockClock against the development provider, when it runs.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import trio
import trio.testing
from conftest import T0, USER, eventually, in_process_daemon, make_config, mock_now, watch_tasks
from test_authorize import Conversation, browse, run_helper, sign_in_keys

from mailoauthd import config
from mailoauthd.refresh.alerts import command_env, refresh_token_deadline, warning_time
from mailoauthd.secret import Secret
from mailoauthd.storage import state
from mailoauthd.storage.state import TokenStore
from mailoauthd.testing import DevProvider

DAY = timedelta(days=1)
# The command: appends its argv and environment to a file, one JSON line a run.
RECORDER = """\
import json, os, sys
with open(sys.argv[1], "a") as f:
    f.write(json.dumps({"argv": sys.argv, "env": dict(os.environ)}) + "\\n")
"""


def provider(**limits: timedelta | None) -> config.Provider:
    return config.Provider(name="p", client_id="c", **limits)  # type: ignore[arg-type]


class TestCutOffs:
    def test_none_known(self) -> None:
        """Without limits, or without a refresh token, there is no known cut-off."""
        assert refresh_token_deadline(provider(), T0, T0) is None
        assert refresh_token_deadline(provider(refresh_token_max_age=DAY), None, None) is None

    def test_age_counts_from_issue(self) -> None:
        """refresh_token_max_age counts from when the token was issued, however used."""
        p = provider(refresh_token_max_age=7 * DAY)
        assert refresh_token_deadline(p, T0, T0 + 3 * DAY) == T0 + 7 * DAY

    def test_idle_counts_from_last_use(self) -> None:
        """refresh_token_max_idle counts from the last successful use."""
        p = provider(refresh_token_max_idle=90 * DAY)
        assert refresh_token_deadline(p, T0, T0 + 10 * DAY) == T0 + 100 * DAY
        assert refresh_token_deadline(p, T0, None) == T0 + 90 * DAY

    def test_earliest_wins(self) -> None:
        """With both limits the earlier cut-off is the one that matters."""
        p = provider(refresh_token_max_age=7 * DAY, refresh_token_max_idle=2 * DAY)
        assert refresh_token_deadline(p, T0, T0 + DAY) == T0 + 3 * DAY
        assert refresh_token_deadline(p, T0, T0 + 6 * DAY) == T0 + 7 * DAY

    def test_warning_a_day_ahead_or_half_the_limit(self) -> None:
        """The warning comes a day before the cut-off, or half-way through a shorter limit."""
        assert warning_time(provider(refresh_token_max_age=7 * DAY), T0) == T0 - DAY
        assert warning_time(provider(refresh_token_max_idle=DAY), T0) == T0 - DAY / 2

    def test_presets(self) -> None:
        """Microsoft's tokens die 90 days unused; Google's 7 days after issue in testing."""
        cfg = config.parse(
            """
            [providers.ms]
            preset = "microsoft"
            client_id = "c"
            [providers.g]
            preset = "google"
            client_id = "c"
            testing = true
            [providers.g2]
            preset = "google"
            client_id = "c"
            """,
            source="<test>",
        )
        assert cfg.providers["ms"].refresh_token_max_idle == 90 * DAY
        assert cfg.providers["g"].refresh_token_max_age == 7 * DAY
        assert cfg.providers["g2"].refresh_token_max_age is None


class TestEnvironment:
    def test_what_the_command_learns(self) -> None:
        """Account, user, profile, event, message and action; systemd's variables are not passed."""
        cfg = config.parse(
            """
            [providers.p]
            client_id = "c"
            token_endpoint = "https://id.example.com/token"
            [accounts.work]
            provider = "p"
            username = "alice@example.com"
            """,
            source="<test>",
        )
        env = command_env(
            {"PATH": "/usr/bin", "NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1", "HOME": "/h"},
            account=cfg.accounts["work"],
            event="needs_authorization",
            message="the provider rejected the refresh token (invalid_grant)",
            action="run 'mailoauth authorize work'",
        )
        assert env == {
            "PATH": "/usr/bin",
            "HOME": "/h",
            "MAILOAUTHD_ACCOUNT": "work",
            "MAILOAUTHD_USERNAME": "alice@example.com",
            "MAILOAUTHD_PROVIDER": "p",
            "MAILOAUTHD_EVENT": "needs_authorization",
            "MAILOAUTHD_MESSAGE": "the provider rejected the refresh token (invalid_grant)",
            "MAILOAUTHD_ACTION": "run 'mailoauth authorize work'",
        }


# --- in the daemon ---------------------------------------------------------------------------


@pytest.fixture
def record(tmp_path: Path) -> Path:
    """The file the notify command appends to."""
    return tmp_path / "notified.jsonl"


def notify_keys(tmp: Path, record: Path) -> str:
    script = tmp / "recorder.py"
    script.write_text(RECORDER)
    argv = json.dumps([sys.executable, str(script), str(record)])
    return f'refresh_spread = "0s"\nnotify_command = {argv}\n'


def runs(record: Path) -> list[dict[str, object]]:
    if not record.exists():
        return []
    return [json.loads(line) for line in record.read_text().splitlines()]


def seed(tmp: Path, st: state.AccountState) -> None:
    store = TokenStore(tmp / "state")
    store.open()
    store.save(st)
    store.close()


@pytest.mark.slow
class TestReminders:
    @pytest.mark.integration
    async def test_fires_once_repeats_and_stops_after_sign_in(
        self, clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path, record: Path
    ) -> None:
        """invalid_grant runs the command once, again every 6 h, and never after a sign-in."""
        cfg = make_config(
            tmp_path,
            dev,
            daemon_keys=notify_keys(tmp_path, record),
            provider_keys=sign_in_keys(dev),
        )
        refresh_token = dev.issue_refresh_token(USER)
        seeded = state.imported("work", Secret(refresh_token), T0)
        seed(
            tmp_path,
            dataclasses.replace(
                seeded, access_token=Secret("seeded-work"), expires_at=T0 + timedelta(seconds=300)
            ),
        )
        dev.revoke_user(USER)
        async with in_process_daemon(cfg, now=mock_now(clock)) as d, watch_tasks() as tasks:
            await eventually(lambda: len(runs(record)) == 1)
            first = runs(record)[0]
            env = first["env"]
            assert isinstance(env, dict)
            assert env["MAILOAUTHD_EVENT"] == "needs_authorization"
            assert env["MAILOAUTHD_ACCOUNT"] == "work"
            assert env["MAILOAUTHD_USERNAME"] == USER
            assert "invalid_grant" in env["MAILOAUTHD_MESSAGE"]
            assert "mailoauth authorize work" in env["MAILOAUTHD_ACTION"]
            for _ in range(10):  # checks and token requests come and go: no second message
                clock.jump(180)
                await tasks.ended()
            assert len(runs(record)) == 1
            clock.jump(6 * 3600 - 1800)
            await eventually(lambda: len(runs(record)) == 2)
            conv = await Conversation.start(d)
            page = await browse(str((await conv.next())["url"]))
            assert page.status_code == 200
            _, final = await conv.final()
            assert final["ok"] is True
            for _ in range(3):
                clock.jump(6 * 3600)
                await tasks.ended()
            assert len(runs(record)) == 2
        everything = json.dumps(runs(record))
        secrets = [*dev.issued_secrets(), "seeded-work", refresh_token]
        assert [s for s in secrets if s in everything] == []

    @pytest.mark.integration
    async def test_reminds_at_start_of_what_was_lost_before(
        self, clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path, record: Path
    ) -> None:
        """An account that lost its grant before a restart is reminded of at once."""
        cfg = make_config(tmp_path, dev, daemon_keys=notify_keys(tmp_path, record))
        seed(
            tmp_path,
            state.AccountState(
                account="work",
                status=state.NEEDS_AUTHORIZATION,
                last_error="the provider rejected the refresh token (AADSTS70008: expired)",
                last_error_code="needs-auth",
                failures=1,
            ),
        )
        async with in_process_daemon(cfg, now=mock_now(clock)):
            await eventually(lambda: len(runs(record)) == 1)
            env = runs(record)[0]["env"]
            assert isinstance(env, dict)
            assert "AADSTS70008" in env["MAILOAUTHD_MESSAGE"]
            assert env["MAILOAUTHD_ACTION"] == "run 'mailoauth authorize work' to sign in again"

    async def test_never_authorized_accounts_are_not_nagged(
        self, clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path, record: Path
    ) -> None:
        """A new account nobody has signed in to yet runs no command."""
        cfg = make_config(tmp_path, dev, daemon_keys=notify_keys(tmp_path, record))
        async with in_process_daemon(cfg, now=mock_now(clock)), watch_tasks() as tasks:
            await tasks.ended()
            clock.jump(7 * 3600)
            await tasks.ended()
        assert runs(record) == []

    @pytest.mark.integration
    async def test_refresh_token_cut_off_is_shown_and_warned_of_once(
        self, clock: trio.testing.MockClock, dev: DevProvider, tmp_path: Path, record: Path
    ) -> None:
        """A Google app in testing: status shows the 7-day cut-off; one warning a day before."""
        dev.set_options(refresh_token_rotation="none")  # as Google: the token is kept
        cfg = make_config(
            tmp_path,
            dev,
            daemon_keys=notify_keys(tmp_path, record),
            provider_keys='preset = "google"\ntesting = true',
        )
        issued = T0 - timedelta(days=6, hours=1)
        seed(
            tmp_path,
            dataclasses.replace(
                state.imported("work", Secret(dev.issue_refresh_token(USER)), issued),
                access_token=Secret("seeded-work"),
                expires_at=T0 + timedelta(hours=1),
                last_refresh=T0 - timedelta(minutes=5),
            ),
        )
        async with in_process_daemon(cfg, now=mock_now(clock)) as d, watch_tasks() as tasks:
            await eventually(lambda: len(runs(record)) == 1)
            env = runs(record)[0]["env"]
            assert isinstance(env, dict)
            assert env["MAILOAUTHD_EVENT"] == "refresh_token_expiring"
            assert "2026-11-02T11:00:00+00:00" in env["MAILOAUTHD_MESSAGE"]
            assert "'testing' status" in env["MAILOAUTHD_MESSAGE"]
            assert "publish the app" in env["MAILOAUTHD_ACTION"]
            row = d.scheduler.status()[0]
            assert row["refresh_token_expires_at"] == "2026-11-02T11:00:00+00:00"
            assert row["refresh_token_issued_at"] == issued.isoformat()
            assert row["refresh_token_last_used"] == "2026-11-01T11:55:00+00:00"
            table = (await run_helper("status", d=d)).stdout
            assert (
                "work: the refresh token (issued 2026-10-26T11:00:00Z, last used "
                "2026-11-01T11:55:00Z) stops working around 2026-11-02T11:00:00Z; "
                "run 'mailoauth authorize work' before then"
            ) in table
            for _ in range(5):
                clock.jump(180)
                await tasks.ended()
            assert len(runs(record)) == 1
