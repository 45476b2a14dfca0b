"""
The daemon process's own limits, set once at start: no core dumps, enough descriptors.

- Non-dumpable (prctl PR_SET_DUMPABLE 0): no core file holds the tokens in
  memory, and other processes of our uid cannot ptrace us or read /proc/PID/mem.
- The soft RLIMIT_NOFILE raised to the hard limit: every connection and every
  browser sign-in costs a descriptor, and the default soft limit (1024) is
  near what the connection caps allow.
"""

from __future__ import annotations

import ctypes
import resource

import structlog

log = structlog.get_logger(__name__)

PR_SET_DUMPABLE = 4  # <linux/prctl.h>
PR_GET_DUMPABLE = 3
# Far more than the connection caps need; a bound for programs we start, which inherit it.
MAX_FDS = 65536


def set_non_dumpable() -> bool:
    """prctl(PR_SET_DUMPABLE, 0); False (and a warning) where the kernel refuses."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0:
            return True
        error = ctypes.get_errno()
    except (OSError, AttributeError) as exc:
        log.warning("process.dumpable", error=type(exc).__name__)
        return False
    log.warning("process.dumpable", errno=error)
    return False


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
