"""Durable file replacement, the way every file holding a secret is written. Stdlib only."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def write_atomic(
    path: Path, data: bytes, *, mode: int = 0o600, uid: int = -1, gid: int = -1
) -> None:
    """
    Replace `path` with `data`: temp file in the same directory, fsync, rename, fsync the directory.

    After a crash, either the old or the new file is there, whole. The temp
    file is created 0600 and only then given its owner and mode, so the data
    is never readable by more than asked; no symlink is followed.

    Args:
        path: the file to replace.
        data: its new content.
        mode: its permission bits.
        uid: its owner, or -1 to leave it to us.
        gid: its group, or -1 to leave it to us.

    Raises:
        OSError: the write failed (disk full, …); the previous file is intact.
    """
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        write_atomic_at(directory, path.name, data, mode=mode, uid=uid, gid=gid)
    finally:
        os.close(directory)


def write_atomic_at(
    directory: int, name: str, data: bytes, *, mode: int = 0o600, uid: int = -1, gid: int = -1
) -> None:
    """
    `write_atomic`, relative to an open directory (token_file walks its path without
    following symlinks and writes through the last directory's descriptor).
    """
    temp = f".{name}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temp, dir_fd=directory)  # left by a crash of an earlier process with our pid
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temp, flags, 0o600, dir_fd=directory)
    try:
        try:
            if (uid, gid) != (-1, -1):
                os.fchown(fd, uid, gid)
            if mode != 0o600:
                os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, name, src_dir_fd=directory, dst_dir_fd=directory)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=directory)
        raise
    os.fsync(directory)


def sync_directory(directory: Path) -> None:
    """fsync a directory, so that renames and unlinks in it survive a crash."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_directories(directory: Path, *, mode: int = 0o700, parents_mode: int = 0o700) -> bool:
    """
    Create `directory` and any missing parent with exactly these modes, whatever the umask.

    Path.mkdir(parents=True) gives the parents 0777 less the umask: 0777 under
    umask 000, where anyone could then swap what we put in them.

    Returns:
        Whether `directory` itself was created.

    Raises:
        OSError: a directory could not be created.
    """
    missing = []
    current = directory
    while not os.path.lexists(current) and current != current.parent:
        missing.append(current)
        current = current.parent
    created = False
    for path in reversed(missing):
        wanted = mode if path == directory else parents_mode
        try:
            os.mkdir(path, wanted)
        except FileExistsError:
            continue  # made meanwhile by someone else: checked by the caller as usual
        os.chmod(path, wanted, follow_symlinks=False)
        created = path == directory
    return created
