"""``scripts/benchmark_loss.py`` on a tiny shape: it runs, the chunked loss equals the standard one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = [sys.executable, str(Path(__file__).resolve().parents[1] / "scripts" / "benchmark_loss.py")]
TINY = [
    "--seq-len",
    "128",
    "--vocab",
    "4096",
    "--hidden",
    "64",
    "--layers",
    "2",
    "--steps",
    "1",
    "--threads",
    "1",
]


def test_benchmark_runs_and_the_losses_agree(tmp_path: Path) -> None:
    out = tmp_path / "loss.json"
    run = subprocess.run(
        [*SCRIPT, *TINY, "--chunks", "0", "32", "--out", str(out)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| standard |" in run.stdout and "| 32 |" in run.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [r["chunk"] for r in rows] == [0, 32]
    assert abs(rows[1]["loss"] - rows[0]["loss"]) < 1e-5
    assert rows[0]["time_ratio"] == 1.0  # the baseline of the ratios


def test_the_baseline_must_be_the_standard_loss() -> None:
    run = subprocess.run([*SCRIPT, *TINY, "--chunks", "32"], capture_output=True, text=True)
    assert run.returncode == 2 and "--chunks must start with 0" in run.stderr
