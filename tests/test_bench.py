"""Smoke run of bench/bench_objectives.py on a small batch: it runs every update through the
functions training calls and ends with its JSON line of ratios (the README has the measurement)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_objectives_runs_and_ends_with_its_ratios(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_objectives.py"),
                          "--num_prompts=2", "--num_generations=2", "--repeat=1", "--device=cpu",
                          f"--out={tmp_path}"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    ratios = json.loads(out.stdout.strip().splitlines()[-1])
    assert ratios["bgpo_peak_16_over_1"] <= 1.2  # BGPO's memory does not grow with n_mc (P7)
    assert ratios["vrpo_ol_peak_16_over_1"] > 4  # the exp-of-mean objective's does
    assert (tmp_path / "bench_objectives.json").exists()
    assert (tmp_path / "memory_vs_nmc.png").exists()
