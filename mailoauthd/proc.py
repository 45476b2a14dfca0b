"""
The daemon process's own limits, set once at start: no core dumps, enough descriptors.

- No core dumps (`forbid_core_dumps`): non-dumpable (prctl PR_SET_DUMPABLE 0: no core
  file holds the tokens in memory, and other processes of our uid cannot ptrace us or
  read /proc/PID/mem) and a core size limit of 0, which the programs we start inherit.
  Used by the daemon and by the trial sign-in (tokens pass through both).
- The soft RLIMIT_NOFILE raised to the hard limit: every connection and every
  browser sign-in costs a descriptor, and the default soft limit (1024) is
  near what the connection caps allow.
"""

from __future__ import annotations

import ctypes
import resource
import sys

import structlog

log = structlog.get_logger(__name__)

PR_SET_DUMPABLE = 4  # <linux/prctl.h>
PR_GET_DUMPABLE = 3
# Far more than the connection caps need; a bound for programs we start, which inherit it.
MAX_FDS = 65536


def forbid_core_dumps() -> list[str]:
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


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = MAX_FDS if hard == resource.RLIM_INFINITY else min(hard, MAX_FDS)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError) as exc:
        log.warning("process.fd_limit", soft=soft, hard=hard, error=str(exc))
        return soft
    return wanted
