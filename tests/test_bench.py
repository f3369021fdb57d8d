"""Smoke runs of the benchmarks on small sizes: each runs its updates through the functions training
calls and ends with its JSON line (docs/results.md has the measurements). Rows and memory are
asserted, never seconds: timings belong to the benchmarks themselves."""

import importlib.util
import json
import os
import subprocess
import sys

import torch

from minidtrpo.tasks import get_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_objectives_runs_and_ends_with_its_ratios(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_objectives.py"),
                          "--num_prompts=2", "--num_generations=2", "--repeat=1", "--device=cpu",
                          f"--out={tmp_path}"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    ratios = json.loads(out.stdout.strip().splitlines()[-1])
    assert ratios["bgpo_peak_16_over_1"] <= 1.2  # BGPO's memory does not grow with n_mc (P7)
    assert ratios["vrpo_ol_peak_16_over_1"] > 4  # the exp-of-mean objective's does in one graph
    assert ratios["vrpo_ol_two_pass_peak_16_over_1"] <= 1.2  # and not in two passes
    assert (tmp_path / "bench_objectives.json").exists()
    assert (tmp_path / "memory_vs_nmc.png").exists()


def test_bench_scaling_runs_and_ends_with_its_json_line(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_scaling.py"),
                          "--quick", "--repeat=1", "--device=cpu", f"--out={tmp_path}"],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(line) >= {"T_B", "dtrpo_over_exact", "n_mc", "bgpo_memory_ratio",
                         "vrpo_ol_memory_ratio", "vrpo_ol_two_pass_memory_ratio", "dial"}
    # the dial: K = 1, 2, 4 (, 8) of T_B = 4, 8 in one pass each; its memory grows with K
    assert [(r["T_B"], r["K"]) for r in line["dial"]] == [(4, 1), (4, 2), (4, 4), (8, 1), (8, 2),
                                                          (8, 4), (8, 8)]
    assert all(set(r) == {"T_B", "K", "seconds", "rows_per_response", "peak_saved_mb"}
               and r["rows_per_response"] == 1 for r in line["dial"])
    for T_B in (4, 8):
        mb = [r["peak_saved_mb"] for r in line["dial"] if r["T_B"] == T_B]
        assert all(a < b for a, b in zip(mb, mb[1:]))
    assert max(line["bgpo_memory_ratio"]) <= 1.05  # flat in n_mc
    assert line["vrpo_ol_memory_ratio"][-1] > 0.5 * line["n_mc"][-1]  # about linear in n_mc
    # the exp-of-mean objective in two passes: flat, also off-policy where its no-grad pass runs
    assert max(line["vrpo_ol_two_pass_memory_ratio"] + line["vrpo_ol_two_pass_memory_ratio_mu2"]) \
        <= 1.05
    # rows per response at μ = 2, n = 4: n old values + 2n (bgpo, one graph); two passes add n
    assert line["rows_per_response_mu2_nmc4"] == {"bgpo": 12, "vrpo_ol": 12, "vrpo_ol_two_pass": 16}
    saved = json.load(open(tmp_path / "bench_scaling.json"))
    for row in saved["by_steps"]:  # T_B rows per response for the exact update, one for dTRPO
        expected = 1 if row["update"] == "dpo dtrpo" else row["T_B"]
        assert abs(row["passes_per_response"] - expected) < 1e-9
    for row in saved["by_nmc"]:  # on-policy: n rows per response for all three, no first pass
        if row["mu"] == 1:
            assert row["passes_per_response"] == row["n_mc"]
    assert (tmp_path / "seconds_vs_steps.png").exists()
    assert (tmp_path / "dial.png").exists()
    assert (tmp_path / "memory_vs_nmc.png").exists()


def test_bench_decoding_runs_every_rule_and_ends_with_its_json_line(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "minidtrpo", "sft", "--task=sudoku", "--max_steps=2",
                    "--batch_size=8", "--d_model=32", "--n_layers=2", "--eval_n=4",
                    "--device=cpu", f"--out_dir={tmp_path / 'sft'}"], check=True,
                   capture_output=True, env=env, timeout=300)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_decoding.py"),
                          f"--ckpts={tmp_path / 'sft' / 'checkpoint.pt'}", "--n=16",
                          "--device=cpu", f"--out={tmp_path}"], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    rules = json.loads(out.stdout.strip().splitlines()[-1])["rules"]
    assert rules[0]["name"] == "one token per step, low confidence"
    assert rules[0]["passes_per_response"] == 16  # L = 16, one token per step
    by_name = {r["name"]: r for r in rules}
    assert by_name["two tokens per step (T_B = b/2)"]["passes_per_response"] == 8
    assert by_name["ascending (CJ-GRPO)"]["passes_per_response"] == 8  # 2 steps (1, 3) × 4 blocks
    assert all(1 <= r["passes_per_response"] <= 16 and 0 <= r["exact"] <= 1 for r in rules)


def test_star_pitfall_scores_each_run_and_draws_the_curves(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    tiny = [sys.executable, "-m", "minidtrpo", "sft", "--task=star", "--max_steps=4",
            "--eval_every=2", "--eval_n=4", "--d_model=32", "--device=cpu"]
    for name, options in (("ar_fwd", ["--block_size=1", "--t_min=1"]),
                          ("diff_rev", ["--task_options=reverse=true"])):
        for seed in (0, 1):
            subprocess.run([*tiny, *options, f"--seed={seed}",
                            f"--out_dir={tmp_path / f'{name}_s{seed}'}"], check=True,
                           capture_output=True, env=env, timeout=300)
    pitfall = [sys.executable, os.path.join(ROOT, "bench", "star_pitfall.py"),
               f"--runs_dir={tmp_path}", "--runs=ar_fwd,diff_rev", "--n=8",
               f"--out={tmp_path / 'pitfall.png'}"]
    out = subprocess.run([*pitfall, "--seeds=0,1"], capture_output=True, text=True, timeout=300,
                         env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ar") or
            line.startswith("| diff")]
    assert "left to right (b = 1) | forward | 4 |" in rows[0] and "| — |" in rows[0]
    assert "masked diffusion (b = 4) | reversed | 4 |" in rows[1] and rows[1].count(" ± ") == 3
    assert (tmp_path / "pitfall.png").exists()
    # a seed without its runs is refused in one line, before any scoring
    out = subprocess.run([*pitfall, "--seeds=0,2"], capture_output=True, text=True, timeout=300,
                         env=env)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().count("\n") == 0 and "diff" not in out.stderr  # ar_fwd_s2 first
    assert "ar_fwd_s2: no checkpoint.pt" in out.stderr


def test_other_arm_is_a_first_step_onto_the_wrong_arm():
    path = os.path.join(ROOT, "bench", "star_pitfall.py")
    spec = importlib.util.spec_from_file_location("star_pitfall", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    other_arm = bench.other_arm
    star, reversed_star = get_task("star"), get_task("star", reverse=True)
    problem = "de,ab,bc,ad:ae"  # arms a-b-c and a-d-e, goal e
    assert other_arm(star, problem, "abe") and other_arm(star, problem, "abc")
    assert other_arm(reversed_star, problem, "eba")
    assert not other_arm(star, problem, "ade")  # the answer
    assert not other_arm(star, problem, "ace") and not other_arm(star, problem, "eba")


def test_dial_training_runs_every_k_and_ends_with_its_json_line(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "minidtrpo", "sft", "--task=sudoku", "--max_steps=2",
                    "--batch_size=8", "--d_model=32", "--n_layers=2", "--eval_n=4",
                    "--device=cpu", f"--out_dir={tmp_path / 'sft'}"], check=True,
                   capture_output=True, env=env, timeout=300)
    ckpt = tmp_path / "sft" / "checkpoint.pt"
    subprocess.run([sys.executable, "-m", "minidtrpo", "pairs", f"--init={ckpt}",
                    "--num_prompts=16", "--num_generations=4", "--device=cpu",
                    f"--out={tmp_path / 'pairs.pt'}"], check=True, capture_output=True, env=env,
                   timeout=300)
    for kind in ("dpo", "rl"):
        run_args = ("max_iters=2,eval_n=4,device=cpu,"
                    + ("batch_size=4" if kind == "dpo" else "num_prompts=2,num_generations=4"))
        out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "dial_training.py"),
                              f"--kind={kind}", f"--init={ckpt}", f"--pairs={tmp_path / 'pairs.pt'}",
                              "--ks=1,4", "--seeds=0", "--eval_every=1", f"--run_args={run_args}",
                              f"--out={tmp_path / 'dial'}"], capture_output=True, text=True,
                             timeout=300, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        line = json.loads(out.stdout.strip().splitlines()[-1])
        assert sorted(line["K"]) == ["1", "4"] and line["K"]["4"]["updates"] == 2
        assert line["K"]["4"]["peak_saved_mb"] > line["K"]["1"]["peak_saved_mb"]
        assert (tmp_path / "dial" / f"dial_{kind}.png").exists()


def test_countdown_signal_counts_groups_by_operations(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for task in ("countdown", "star"):
        subprocess.run([sys.executable, "-m", "minidtrpo", "sft", f"--task={task}", "--max_steps=2",
                        "--batch_size=8", "--d_model=32", "--n_layers=1", "--eval_n=4",
                        "--device=cpu", f"--out_dir={tmp_path / task}"], check=True,
                       capture_output=True, env=env, timeout=300)
    signal = [sys.executable, os.path.join(ROOT, "bench", "countdown_signal.py"), "--n=24",
              "--num_generations=2"]
    out = subprocess.run([*signal, f"--ckpt={tmp_path / 'countdown' / 'checkpoint.pt'}"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])["classes"]
    assert rows[-1]["ops"] == "all" and rows[-1]["share"] == 1.0
    assert abs(sum(r["share"] for r in rows[:-1]) - 1.0) < 1e-6  # every prompt in one class
    assert all(set(r["ops"]) <= set("+-*/") and r["signal"] + r["none"] <= 1
               and r["room"] <= 1 - r["none"] for r in rows[:-1])
    out = subprocess.run([*signal, f"--ckpt={tmp_path / 'star' / 'checkpoint.pt'}"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 2 and "a star checkpoint; expected a countdown one" in out.stderr


def test_by_class_counts_right_rollouts_per_group():
    spec = importlib.util.spec_from_file_location(
        "countdown_signal", os.path.join(ROOT, "bench", "countdown_signal.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    exact = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])  # G = 2 rollouts of 3 prompts
    rows = bench.by_class(["+-", "+-", "*"], torch.tensor([1.0, 0.0, 1.0]), exact)
    assert [r["ops"] for r in rows] == ["+-", "*", "all"]
    assert rows[0] == {"ops": "+-", "share": 2 / 3, "greedy": 0.5, "own": 0.25, "signal": 0.5,
                       "none": 0.5, "room": 0.0}
    assert rows[1]["signal"] == 0.0 and rows[1]["none"] == 0.0 and rows[1]["own"] == 1.0
    assert abs(rows[2]["signal"] - 1 / 3) < 1e-6 and abs(rows[2]["none"] - 1 / 3) < 1e-6
    # greedy wrong on a group with a right rollout: room; greedy right with none right: not room
    rows = bench.by_class(["+", "+"], torch.tensor([0.0, 1.0]), torch.tensor([[0.0, 1.0],
                                                                              [0.0, 0.0]]))
    assert rows[0]["room"] == 0.5 and rows[0]["none"] == 0.5
