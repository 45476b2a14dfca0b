"""
The optional per-account token file: the current access token, for programs that read a file.

Some programs take a password file rather than a command (fetchmail's
`passwordfile`, exim's `${readfile}`). For an account with `token_file` the
daemon writes the access token there after each refresh has been saved to the
state directory: temp file in the same directory, owner/group/mode set on it,
fsync, rename over the old one, fsync the directory. A reader sees the old
token or the new one, whole, never a mix, and never a file more open than asked.

The daemon often runs as root and gives the file to another user, who may own
a directory on the way. So the path is walked one directory at a time from /,
each opened with O_NOFOLLOW relative to the one before, and everything after
(create, chown, rename, unlink) is done relative to the last directory's
descriptor: a directory swapped for a symlink meanwhile is refused, never
followed. A directory on the way that others may write (other than a sticky
one such as /tmp, above the file's own directory) is refused, and so is a path
through the daemon's state or socket directory (`protect`).
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import stat
from pathlib import Path

from mailoauthd.config import Account
from mailoauthd.secret import Secret
from mailoauthd.storage import fsutil

# (device, inode) of directories no token file may be in: the state and socket directories.
_protected: set[tuple[int, int]] = set()
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def protect(*directories: Path) -> None:
    """Refuse token files in (or under) these directories from now on; missing ones are skipped."""
    for directory in directories:
        with contextlib.suppress(OSError):
            info = os.stat(directory)
            _protected.add((info.st_dev, info.st_ino))


def _refused(path: Path, why: str) -> OSError:
    return OSError(errno.EPERM, f"token_file {path}: {why}; refused")


def _open_directory(path: Path) -> int:
    """
    The descriptor of `path`'s directory, walked from / without following any symlink.

    Raises:
        OSError: a component is missing, a symlink, not a directory, writable by
            others, or the state or socket directory.
    """
    if not path.is_absolute() or any(part in (".", "..") for part in path.parts):
        raise _refused(path, "not an absolute path without '.' or '..'")
    parts = path.parent.parts[1:]
    fd = os.open("/", _DIRECTORY)
    try:
        walked = Path("/")
        for i, part in enumerate(parts):
            walked /= part
            try:
                inner = os.open(part, _DIRECTORY, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise _refused(
                        path, f"{walked} is a symbolic link or not a directory"
                    ) from None
                raise
            os.close(fd)
            fd = inner
            info = os.fstat(fd)
            if (info.st_dev, info.st_ino) in _protected:
                raise _refused(path, f"{walked} is mailoauthd's state or socket directory")
            last = i == len(parts) - 1
            sticky = bool(info.st_mode & stat.S_ISVTX)
            if info.st_mode & stat.S_IWOTH and (last or not sticky):
                raise _refused(path, f"every user may write to {walked}")
        return fd
    except BaseException:
        os.close(fd)
        raise


def _uid(owner: str | int | None) -> int:
    if owner is None:
        return -1  # chown's "leave as it is"
    if isinstance(owner, int):
        return owner
    try:
        return pwd.getpwnam(owner).pw_uid
    except KeyError:
        raise OSError(f"token_file_owner: there is no user {owner!r} on this system") from None


def _gid(group: str | int | None) -> int:
    if group is None:
        return -1
    if isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise OSError(f"token_file_group: there is no group {group!r} on this system") from None


def write(account: Account, token: Secret) -> Path | None:
    """
    Replace the account's token file with `token` atomically; nothing without `token_file`.

    Args:
        account: the account, with its token_file settings.
        token: the access token just saved to the state directory.

    Returns:
        The path written, or None when the account has no token file.

    Raises:
        OSError: the file could not be written; the previous one, if any, is intact.
    """
    path = account.token_file
    if path is None:
        return None
    uid, gid = _uid(account.token_file_owner), _gid(account.token_file_group)
    directory = _open_directory(path)
    try:
        fsutil.write_atomic_at(
            directory,
            path.name,
            f"{token.reveal()}\n".encode(),
            mode=account.token_file_mode,
            uid=uid,
            gid=gid,
        )
    finally:
        os.close(directory)
    return path


def remove(account: Account) -> None:
    """Delete the account's token file, if it has one (its tokens were forgotten)."""
    path = account.token_file
    if path is None:
        return
    try:
        directory = _open_directory(path)
    except FileNotFoundError:
        return  # its directory is gone, and the file with it
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path.name, dir_fd=directory)  # the entry itself: unlink follows no link
        os.fsync(directory)
    finally:
        os.close(directory)
