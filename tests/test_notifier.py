"""systemd.Notifier never waits for its reader: a full notify socket drops a notice."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from mailoauthd.systemd import Notifier

# Far beyond a datagram socket's queue (net.unix.max_dgram_qlen is 10 by default).
NOTICES = 1000


def test_a_reader_that_never_reads_does_not_block_the_notifier(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon once froze (one thread, in sendall) when its NOTIFY_SOCKET's reader stopped
    reading: every notice must go at once or be dropped."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as reader:
        reader.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))  # sdnotify reads the environment
        notifier = Notifier({"NOTIFY_SOCKET": str(path)})
        done = threading.Event()

        def tell() -> None:
            notifier.ready("starting")
            for n in range(NOTICES):
                notifier.status(f"{n} accounts refreshed")
                notifier.watchdog()
            done.set()

        worker = threading.Thread(target=tell, daemon=True)
        worker.start()
        worker.join(timeout=10)
        assert done.is_set(), "the notifier blocked on a full notify socket"
        reader.settimeout(1)
        assert reader.recv(4096).startswith(b"READY=1")  # what fitted went out, first first
        notifier.close()
