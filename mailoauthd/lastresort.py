"""
The last resort: a fault nobody foresaw is logged, and the daemon goes on serving.

Every connection and every background task runs under one of these. The log
names the exception's type and where it was raised (file and line), never its
message or arguments: those may hold a token, a secret or a client's bytes.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
import trio

log = structlog.get_logger(__name__)

# A background task that keeps failing is restarted at most this often.
RESTART_DELAY = 5.0


def where(exc: BaseException) -> str:
    """`file.py:123 in function` of the innermost frame; no values, no message."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "unknown"
    last = frames[-1]
    return f"{os.path.basename(last.filename)}:{last.lineno} in {last.name}"


def fault(event: str, exc: BaseException, **fields: object) -> None:
    """Log an unforeseen exception: its type and place only."""
    log.error(event, error=type(exc).__name__, at=where(exc), **fields)


async def guarded(
    name: str, task: Callable[..., Awaitable[Any]], *args: object, restart: bool = False
) -> None:
    """
    Run a background task; an unforeseen exception is logged instead of ending the daemon.

    Args:
        name: the task, for the log.
        task: the coroutine function.
        restart: run it again (after RESTART_DELAY) when it fails; for tasks that
            must run for the daemon's whole life.
    """
    while True:
        try:
            await task(*args)
            return
        except Exception as exc:  # the last resort: anything that is not a cancellation
            fault("task.failed", exc, task=name, restarting=restart)
        if not restart:
            return
        await trio.sleep(RESTART_DELAY)
