"""
No core dumps: a daemon whose memory holds refresh tokens and client secrets must not
leave them in a core file, nor let another process of the same user read its memory.

`forbid()` sets the process non-dumpable (prctl PR_SET_DUMPABLE 0: no core file, no
ptrace or /proc/PID/mem by unprivileged processes of the same uid) and its core file size
limit to 0, which also holds for the programs it starts. Linux only for the prctl; the
limit wherever `resource` exists. Failure is not fatal: it is reported to the caller.
"""

from __future__ import annotations

import ctypes
import resource
import sys

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3


def forbid() -> list[str]:
    """Forbid core dumps of this process; returns what could not be done, in words."""
    problems = []
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError) as exc:
        problems.append(f"cannot set the core file size limit to 0: {exc}")
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
                problems.append(f"prctl(PR_SET_DUMPABLE, 0) failed: errno {ctypes.get_errno()}")
        except (OSError, AttributeError) as exc:
            problems.append(f"prctl is not available: {exc}")
    return problems


def dumpable() -> bool | None:
    """Whether this process may dump core (Linux); None where it cannot be asked."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return bool(ctypes.CDLL(None).prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))
    except (OSError, AttributeError):
        return None
