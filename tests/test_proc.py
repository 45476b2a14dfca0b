"""No core files with tokens (issue 10, section 5): the daemon forbids core dumps of itself."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import DaemonProcess, config_text

from mailoauthd.testing import DevProvider


@pytest.mark.integration
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl and /proc are Linux's")
def test_forbid_sets_the_process_non_dumpable() -> None:
    """forbid() turns PR_GET_DUMPABLE to 0 and the core size limit to 0."""
    code = (
        "import resource; from mailoauthd import proc; "
        "before = proc.dumpable(); problems = proc.forbid_core_dumps(); "
        "print(before, proc.dumpable(), resource.getrlimit(resource.RLIMIT_CORE), problems)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "True False (0, 0) []"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/PID/limits is Linux's")
def test_the_daemon_dumps_no_core(
    tmp_path: Path, provider: DevProvider, start_daemon: Callable[[Path], DaemonProcess]
) -> None:
    """The running daemon's core file size limit is 0 (and it logged no failure to set it)."""
    path = tmp_path / "config.toml"
    path.write_text(config_text(tmp_path, provider))
    d = start_daemon(path)
    limits = Path(f"/proc/{d.proc.pid}/limits").read_text()
    core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
    assert core.split()[4:6] == ["0", "0"]
    assert "core_dumps_possible" not in d.log()
