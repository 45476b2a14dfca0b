"""
The local IMAP/POP3/SMTP proxy and the Postfix socketmap: mail programs that know only a
user name and a password use an OAuth-only mailbox through them (docs/proxy.md).

    common.py     limits, bounded line reading, the splice, wrong-password penalties
    service.py    the listeners, the local login, the token, session counters
    upstream.py   TLS/STARTTLS and the XOAUTH2/OAUTHBEARER login to the real server
    tls.py        the upstream's TLS stream, several records per read (for the splice)
    imap.py, pop3.py, smtp.py   what each protocol says before the login
    socketmap.py  the Postfix socketmap (netstrings on a Unix socket)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import trio

from mailoauthd.config import Config
from mailoauthd.serve.access import Policy
from mailoauthd.serve.server import Peer, bind

from . import imap, pop3, smtp
from .service import Proxy, Tokens
from .socketmap import Socketmap

__all__ = ["Proxy", "run"]


def _may_use(policy: Callable[[], Policy], peer: Peer, account: str) -> bool:
    """The main socket's rules: per-user mode admits root and the daemon's user only."""
    current = policy()
    if not current.system:
        return peer.uid in (0, current.own_uid)
    return current.may_use(peer, account)


async def run(
    cfg: Config,
    tokens: Tokens,
    policy: Callable[[], Policy],
    *,
    task_status: trio.TaskStatus[Proxy] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Start the configured listeners and the socketmap; runs until cancelled."""
    proxy = Proxy(cfg.proxy, tokens, cfg.proxy_passwords())
    path: Path | None = cfg.proxy.socketmap
    sock = None
    made: tuple[int, int] | None = None
    try:
        async with trio.open_nursery() as nursery:
            handlers = {"imap": imap.handle, "pop3": pop3.handle, "smtp": smtp.handle}
            await nursery.start(proxy.serve, handlers)
            if path is not None:
                sock = bind(path, public=policy().shared)
                info = os.lstat(path)
                made = (info.st_dev, info.st_ino)
                current = policy()
                socketmap = Socketmap(
                    tokens, lambda peer, name: _may_use(policy, peer, name), groups=current.system
                )
                await nursery.start(socketmap.serve, sock)
                proxy.listening["socketmap"] = str(path)
            task_status.started(proxy)
    finally:
        if sock is not None:
            sock.close()
            with contextlib.suppress(OSError):
                info = os.lstat(path)  # type: ignore[arg-type]
                if (info.st_dev, info.st_ino) == made:
                    os.unlink(path)  # type: ignore[arg-type]
