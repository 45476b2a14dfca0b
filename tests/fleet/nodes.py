"""
Daemons of a fleet for the tests: one configuration per node, its way to etcd through
loopback TCP relays that a test can cut (a partition), and the helper as mail programs run it.
"""

from __future__ import annotations

import base64
import os
import selectors
import socket
import subprocess
import threading
import time
from pathlib import Path

from mailoauthd.testing import DevProvider
from tests.conftest import DaemonProcess, config_text, helper

FLEET_KEY = base64.b64encode(os.urandom(32)).decode()


class Relay:
    """A loopback TCP relay to one etcd member; `cut()` drops every connection and refuses new."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.cut_off = False
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut(self) -> None:
        with self._lock:
            self.cut_off = True
            pairs, self._pairs = self._pairs, []
        for a, b in pairs:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def restore(self) -> None:
        self.cut_off = False

    def close(self) -> None:
        self._stop = True
        self.cut()
        self.listener.close()

    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.cut_off:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=1)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        selector = selectors.DefaultSelector()
        try:
            a.setblocking(False)
            b.setblocking(False)
            selector.register(a, selectors.EVENT_READ, b)
            selector.register(b, selectors.EVENT_READ, a)
            while not self.cut_off:
                for key, _ in selector.select(0.2):
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                    if not data:
                        return
                    key.data.setblocking(True)
                    key.data.sendall(data)
                    key.data.setblocking(False)
        except (OSError, ValueError):  # cut: the sockets were closed under the selector
            return
        finally:
            selector.close()
            for s in (a, b):
                s.close()


class Node:
    """One daemon of the fleet: its directory, configuration, relays to etcd, and process."""

    def __init__(
        self,
        base: Path,
        index: int,
        provider: DevProvider,
        members: list[int],
        *,
        accounts: tuple[str, ...],
        lease_ttl: int,
        account_keys: str,
        daemon_keys: str,
        prefix: str,
    ) -> None:
        self.name = f"node{index}"
        self.prefix = prefix
        self.dir = base / self.name
        self.dir.mkdir(parents=True)
        self.relays = [Relay(port) for port in members]
        key = self.dir / "fleet.key"
        key.write_text(FLEET_KEY + "\n")
        key.chmod(0o600)
        endpoints = ", ".join(f'"{relay.url}"' for relay in self.relays)
        text = config_text(
            self.dir,
            provider,
            accounts=accounts,
            account_keys=account_keys,
            daemon_keys=daemon_keys,
        )
        text += f"""
[store]
backend = "etcd"
endpoints = [{endpoints}]
prefix = "{prefix}"
lease_ttl = "{lease_ttl}s"
encryption_key_file = "{key}"
"""
        self.config = self.dir / "config.toml"
        self.config.write_text(text)
        self.socket = self.dir / "run" / "socket"
        self.proc: DaemonProcess | None = None
        self.starts = 0
        self.paused = False

    def start(self, wait: bool = True) -> None:
        self.starts += 1
        log = self.dir / f"daemon{self.starts}.log"
        self.proc = DaemonProcess(self.config, self.socket, log)
        if wait:
            self.proc.wait_ready(60)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.proc.kill()
        self.proc.proc.wait()
        self.proc._log.close()

    def pause(self) -> None:
        assert self.proc is not None
        self.paused = True
        self.proc.proc.send_signal(19)  # SIGSTOP

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.proc.send_signal(18)  # SIGCONT
        self.paused = False

    def cut(self) -> None:
        for relay in self.relays:
            relay.cut()

    def restore(self) -> None:
        for relay in self.relays:
            relay.restore()

    def token(self, account: str, timeout: float = 15) -> subprocess.CompletedProcess[str]:
        return helper("token", account, socket=self.socket, timeout=timeout)

    def status(self) -> subprocess.CompletedProcess[str]:
        return helper("status", "--json", socket=self.socket)

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-6000:]}"
            for path in sorted(self.dir.glob("daemon*.log"))
        )

    def close(self) -> None:
        if self.proc is not None and self.proc.proc.poll() is None:
            if self.paused:
                self.resume()
            self.proc.proc.kill()
            self.proc.proc.wait()
            self.proc._log.close()
        for relay in self.relays:
            relay.close()


def wait_until(condition: object, seconds: float, what: str) -> float:
    """Poll `condition()` in real time; the seconds it took."""
    start = time.monotonic()
    while not condition():  # type: ignore[operator]
        if time.monotonic() - start > seconds:
            raise AssertionError(f"not reached in {seconds} s: {what}")
        time.sleep(0.05)
    return time.monotonic() - start
