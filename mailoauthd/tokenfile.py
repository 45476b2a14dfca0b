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
import pwd
from pathlib import Path

from mailoauthd.config import Account
from mailoauthd.fsutil import sync_directory, write_atomic
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
    write_atomic(
        path,
        f"{token.reveal()}\n".encode(),
        mode=account.token_file_mode,
        uid=_uid(account.token_file_owner),
        gid=_gid(account.token_file_group),
    )
    return path


def remove(account: Account) -> None:
    """Delete the account's token file, if it has one (its tokens were forgotten)."""
    if account.token_file is not None:
        with contextlib.suppress(FileNotFoundError):
            account.token_file.unlink()
        sync_directory(account.token_file.parent)
