"""
System mode access control with real uids: users and groups made for the test, the real helper
run under each of them (setpriv), one real daemon running as root in system mode.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import USER, DaemonProcess, config_text, helper

from mailoauthd import config
from mailoauthd.testing import DevProvider

# The system's own python: the venv's lives under /root (0700), out of other users' reach.
SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(SYSTEM_PYTHON is None, reason="needs /usr/bin/python3 for other users"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create users and switch to them"),
    pytest.mark.skipif(
        not all(shutil.which(tool) for tool in ("setpriv", "useradd", "groupadd")),
        reason="needs setpriv (util-linux) and useradd/groupadd (passwd)",
    ),
]

ROLES = ("alice", "erin", "bob", "frank", "carol", "dave")


@dataclass(frozen=True)
class People:
    """Who exists for the test: role -> user name, and the two groups."""

    users: dict[str, str]
    mail_group: str  # allow_groups of "shared"
    admin_group: str  # [daemon] admin_group

    def uid(self, role: str) -> int:
        return pwd.getpwnam(self.users[role]).pw_uid


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def people() -> Iterator[People]:
    """
    Users and groups with unique names, removed at the end:

    alice   named in allow_users          erin   her uid in allow_users
    bob     mail group as a supplementary frank  mail group as his primary group
    carol   nothing                       dave   admin group as a supplementary
    """
    tag = f"mo{secrets.token_hex(3)}"
    mail, admin = f"{tag}-mail", f"{tag}-adm"
    users = {role: f"{tag}-{role}" for role in ROLES}
    made_groups: list[str] = []
    made_users: list[str] = []
    try:
        for group in (mail, admin):
            _run("groupadd", group)
            made_groups.append(group)
        extra = {"bob": ["-G", mail], "dave": ["-G", admin], "frank": ["-g", mail]}
        for role, name in users.items():
            options = extra.get(role, [])
            if "-g" not in options:
                options = ["-g", "users", *options]
            _run("useradd", "-M", "-N", "-s", "/usr/sbin/nologin", *options, name)
            made_users.append(name)
        yield People(users=users, mail_group=mail, admin_group=admin)
    finally:
        for name in made_users:
            subprocess.run(["userdel", name], capture_output=True, check=False)
        for group in made_groups:
            subprocess.run(["groupdel", group], capture_output=True, check=False)


@dataclass
class System:
    """The running system-mode daemon and what the tests need to talk to it."""

    daemon: DaemonProcess
    provider: DevProvider
    package: Path  # a world-readable copy of mailoauthd for other uids
    config_path: Path

    @property
    def socket(self) -> Path:
        return self.daemon.socket


@pytest.fixture(scope="module")
def system(people: People) -> Iterator[System]:
    """A root daemon in system mode with `shared` (allow lists) and `private` (none)."""
    base = Path(tempfile.mkdtemp(prefix="mailoauthd-access-"))
    base.chmod(0o755)  # the others' way to the socket; the daemon makes run/ and the socket
    try:
        with DevProvider() as provider:
            text = config_text(
                base,
                provider,
                accounts=("private",),
                daemon_keys=f'admin_group = "{people.admin_group}"',
            )
            text += f"""
[accounts.shared]
provider = "dev"
username = "{USER}"
allow_users = ["{people.users["alice"]}", {people.uid("erin")}]
allow_groups = ["{people.mail_group}"]
"""
            config_path = base / "config.toml"
            config_path.write_text(text)
            cfg = config.load(config_path)
            assert cfg.daemon.socket is not None
            daemon = DaemonProcess(config_path, cfg.daemon.socket, base / "daemon.log")
            try:
                daemon.wait_ready()
                for account in ("shared", "private"):
                    token = provider.issue_refresh_token(USER) + "\n"
                    run = helper("import", account, socket=daemon.socket, stdin=token)
                    assert run.returncode == 0, run.stderr
                package = base / "pkg"
                shutil.copytree(Path(__file__).parent.parent / "mailoauthd", package / "mailoauthd")
                for path in [package, *package.rglob("*")]:
                    path.chmod(0o755)
                yield System(
                    daemon=daemon, provider=provider, package=package, config_path=config_path
                )
            finally:
                daemon.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def as_user(
    people: People, system: System, role: str, *args: str, groups: str = "init"
) -> subprocess.CompletedProcess[str]:
    """
    The real helper (mailoauthd.helper.token.main) run as `role` with its uid, primary gid and
    (groups="init") its supplementary groups from the user database, or none ("clear").
    """
    if role == "root":
        return helper(*args, socket=system.socket)
    entry = pwd.getpwnam(people.users[role])
    code = (
        f"import sys; sys.path.insert(0, {str(system.package)!r}); "
        "from mailoauthd.helper.token import main; "
        f"sys.exit(main(['--socket', {str(system.socket)!r}, *{list(args)!r}]))"
    )
    assert SYSTEM_PYTHON is not None
    return subprocess.run(
        [
            "setpriv",
            f"--reuid={entry.pw_uid}",
            f"--regid={entry.pw_gid}",
            "--init-groups" if groups == "init" else "--clear-groups",
            SYSTEM_PYTHON,
            "-I",
            "-c",
            code,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


ALLOWED = [
    ("alice", "shared"),  # by name
    ("erin", "shared"),  # by uid
    ("bob", "shared"),  # supplementary group
    ("frank", "shared"),  # primary group
    ("root", "shared"),
    ("root", "private"),  # no allow lists: root and the daemon's own user
]
REFUSED = [
    ("alice", "private"),
    ("bob", "private"),
    ("carol", "shared"),
    ("carol", "private"),
    ("dave", "shared"),  # administrators manage accounts; tokens need the allow lists
    ("dave", "private"),
]


@pytest.mark.integration  # ,  # as other users, through `setpriv` and the helper
class TestTokens:
    @pytest.mark.parametrize(("role", "account"), ALLOWED)
    def test_allowed_peers_get_the_token(
        self, people: People, system: System, role: str, account: str
    ) -> None:
        """An allowed user, a member of an allowed group (either way) and root get the token."""
        run = as_user(people, system, role, "token", account)
        assert (run.returncode, run.stderr) == (0, "")
        assert system.provider.introspect(run.stdout.strip())["active"] is True

    @pytest.mark.parametrize(("role", "account"), REFUSED)
    def test_everyone_else_is_refused(
        self, people: People, system: System, role: str, account: str
    ) -> None:
        """Other users, and administrators not on the allow lists, are refused and get nothing."""
        run = as_user(people, system, role, "token", account)
        assert run.returncode == 1
        assert run.stdout == ""
        uid = people.uid(role)
        if role == "dave":
            assert f"{account}: uid {uid} administers this mailoauthd but is not in" in run.stderr
        else:
            assert f"uid {uid} may not use this mailoauthd for '{account}'" in run.stderr
        # Whatever token the account holds now, it is not in the refusal.
        token = helper("token", account, socket=system.socket).stdout.strip()
        assert token
        assert token not in run.stderr

    @pytest.mark.parametrize("role", ["alice", "carol"])
    def test_a_refusal_does_not_tell_whether_the_account_exists(
        self, people: People, system: System, role: str
    ) -> None:
        """For a non-administrator, a forbidden account and a missing one get the same answer."""
        forbidden = as_user(people, system, role, "token", "private")
        missing = as_user(people, system, role, "token", "payroll")
        assert forbidden.returncode == missing.returncode == 1
        assert forbidden.stdout == missing.stdout == ""
        assert forbidden.stderr.replace("'private'", "'payroll'") == missing.stderr
        for command in ("status", "sasl"):
            args = ("status", "private") if command == "status" else ("sasl", "private")
            other = ("status", "payroll") if command == "status" else ("sasl", "payroll")
            one, two = as_user(people, system, role, *args), as_user(people, system, role, *other)
            assert (one.returncode, one.stdout) == (two.returncode, two.stdout)
            assert one.stderr.replace("private", "payroll") == two.stderr

    def test_groups_are_those_of_the_process(self, people: People, system: System) -> None:
        """A member that dropped its supplementary groups is refused; a primary group counts."""
        dropped = as_user(people, system, "bob", "token", "shared", groups="clear")
        assert dropped.returncode == 1
        assert dropped.stdout == ""
        primary = as_user(people, system, "frank", "token", "shared", groups="clear")
        assert primary.returncode == 0, primary.stderr


@pytest.mark.integration  # ,
class TestManagement:
    @pytest.mark.parametrize(
        ("role", "visible"),
        [
            ("root", ["private", "shared"]),
            ("dave", ["private", "shared"]),
            ("alice", ["shared"]),
            ("bob", ["shared"]),
            ("carol", []),
        ],
    )
    def test_status_shows_what_each_may_see(
        self, people: People, system: System, role: str, visible: list[str]
    ) -> None:
        """Administrators see every account; others only those they are allowed."""
        run = as_user(people, system, role, "status", "--json")
        assert run.returncode == 0, run.stderr
        rows = json.loads(run.stdout)["accounts"]
        assert sorted(row["account"] for row in rows) == visible

    @pytest.mark.parametrize(
        ("role", "allowed"),
        [("root", True), ("dave", True), ("alice", False), ("carol", False)],
    )
    def test_administrative_operations(
        self, people: People, system: System, role: str, allowed: bool
    ) -> None:
        """refresh and reload are for root, the daemon's user and admin_group; others are told."""
        for args in (("refresh", "shared"), ("reload",)):
            run = as_user(people, system, role, *args)
            if allowed:
                assert run.returncode == 0, run.stderr
            else:
                assert run.returncode == 1
                assert f"'{args[0]}' is for the administrators of this mailoauthd" in run.stderr
                assert run.stdout == ""

    def test_import_by_a_non_administrator_changes_nothing(
        self, people: People, system: System
    ) -> None:
        """An allowed user cannot replace the account's grant: its token stays the same."""
        before = helper("token", "shared", socket=system.socket).stdout
        run = as_user(people, system, "alice", "import", "shared")
        assert run.returncode in (1, 2)  # refused, or no token on stdin: either way nothing
        stolen = system.provider.issue_refresh_token("mallory@example.com")
        code = (
            f"import sys; sys.path.insert(0, {str(system.package)!r}); "
            "from mailoauthd.helper.transport import request_reply; "
            "from mailoauthd import protocol; "
            f"request_reply(protocol.encode({{'v': 1, 'op': 'import', 'account': 'shared', "
            f"'refresh_token': {stolen!r}}}), {str(system.socket)!r}, 10)"
        )
        entry = pwd.getpwnam(people.users["alice"])
        assert SYSTEM_PYTHON is not None
        direct = subprocess.run(
            ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--init-groups"]
            + [SYSTEM_PYTHON, "-I", "-c", code],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert direct.returncode != 0
        assert "'import' is for the administrators" in direct.stderr
        assert helper("token", "shared", socket=system.socket).stdout == before


@pytest.mark.integration  # ,
class TestReload:
    def test_allow_lists_change_on_reload(self, people: People, system: System) -> None:
        """A user added to allow_users gets the token after `mailoauth reload`; a broken
        configuration is refused with its problems and the running one kept."""
        original = system.config_path.read_text()
        carol = people.users["carol"]
        try:
            assert as_user(people, system, "carol", "token", "shared").returncode == 1
            system.config_path.write_text(
                original.replace('allow_users = ["', f'allow_users = ["{carol}", "')
            )
            assert helper("reload", socket=system.socket).returncode == 0
            allowed = as_user(people, system, "carol", "token", "shared")
            assert allowed.returncode == 0, allowed.stderr
            system.config_path.write_text(original + "\n[accounts.broken]\nprovder = 1\n")
            broken = helper("reload", socket=system.socket)
            assert broken.returncode == 1
            assert "accounts.broken" in broken.stderr
            assert as_user(people, system, "carol", "token", "shared").returncode == 0
        finally:
            system.config_path.write_text(original)
            assert helper("reload", socket=system.socket).returncode == 0
        assert as_user(people, system, "carol", "token", "shared").returncode == 1


@pytest.mark.integration  # ,
class TestAudit:
    def test_handouts_and_refusals_are_logged(self, people: People, system: System) -> None:
        """Each hand-out is a debug event with uid, pid and program; each refusal an info event."""
        assert as_user(people, system, "alice", "token", "shared").returncode == 0
        assert as_user(people, system, "carol", "token", "shared").returncode == 1
        events = system.daemon.events()
        served = [
            e
            for e in events
            if e.get("event") == "token.served" and e["uid"] == people.uid("alice")
        ]
        assert served
        assert served[-1]["level"] == "debug"
        assert served[-1]["pid"] > 0
        assert "python" in str(served[-1]["exe"])
        refused = [
            e
            for e in events
            if e.get("event") == "request.refused" and e["uid"] == people.uid("carol")
        ]
        assert refused
        assert refused[-1]["level"] == "info"
        assert refused[-1]["reason"] == "not on the allow lists"
        assert refused[-1]["account"] == "shared"
        missing = [e for e in refused if e["reason"] == "no such account"]
        assert all(e["account"] == "payroll" for e in missing)

    def test_socket_is_open_to_local_users(self, system: System) -> None:
        """With allow lists configured, the daemon makes its socket reachable by every user."""
        assert system.socket.stat().st_mode & 0o777 == 0o666
        assert system.socket.parent.stat().st_mode & 0o777 == 0o755
        assert grp.getgrgid(system.socket.stat().st_gid)
