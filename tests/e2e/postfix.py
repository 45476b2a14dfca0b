"""
A Postfix instance of the test's own: its configuration and queue in a temp dir, its
ports on 127.0.0.1, started with `postfix -c DIR` (root) and stopped at the end. The
system's Postfix (/etc/postfix) is neither read nor started.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from pathlib import Path

from .mailservers import free_port, wait_for_port

# Every service the tests use; proxymap runs as root (unprivileged "n"), whom the daemon
# under test serves (in production it runs as postfix, and the account has
# allow_users = ["postfix"]).
MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - n n - - proxymap
smtp unix - - n - - smtp
relay unix - - n - - smtp
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
"""


class Postfix:
    """`postfix -c ROOT`: relays everything from 127.0.0.1 to `relayhost`."""

    def __init__(self, root: Path, *, main: str) -> None:
        self.root = root
        root.mkdir(mode=0o755)
        self.port = free_port()
        (root / "queue").mkdir()
        (root / "data").mkdir()
        shutil.chown(root / "data", "postfix")
        (root / "main.cf").write_text(f"""\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = localhost
mydestination =
local_recipient_maps =
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
maillog_file_prefixes = {root}
maillog_file = {root}/maillog
smtp_tls_security_level = none
# No DNS on a test machine: no reverse lookups of clients, none for the relay host.
smtpd_peername_lookup = no
smtp_host_lookup = native
{main}
""")
        (root / "master.cf").write_text(MASTER_CF.format(port=self.port))
        self.started = False

    def postfix(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["/usr/sbin/postfix", "-c", str(self.root), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def start(self) -> None:
        run = self.postfix("start")
        self.started = True
        if run.returncode != 0:
            raise AssertionError(f"postfix did not start: {run.stderr} {self.log()}")
        wait_for_port(self.port)

    def log(self) -> str:
        path = self.root / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.started:
            if self.postfix("stop").returncode != 0:
                self.postfix("abort")
            self.started = False
            deadline = time.monotonic() + 15
            while self.postfix("status").returncode == 0 and time.monotonic() < deadline:
                time.sleep(0.1)
        with contextlib.suppress(OSError):
            shutil.rmtree(self.root)
