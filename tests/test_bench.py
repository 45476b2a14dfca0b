"""The benchmarks (bench/, `make bench`) still run, with tiny counts; figures are not checked."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


@pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None,
    reason="the load generator needs a C compiler (bench/setup.sh installs gcc)",
)
def test_bench_smoke_run_writes_the_report(tmp_path: Path) -> None:
    """`bench/run.py --smoke` runs every benchmark end to end and writes the report."""
    out, raw = tmp_path / "performance.md", tmp_path / "figures.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--no-mutt"]
        + ["--out", str(out), "--json", str(raw)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    text = out.read_text()
    for heading in ("## Targets", "## 1. Helper latency", "## 2. Socket service", "## 3. Scale"):
        assert heading in text
    figures = json.loads(raw.read_text())
    assert figures["smoke"] is True
    # Refresh correctness holds in the smoke run too: every answer carried a
    # token valid for min_validity, and every account was refreshed.
    for result in [*figures["socket"]["runs"].values(), figures["socket"]["churn"]]:
        assert result["errors"] == result["violations"] == 0
    assert figures["scale"]["under_load"]["load_violations"] == 0
    assert all(row["stale_after"] == 0 for row in figures["scale"]["rows"])
