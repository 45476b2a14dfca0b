"""
The daemon's listening socket: bound here (0700 directory, stale socket replaced),
or inherited from systemd (socket activation, sd_listen_fds(3)).
"""

from __future__ import annotations

import os
import socket as stdsocket
import stat
from collections.abc import Mapping
from pathlib import Path

import structlog

from mailoauthd.errors import MailoauthdError
from mailoauthd.storage.fsutil import make_directories

log = structlog.get_logger(__name__)

# systemd's first passed file descriptor (sd_listen_fds(3)).
SD_LISTEN_FDS_START = 3


def listen_fds(env: Mapping[str, str], pid: int) -> list[int]:
    """
    The file descriptors systemd passed us for socket activation (sd_listen_fds(3)).

    Args:
        env: the environment: LISTEN_PID and LISTEN_FDS.
        pid: our pid; descriptors meant for another process (a parent) are not ours.
    """
    count = env.get("LISTEN_FDS", "")
    if env.get("LISTEN_PID") != str(pid) or not count.isdigit():
        return []
    return list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)))


def inherited(fd: int) -> stdsocket.socket:
    """
    Take over a listening Unix stream socket passed by systemd (or systemd-socket-activate).

    Raises:
        MailoauthdError: the descriptor is not a listening Unix stream socket.
    """
    try:
        sock = stdsocket.socket(fileno=fd)
    except OSError as exc:
        raise MailoauthdError(f"the socket passed as fd {fd} is unusable: {exc}") from exc
    listening = sock.getsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_ACCEPTCONN)
    if sock.family != stdsocket.AF_UNIX or sock.type != stdsocket.SOCK_STREAM or not listening:
        sock.detach()  # not ours to close
        raise MailoauthdError(
            f"fd {fd} passed by systemd is not a listening Unix stream socket",
            hint="use ListenStream= with a path in mailoauthd.socket",
        )
    # Secret commands we run must not inherit the listener.
    sock.set_inheritable(False)
    sock.setblocking(False)
    return sock


def bind(path: Path, *, public: bool = False) -> stdsocket.socket:
    """
    Bind a listening Unix socket at `path`, in a 0700 directory of ours.

    A stale socket left by a crash is replaced; a live one (another daemon
    answering) is an error. A `public` socket (system mode) is 0666 in a
    directory others may pass through: every local user may connect, and each
    request is then decided by who sent it (SO_PEERCRED), not by the file mode.

    Raises:
        MailoauthdError: the path is in use or unusable, with what to do.
    """
    directory = path.parent
    try:
        # Missing parents 0700 (0755 for a public socket, which others must reach), and
        # the directory itself 0700 or 0755, whatever the umask (000 or UMask=0077).
        make_directories(
            directory, mode=0o755 if public else 0o700, parents_mode=0o755 if public else 0o700
        )
        info = os.lstat(directory)
    except OSError as exc:
        raise MailoauthdError(f"cannot create the socket directory {directory}: {exc}") from exc
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise MailoauthdError(
            f"the socket directory {directory} is not a directory of ours",
            hint="remove it or choose another socket path",
        )
    if public and info.st_mode & 0o001 == 0:
        log.warning(
            "socket.private_directory",
            directory=str(directory),
            why="other users cannot reach the socket; make the directory 0755",
        )
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise MailoauthdError(f"{path} exists and is not a socket", hint="remove it")
        probe = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            os.unlink(path)  # nobody answers: left behind by a crash
        else:
            raise MailoauthdError(
                f"another mailoauthd is already listening on {path}",
                hint="stop it first, or give this one another socket path",
            )
        finally:
            probe.close()
    sock = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    old_umask = os.umask(0o111 if public else 0o177)  # created 0666 or 0600
    try:
        sock.bind(str(path))
        # As deep as the kernel allows (net.core.somaxconn): mail programs connect in
        # bursts, and a full queue makes connect() fail at once on a Unix socket.
        sock.listen(stdsocket.SOMAXCONN)
    except OSError as exc:
        sock.close()
        raise MailoauthdError(f"cannot listen on {path}: {exc.strerror or exc}") from exc
    finally:
        os.umask(old_umask)
    sock.setblocking(False)
    return sock
