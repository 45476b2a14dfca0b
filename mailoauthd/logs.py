"""
structlog set-up, done once by the CLI: console on a TTY, JSON lines otherwise, native journal
entries under systemd; secrets masked.

Under systemd (JOURNAL_STREAM names our stderr) every event goes to journald as
a native entry whose fields are the event's keys (`journalctl ACCOUNT=work`,
`journalctl EVENT=request.refused`), with PRIORITY from its level. When the
journal socket cannot take an entry (no journald, a full queue, an oversized
entry) the event is written to stderr as one JSON line with a `<N>` priority
prefix, which journald's stream reader understands: nothing is lost.

The first line of defence against leaked secrets is the Secret type, which
prints as '***'. This module is the second: any event key that names a
secret is masked whatever its value, and any Secret that reaches a log line
is masked too.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import struct
import sys
from collections.abc import Mapping, MutableMapping
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


JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "mailoauthd"
# syslog priorities (journald's PRIORITY=) by structlog level.
PRIORITIES = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}
# Fields journald or we ourselves give a meaning; an event key of that name is prefixed.
_RESERVED_FIELDS = frozenset(
    "MESSAGE MESSAGE_ID PRIORITY EVENT CODE_FILE CODE_LINE CODE_FUNC ERRNO TID UNIT USER_UNIT "
    "INVOCATION_ID USER_INVOCATION_ID DOCUMENTATION SYSLOG_FACILITY SYSLOG_IDENTIFIER "
    "SYSLOG_PID SYSLOG_TIMESTAMP SYSLOG_RAW".split()
)
_FIELD_CHARS = re.compile(r"[^A-Z0-9_]")


def stderr_is_journal(env: Mapping[str, str], fd: int = 2) -> bool:
    """
    True when `fd` is the journal stream systemd connected us to (JOURNAL_STREAM=dev:ino).

    Comparing device and inode, as systemd.exec(5) advises: a child whose stderr was
    redirected inherits the variable but not the stream.
    """
    device, _, inode = env.get("JOURNAL_STREAM", "").partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        info = os.fstat(fd)
    except OSError:
        return False
    return (info.st_dev, info.st_ino) == (int(device), int(inode))


def journal_field(key: str) -> str:
    """An event key as a journal field name: upper case, [A-Z0-9_], not one of journald's."""
    name = _FIELD_CHARS.sub("_", key.upper()).lstrip("_0123456789")[:64] or "FIELD"
    return f"MAILOAUTHD_{name}"[:64] if name in _RESERVED_FIELDS else name


def journal_entry(event: Mapping[str, Any]) -> tuple[int, bytes]:
    """
    A structlog event as journald's native datagram (systemd's "Native Journal Protocol").

    Returns:
        The entry's priority, and the datagram.
    """
    fields = dict(event)
    fields.pop("timestamp", None)  # journald stamps every entry itself
    level = str(fields.pop("level", "info"))
    name = str(fields.pop("event", ""))
    priority = PRIORITIES.get(level, 6)
    # MESSAGE: what `journalctl` shows; the same in words and key=value pairs.
    pairs = " ".join(f"{key}={_plain(value)}" for key, value in fields.items())
    entry: list[tuple[str, str]] = [
        ("MESSAGE", f"{name} {pairs}".strip()),
        ("PRIORITY", str(priority)),
        ("SYSLOG_IDENTIFIER", IDENTIFIER),
        ("EVENT", name),
    ]
    entry += [(journal_field(key), _plain(value)) for key, value in fields.items()]
    data = bytearray()
    for key, value in entry:
        raw = value.encode("utf-8", "replace")
        if b"\n" in raw:
            # A value with a newline goes as KEY, newline, 64-bit little-endian length, value.
            data += key.encode() + b"\n" + struct.pack("<Q", len(raw)) + raw + b"\n"
        else:
            data += key.encode() + b"=" + raw + b"\n"
    return priority, bytes(data)


def _plain(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str)


class JournalLogger:
    """A structlog logger that sends native journal entries, and falls back to `stream`."""

    def __init__(self, path: str, stream: TextIO) -> None:
        self.path = path
        self.stream = stream
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        # Never block the daemon on a slow journald: a full queue takes the fallback.
        self._socket.setblocking(False)

    def msg(self, **event: Any) -> None:
        priority, datagram = journal_entry(event)
        try:
            self._socket.sendto(datagram, self.path)
        except OSError:  # no journald, its queue is full, or the entry is too large
            line = json.dumps(event, default=str)
            self.stream.write(f"<{priority}>{line}\n")
            self.stream.flush()

    debug = info = warning = warn = error = critical = exception = fatal = log = msg

    def close(self) -> None:
        self._socket.close()


def _as_fields(_: Any, __: str, event: MutableMapping[str, Any]) -> Mapping[str, Any]:
    """The last processor for JournalLogger: hand it the event's keys, not a string."""
    return event


def configure(
    *,
    level: str = "info",
    fmt: str = "auto",
    stream: TextIO | None = None,
    journal: str | None = None,
) -> None:
    """
    Configure structlog for the process.

    Args:
        level: "debug", "info", "warning" or "error".
        fmt: "console", "json", or "auto" (the journal under systemd, console on a TTY,
            JSON otherwise).
        stream: where lines go; stderr by default (journald stores and rotates).
        journal: journald's socket, when stderr is the journal (see `stderr_is_journal`);
            "auto" then sends native entries there.
    """
    out = stream or sys.stderr
    if fmt == "auto" and journal is not None:
        journal_logger = JournalLogger(journal, out)  # one socket for the whole process
        structlog.configure(
            processors=[
                structlog.contextvars.merge_contextvars,
                structlog.processors.add_log_level,
                redact,
                _as_fields,
            ],
            wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
            logger_factory=lambda *_: journal_logger,
            cache_logger_on_first_use=False,
        )
        return
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
