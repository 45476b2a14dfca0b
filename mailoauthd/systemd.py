"""
Telling systemd: readiness, status and watchdog over sd_notify; a no-op without NOTIFY_SOCKET.

The daemon's other audience, a person, is told in alerts.py (`notify_command`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

import sdnotify


class Notifier:
    """Tells systemd what the daemon is doing. Every method is cheap and never raises."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.enabled = bool(env.get("NOTIFY_SOCKET"))
        self._sd = sdnotify.SystemdNotifier() if self.enabled else None
        if self._sd is not None and self._sd.socket is not None:
            # Never wait for the reader: a datagram socket whose reader is behind (a
            # busy or hung systemd, a test harness that stopped reading) would block
            # sendall, and with it the whole daemon. A notice that cannot go at once
            # is dropped (sdnotify swallows the BlockingIOError); the next says it again.
            self._sd.socket.setblocking(False)
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        owned = not pid or pid == str(os.getpid())
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and owned else None

    def _send(self, *lines: str) -> None:
        if self._sd is not None:
            self._sd.notify("\n".join(lines))

    def ready(self, status: str) -> None:
        self._send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self._send(f"STATUS={status}")

    def reloading(self) -> None:
        # systemd ≥ 253 (Type=notify-reload) wants the monotonic time with it.
        self._send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def close(self) -> None:
        """Close the socket to systemd; later messages are dropped."""
        sd, self._sd = self._sd, None
        if sd is not None and sd.socket is not None:
            sd.socket.close()
