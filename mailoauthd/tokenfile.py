"""
The optional per-account token file: the current access token, for programs that read a file.

Some programs take a password file rather than a command (fetchmail's
`passwordfile`, exim's `${readfile}`). For an account with `token_file` the
daemon writes the access token there after each refresh has been saved to the
state directory: temp file in the same directory, owner/group/mode set on it,
fsync, rename over the old one, fsync the directory. A reader sees the old
token or the new one, whole, never a mix, and never a file more open than asked.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
from pathlib import Path

from mailoauthd.config import Account
from mailoauthd.secret import Secret


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
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        temp.unlink()  # left by a crash of an earlier daemon with our pid
    # 0600 until owner and mode are set: the token is never readable by more than asked.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temp, flags, 0o600)
    try:
        if (uid, gid) != (-1, -1):
            os.fchown(fd, uid, gid)
        os.fchmod(fd, account.token_file_mode)
        view = memoryview(f"{token.reveal()}\n".encode())
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    os.close(fd)
    try:
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    _sync_directory(path.parent)
    return path


def remove(account: Account) -> None:
    """Delete the account's token file, if it has one (its tokens were forgotten)."""
    if account.token_file is not None:
        with contextlib.suppress(FileNotFoundError):
            account.token_file.unlink()
        _sync_directory(account.token_file.parent)


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
