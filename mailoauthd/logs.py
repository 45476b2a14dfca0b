"""
structlog set-up, done once by the CLI: console on a TTY, JSON lines otherwise, secrets masked.

The first line of defence against leaked secrets is the Secret type, which
prints as '***'. This module is the second: any event key that names a
secret is masked whatever its value, and any Secret that reaches a log line
is masked too.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from mailoauthd.secret import Secret

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
LEVELS["error"] = logging.ERROR

# Key names that must never carry a value into a log line.
SECRET_KEYS = frozenset(
    {
        "access_token",
        "refresh_token",
        "id_token",
        "token",
        "client_secret",
        "secret",
        "password",
        "code",
        "code_verifier",
        "verifier",
        "authorization",
    }
)


def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A structlog processor that masks secret-named keys and Secret values."""
    for key, value in event.items():
        if key.lower() in SECRET_KEYS or isinstance(value, Secret):
            event[key] = "***"
    return event


def configure(*, level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """
    Configure structlog for the process.

    Args:
        level: "debug", "info", "warning" or "error".
        fmt: "console", "json", or "auto" (console on a TTY).
        stream: where lines go; stderr by default (journald stores and rotates).
    """
    out = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if out.isatty() else "json"
    renderer: structlog.typing.Processor
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
