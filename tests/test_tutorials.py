"""Smoke runs of every tutorial: each runs top to bottom as a script in quick mode.

A tutorial checks its own claims with asserts, so exit code 0 means every check in it passed.
Quick mode (MINIDTRPO_TUTORIAL_QUICK=1) shrinks models and budgets so that each tutorial takes
seconds; it writes only under tutorials/out/ (git-ignored).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "tutorials").glob("[0-9][0-9]_*.py"))


def test_every_tutorial_is_collected():
    assert [p.name for p in TUTORIALS] == ["01_masked_diffusion.py", "02_trajectory_likelihoods.py",
                                           "03_policy_optimisation.py", "04_rl_in_practice.py",
                                           "05_decoding.py"]


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_runs_in_quick_mode(path):
    env = {**os.environ, "MINIDTRPO_TUTORIAL_QUICK": "1", "OMP_NUM_THREADS": "1",
           "MPLBACKEND": "Agg"}
    result = subprocess.run([sys.executable, str(path)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, (f"{path.name} failed:\n{result.stdout[-3000:]}\n"
                                    f"{result.stderr[-3000:]}")
