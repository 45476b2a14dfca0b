"""`bench/run.py --only fleet --smoke`: the fleet bench runs end to end, writes its section."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.fleet.cluster import ETCD

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.mark.skipif(ETCD is None, reason="etcd is not installed (Debian: etcd-server)")
def test_fleet_bench_smoke_run_writes_its_section(tmp_path: Path) -> None:
    out = tmp_path / "performance.md"
    out.write_text("# Performance\n\nwhat was there stays\n")
    command = [sys.executable, str(ROOT / "bench" / "run.py"), "--only", "fleet", "--smoke"]
    done = subprocess.run(
        [*command, "--out", str(out)], capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert "what was there stays" in text
    assert "## A fleet on etcd" in text
    assert "| etcd writes per refresh" in text
    # Run again: the section is replaced, not added twice.
    done = subprocess.run(
        [*command, "--out", str(out)], capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.read_text().count("## A fleet on etcd") == 1
