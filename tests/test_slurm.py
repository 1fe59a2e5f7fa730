"""The SLURM launch scripts on a real (throw-away, local) SLURM cluster: ``scripts/ci_slurm.sh``.

Each test runs one check of ``scripts/ci_slurm.sh`` (which installs SLURM from Debian when missing,
starts a 2-"node" cluster on this machine, submits ``scripts/slurm/*.sbatch`` unchanged with CPU
workers, and stops its daemons by PID). Skipped when ``POD_TEST_SLURM=0``, or when SLURM is not
installed and cannot be (no root or no apt-get). By default the checks are ``badconfig``,
``single``, ``cancel`` and ``requeue`` (~3.5 minutes on 2 cores); ``POD_TEST_SLURM=all`` adds
``multi`` and ``kill``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CHECKS = ["badconfig", "single", "cancel", "requeue"]
ALL_CHECKS = ["badconfig", "single", "multi", "cancel", "kill", "requeue"]


def _skip_reason() -> str | None:
    setting = os.environ.get("POD_TEST_SLURM", "1")
    if setting == "0":
        return "POD_TEST_SLURM=0"
    if all(shutil.which(b) for b in ("sbatch", "slurmctld", "slurmd", "munged")):
        return (
            None
            if os.geteuid() == 0
            else "the local test cluster needs root (slurmd starts jobs as their owner)"
        )
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "SLURM is not installed and cannot be installed here (needs root and apt-get)"
    return None


_REASON = _skip_reason()
_CHECKS = ALL_CHECKS if os.environ.get("POD_TEST_SLURM") == "all" else DEFAULT_CHECKS

pytestmark = [pytest.mark.slow, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for all checks, so the uninterrupted reference run is made once."""
    return tmp_path_factory.mktemp("slurm")


@pytest.mark.parametrize("check", _CHECKS)
def test_ci_slurm(check: str, work: Path) -> None:
    env = dict(os.environ, POD_CI_SLURM_DIR=str(work))
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "ci_slurm.sh"), check],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, (
        f"scripts/ci_slurm.sh {check} failed ({result.returncode})\n--- stdout\n{result.stdout[-6000:]}"
        f"\n--- stderr\n{result.stderr[-6000:]}"
    )
    assert f"{check}: ok" in result.stderr, result.stderr[-3000:]
