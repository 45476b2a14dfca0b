"""
Who is on the other end of a Unix socket: pid, uid, gid (SO_PEERCRED) and groups (SO_PEERGROUPS).

The kernel records these at connect(); nothing the peer sends can change them.
Used by the server (every connection) and by the proxy's socketmap listener.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket as stdsocket
import struct
from typing import NamedTuple

import trio

_PEERCRED = struct.Struct("3i")  # pid, uid, gid
# Linux's SO_PEERGROUPS (since 4.13); Python's socket module does not name it.
SO_PEERGROUPS = getattr(stdsocket, "SO_PEERGROUPS", 59)
# Room for this many supplementary groups in the first try: the most Python's getsockopt
# takes (1024 bytes). More (AD/LDAP users, up to the kernel's NGROUPS_MAX of 65536) go
# through libc's getsockopt with a buffer of the size the kernel asks for.
_GROUPS_GUESS = 256
_GID = struct.Struct("I")


class Peer(NamedTuple):
    """Who is on the other end, as the kernel says (SO_PEERCRED); made for every connection."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()  # supplementary groups, read only when asked for


def peer_of(sock: trio.socket.SocketType | stdsocket.SocketType, *, groups: bool = False) -> Peer:
    """
    The peer's pid, uid and gid (SO_PEERCRED), and with `groups` its supplementary groups.

    Raises:
        OSError: the kernel cannot tell.
    """
    raw = sock.getsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    return Peer(pid, uid, gid, _peer_groups(sock) if groups else ())


def _peer_groups(sock: trio.socket.SocketType | stdsocket.SocketType) -> tuple[int, ...]:
    """
    The peer's supplementary groups, as the kernel recorded them at connect().

    Raises:
        OSError: the kernel cannot tell (before Linux 4.13).
    """
    size = _GROUPS_GUESS * _GID.size
    try:
        raw = sock.getsockopt(stdsocket.SOL_SOCKET, SO_PEERGROUPS, size)
    except OSError as exc:
        if exc.errno != errno.ERANGE:
            raise
        raw = _peer_groups_libc(sock.fileno())
    return tuple(gid for (gid,) in _GID.iter_unpack(raw))


def _peer_groups_libc(fd: int) -> bytes:
    """
    SO_PEERGROUPS through libc, for more groups than Python's getsockopt has room for.

    Raises:
        OSError: the kernel cannot tell.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    size = ctypes.c_uint32(65536 * _GID.size)  # NGROUPS_MAX; the kernel says what it needs
    for _ in range(3):  # the kernel's answer to ERANGE is the size it needs
        buffer = ctypes.create_string_buffer(size.value)
        if (
            libc.getsockopt(fd, stdsocket.SOL_SOCKET, SO_PEERGROUPS, buffer, ctypes.byref(size))
            == 0
        ):
            return buffer.raw[: size.value]
        number = ctypes.get_errno()
        if number != errno.ERANGE:
            raise OSError(number, os.strerror(number))
    raise OSError(errno.ERANGE, "the peer's groups keep growing")
