"""Interrupted runs lose nothing: sft, rl and dpo killed (SIGINT or SIGKILL) at some point of a real
run, then resumed with --resume, write the same metrics.jsonl as a run that was never interrupted
(timing fields aside), with no row lost or repeated, and leave no temporary file behind."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from minidtrpo.__main__ import main

pytestmark = pytest.mark.usefixtures("single_thread")
TIMING = {"train_seconds", "tokens_per_s", "rollout_s", "update_s", "rss_mb", "cuda_peak_mb"}
SFT = ["sft", "--task=sudoku", "--d_model=32", "--n_layers=2", "--n_heads=2", "--batch_size=32",
       "--eval_n=8", "--eval_every=7", "--device=cpu"]


@pytest.fixture(scope="module")
def start(tmp_path_factory, single_thread):
    """A tiny full-layout sudoku checkpoint and a pairs file sampled from it."""
    root = tmp_path_factory.mktemp("start")
    main([*SFT, "--layout=full", "--max_steps=4", f"--out_dir={root / 'sft'}"])
    ckpt = str(root / "sft" / "checkpoint.pt")
    main(["pairs", f"--init={ckpt}", "--num_prompts=32", "--num_generations=4", "--device=cpu",
          f"--out={root / 'pairs.pt'}"])
    return ckpt, str(root / "pairs.pt")


def command(kind, start):
    ckpt, pairs = start
    if kind == "sft":
        return [*SFT, "--max_steps=150"]
    if kind == "rl":
        return ["rl", f"--init={ckpt}", "--objective=bgpo", "--num_prompts=4",
                "--num_generations=4", "--n_mc=2", "--eval_n=8", "--eval_every=3",
                "--kl_rollouts=4", "--max_iters=24", "--device=cpu"]
    return ["dpo", f"--init={ckpt}", f"--pairs={pairs}", "--batch_size=4", "--eval_n=8",
            "--eval_every=5", "--epochs=100", "--max_iters=60", "--device=cpu"]


def untimed(out_dir):
    """The log's rows without timing fields (a last line cut short by a kill is left out)."""
    rows = []
    for line in open(os.path.join(out_dir, "metrics.jsonl")):
        try:
            rows.append({k: v for k, v in json.loads(line).items() if k not in TIMING})
        except json.JSONDecodeError:
            pass
    return rows


def run_and_kill(argv, out_dir, sig, after_rows):
    """Start the run as a subprocess; send `sig` once metrics.jsonl holds `after_rows` rows (an
    int), or `after_rows` seconds after its first checkpoint (a float)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # SIGINT back to its default in the child: a shell's background job (nohup cmd &) ignores it,
    # and Python then never raises KeyboardInterrupt, so the test would depend on how it was run
    proc = subprocess.Popen([sys.executable, "-m", "minidtrpo", *argv, f"--out_dir={out_dir}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    path, deadline = os.path.join(out_dir, "metrics.jsonl"), time.time() + 120
    ckpt, saved_at = os.path.join(out_dir, "checkpoint.pt"), None
    while proc.poll() is None and time.time() < deadline:
        if saved_at is None and os.path.exists(ckpt):
            saved_at = time.time()
        if (saved_at is not None and time.time() - saved_at >= after_rows)  \
                if isinstance(after_rows, float) else \
                (os.path.exists(path) and sum(1 for _ in open(path)) >= after_rows):
            proc.send_signal(sig)
            break
        time.sleep(0.005)
    return proc.wait(timeout=120)


@pytest.mark.parametrize("kind", ["sft", "rl", "dpo"])
def test_killed_and_resumed_run_writes_the_same_metrics(kind, start, tmp_path):
    argv = command(kind, start)
    main([*argv, f"--out_dir={tmp_path / 'straight'}"])
    expected = untimed(tmp_path / "straight")
    # three points keyed to rows logged, and one at a random moment (anywhere: inside a save or a
    # log line too); seeded, so a failure can be replayed
    points = [(signal.SIGKILL, 10), (signal.SIGINT, 17), (signal.SIGKILL, 26),
              (signal.SIGKILL, random.Random(kind).uniform(0.0, 0.6))]
    for k, (sig, after_rows) in enumerate(points):
        out = tmp_path / f"killed{k}"
        code = run_and_kill(argv, out, sig, after_rows)
        assert code == (-9 if sig == signal.SIGKILL else 130), "it ended before the signal"
        assert len(untimed(out)) < len(expected)
        main([*argv, f"--out_dir={out}", "--resume"])
        assert untimed(out) == expected, f"{sig!r} after {after_rows} rows or seconds"
        assert not [name for name in os.listdir(out) if name.endswith(".tmp")]
