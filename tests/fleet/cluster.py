"""A real etcd cluster on loopback for the tests: free ports, temporary data, cleaned up."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

ETCD = shutil.which("etcd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Member:
    def __init__(self, name: str, base: Path) -> None:
        self.name = name
        self.data = base / name
        self.client_port = free_port()
        self.peer_port = free_port()
        self.log_path = base / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def start(self, initial_cluster: str, state: str = "new") -> None:
        assert ETCD is not None
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    ETCD,
                    f"--name={self.name}",
                    f"--data-dir={self.data}",
                    f"--listen-client-urls={self.url}",
                    f"--advertise-client-urls={self.url}",
                    f"--listen-peer-urls={self.peer_url}",
                    f"--initial-advertise-peer-urls={self.peer_url}",
                    f"--initial-cluster={initial_cluster}",
                    f"--initial-cluster-state={state}",
                    "--initial-cluster-token=mailoauthd-test",
                    # A loaded test machine: elections not faster than it can keep up with.
                    "--heartbeat-interval=100",
                    "--election-timeout=1000",
                    "--log-outputs=stderr",
                    "--logger=zap",
                    "--log-level=warn",
                ],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def healthy(self) -> bool:
        try:
            answer = httpx.get(f"{self.url}/health", timeout=1)
        except httpx.HTTPError:
            return False
        return answer.status_code == 200 and answer.json().get("health") == "true"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)


class Cluster:
    """`size` etcd members on 127.0.0.1; use as a context manager."""

    def __init__(self, size: int = 3) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="mailoauthd-etcd-")
        base = Path(self._tmp.name)
        self.members = [Member(f"m{i}", base) for i in range(size)]
        self.initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    @property
    def endpoints(self) -> list[str]:
        return [m.url for m in self.members]

    def __enter__(self) -> Cluster:
        try:
            for member in self.members:
                member.start(self.initial)
            self.wait_healthy()
        except BaseException:
            self.close()
            raise
        return self

    def wait_healthy(self, seconds: float = 60) -> None:
        deadline = time.monotonic() + seconds
        while not all(m.healthy() for m in self.members):
            if time.monotonic() > deadline:
                logs = "\n".join(
                    m.log_path.read_text(errors="replace")[-2000:] for m in self.members
                )
                raise AssertionError(f"etcd cluster not healthy:\n{logs}")
            time.sleep(0.1)

    def restart(self, member: Member) -> None:
        member.kill()
        member.start(self.initial, state="existing")

    def close(self) -> None:
        for member in self.members:
            if member.proc is not None and member.proc.poll() is None:
                os.kill(member.proc.pid, signal.SIGCONT)
            member.kill()
        self._tmp.cleanup()

    def __exit__(self, *exc: object) -> None:
        self.close()
