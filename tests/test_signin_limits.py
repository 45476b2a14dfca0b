"""
The loopback sign-in listener under attack by another local user (issue #10, §4): a flood of
connections costs at most MAX_BROWSER_CONNECTIONS descriptors and the real browser still
gets through; a port taken on [::1] by someone else is an error, not ignored. The daemon
runs in-process against the development provider.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import trio
from conftest import in_process_daemon
from test_authorize import Conversation, browse, flow_config, free_port

from mailoauthd.authorization.signin import MAX_BROWSER_CONNECTIONS
from mailoauthd.testing import DevProvider

FLOOD = 300


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_a_flood_of_connections_is_capped(provider: DevProvider, tmp_path: Path) -> None:
    cfg = flow_config(tmp_path, provider)
    async with in_process_daemon(cfg) as d:
        conv = await Conversation.start(d)
        first = await conv.next()
        port = urlsplit(str(first["redirect_uri"])).port
        before = fds()
        flood = []
        for _ in range(FLOOD):
            sock = socket.socket()
            sock.connect(("127.0.0.1", port))
            flood.append(sock)
        await trio.sleep(0.5)  # the daemon accepts what it will
        grown = fds() - before
        # Our own FLOOD client ends, and no more than the cap of accepted ones.
        assert grown <= FLOOD + MAX_BROWSER_CONNECTIONS + 2, grown
        for sock in flood:
            sock.close()
        with trio.fail_after(20):
            page = await browse(str(first["url"]))
        assert page.status_code == 200, page.text
        events, final = await conv.final()
        assert final["ok"] is True, final


async def test_a_port_taken_on_the_ipv6_loopback_is_an_error(
    provider: DevProvider, tmp_path: Path
) -> None:
    """For `localhost` redirects (Microsoft) the browser may go to [::1]: if another
    program holds the port there, the sign-in must not go ahead (it used to be ignored)."""
    port = free_port()
    thief = socket.socket(socket.AF_INET6)
    try:
        thief.bind(("::1", port))
    except OSError:
        thief.close()
        pytest.skip("no IPv6 loopback here")
    thief.listen(1)
    try:
        cfg = flow_config(
            tmp_path,
            provider,
            provider_keys=f'preset = "microsoft"\nredirect_port = {port}\n',
        )
        async with in_process_daemon(cfg) as d:
            conv = await Conversation.start(d)
            with trio.fail_after(20):  # it used to go ahead and wait for a browser
                events, final = await conv.final()
        assert final["ok"] is False, (events, final)
        assert "[::1]" in str(final["message"]), final
        assert not events
    finally:
        thief.close()
