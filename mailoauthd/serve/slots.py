"""
The socket server's connection slots: who gets one, and who is told "busy".

At most MAX_CONNECTIONS connections are served at once. In system mode the last
ADMIN_RESERVE are kept for administrators (`status`, `revoke`, fixing what the
others broke), and no one other uid holds more than MAX_PER_UID. When every slot
is taken, the connection that has waited longest without sending its line is
evicted to make room (a flood of silent connections must not lock out the mail
programs that send their line and go); only when every slot is a request being
served is the newcomer refused.

This is the admission policy alone: server.py asks `admit` for each new
connection and `release`s it when done; nothing here touches a socket.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import trio

from mailoauthd.serve.peers import Peer

# Well above what mail programs open at once, far below the fd limit.
MAX_CONNECTIONS = 512
# System mode: the slots kept for administrators, and the most one other uid holds.
ADMIN_RESERVE = 32
MAX_PER_UID = 128
BUSY = "mailoauthd is serving too many connections"

# Whether a peer is an administrator: may use the reserved slots, has no per-uid cap.
Privileged = Callable[[Peer], bool]


class Slots:
    """The connections being served, per uid, and those still waiting for their line."""

    def __init__(self, privileged: Privileged | None) -> None:
        # None: every peer is (per-user mode); else only these use the reserved slots.
        self.privileged = privileged
        self.active = 0
        self._per_uid: dict[int, int] = {}  # connections held by each uid
        # Connections still waiting for their line, oldest first: evicted when full.
        self._silent: OrderedDict[object, trio.CancelScope] = OrderedDict()

    def admit(self, peer: Peer | None) -> str | None:
        """Take a slot for a new connection (evicting a silent one if need be); or why not."""
        privileged = peer is not None and (self.privileged is None or self.privileged(peer))
        if not privileged and peer is not None and self._per_uid.get(peer.uid, 0) >= MAX_PER_UID:
            return f"uid {peer.uid} holds {MAX_PER_UID} connections already; try again later"
        limit = MAX_CONNECTIONS if privileged else MAX_CONNECTIONS - ADMIN_RESERVE
        if self.active >= limit:
            if not self._silent:  # every slot is a request being served
                return BUSY
            # The one that has waited longest without sending its line has had its chance.
            _, oldest = self._silent.popitem(last=False)
            oldest.cancel()
        self.active += 1
        if peer is not None:
            self._per_uid[peer.uid] = self._per_uid.get(peer.uid, 0) + 1
        return None

    def release(self, peer: Peer | None) -> None:
        """Give back the slot `admit` took for this peer's connection."""
        self.active -= 1
        if peer is not None:
            left = self._per_uid.pop(peer.uid, 1) - 1
            if left > 0:
                self._per_uid[peer.uid] = left

    @contextmanager
    def silent(self) -> Iterator[trio.CancelScope]:
        """While the connection waits for its line: a scope `admit` cancels to evict it."""
        with trio.CancelScope() as waiting:
            key = object()
            self._silent[key] = waiting
            try:
                yield waiting
            finally:
                self._silent.pop(key, None)
