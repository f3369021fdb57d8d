"""Training with the dial: does scoring more steps per block buy accuracy, and at what cost?

    python bench/dial_training.py --init=runs/hard/sft/checkpoint.pt --pairs=runs/dial/pairs.pt
    python bench/dial_training.py --kind=rl --run_args=max_iters=12 --eval_every=4

For each K of --ks and each seed, one run from the same start: `dpo --estimator=dtrpo
--steps_scored=K` on one pairs file (--kind=dpo), or `rl --objective=dtrpo --steps_scored=K`
(--kind=rl), everything else at the command's defaults (or --run_args). Equal updates: every run
takes the same number of optimizer steps; equal wall-clock: each run's test exact is read at the
training seconds of the fastest run's end. A finished run folder is reused. Prints a markdown table
and ends with one JSON line; the figure (--out/dial_<kind>.png) draws the gain in test exact
against training seconds, one curve per K (the mean over seeds, each seed faint).
"""

import json
import os
import statistics
import sys
from dataclasses import dataclass

import torch

from minidtrpo.__main__ import main as command
from minidtrpo.config import Config, arg, exit_on_bad_input, parse
from minidtrpo.folders import read_metrics


@dataclass
class DialTrainingConfig(Config):
    """Runs of dtrpo with K steps per block, K in --ks, from one start; a table and a figure."""
    kind: str = arg("dpo", "dpo (offline, on --pairs) or rl (online GRPO)", ("dpo", "rl"))
    init: str = arg("runs/hard/sft/checkpoint.pt", "the start (and DPO's reference)")
    pairs: str = arg("runs/dial/pairs.pt", "dpo: pairs sampled by --init")
    ks: str = arg("1,2,4", "comma-separated K, steps scored per block")
    seeds: str = arg("0,1,2", "comma-separated seeds")
    eval_every: int = arg(105, "evaluate every this many updates", ge=1)
    run_args: str = arg("", "more options of the runs, key=value,...")
    out: str = arg("runs/dial", "folder of the runs and the figure")


def at_seconds(evals, seconds):
    """Test exact of the last evaluation at or before `seconds` of training."""
    return [r["test_exact"] for r in evals if r["train_seconds"] <= seconds + 1e-9][-1]


def main():
    cfg = parse(DialTrainingConfig, sys.argv[1:], "python bench/dial_training.py")
    ks, seeds = [int(k) for k in cfg.ks.split(",")], [int(s) for s in cfg.seeds.split(",")]
    extra = [f"--{kv}" for kv in cfg.run_args.split(",") if kv]
    runs = {}
    for k in ks:
        for s in seeds:
            folder = os.path.join(cfg.out, f"{cfg.kind}_k{k}_s{s}")
            ckpt = os.path.join(folder, "checkpoint.pt")
            if not (os.path.exists(ckpt) and torch.load(ckpt, weights_only=True)["finished"]):
                argv = ([f"--pairs={cfg.pairs}", "--estimator=dtrpo"] if cfg.kind == "dpo"
                        else ["--objective=dtrpo"])
                command([cfg.kind, f"--init={cfg.init}", *argv, f"--steps_scored={k}",
                         f"--seed={s}", f"--eval_every={cfg.eval_every}", *extra,
                         f"--out_dir={folder}"])
            rows = read_metrics(os.path.join(folder, "metrics.jsonl"))
            runs[k, s] = {"evals": [r for r in rows if "test_exact" in r],
                          "iters": [r for r in rows if "test_exact" not in r]}
    # equal wall-clock: the training seconds at which the fastest run ended
    common = min(r["evals"][-1]["train_seconds"] for r in runs.values())
    table, result = [], {"kind": cfg.kind, "common_seconds": common, "K": {}}
    for k in ks:
        mine = [runs[k, s] for s in seeds]
        start = mine[0]["evals"][0]["test_exact"]
        final = [r["evals"][-1]["test_exact"] for r in mine]
        best = [max(e["test_exact"] for e in r["evals"]) for r in mine]
        at_common = [at_seconds(r["evals"], common) for r in mine]
        seconds = [r["evals"][-1]["train_seconds"] for r in mine]
        ran = [i for r in mine for i in r["iters"] if "peak_saved_mb" in i]  # rl: skipped ones out
        update_s = statistics.fmean(i["update_s"] for i in ran) if ran else float("nan")
        saved = statistics.fmean(i["peak_saved_mb"] for i in ran) if ran else float("nan")
        # the KL to the start over each run's last tenth of updates (docs/math.md §5.5)
        last = [i for r in mine for i in r["iters"][-max(1, len(r["iters"]) // 10):]]
        kl = statistics.fmean(i["kl_ref"] for i in last if "kl_ref" in i)
        result["K"][k] = {"start": start, "final": final, "best": best, "at_common": at_common,
                          "seconds": seconds, "updates": len(mine[0]["iters"]),
                          "update_s": update_s, "peak_saved_mb": saved, "kl_ref_end": kl}
        table.append(f"| K = {k} | {100 * start:.1f}% | "
                     f"{' / '.join(f'{100 * f:.1f}' for f in final)} | "
                     f"{100 * (statistics.fmean(final) - start):+.1f} | "
                     f"{100 * (statistics.fmean(at_common) - start):+.1f} | "
                     f"{statistics.fmean(seconds):.0f} | {1e3 * update_s:.0f} | {saved:.0f} | "
                     f"{kl:.2f} |")
    print(f"\n| {cfg.kind} dtrpo | start | final exact per seed | gain, equal updates "
          f"({result['K'][ks[0]]['updates']}) | gain at {common:.0f} s | seconds | "
          "ms per update | MB saved | KL to start, end |\n|---|---|---|---|---|---|---|---|---|")
    print("\n".join(table))
    plot(runs, ks, seeds, os.path.join(cfg.out, f"dial_{cfg.kind}.png"), cfg.kind)
    print(json.dumps(result))


def plot(runs, ks, seeds, path, kind):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.4, 3.8))
    for j, k in enumerate(ks):
        curves = []
        for s in seeds:
            evals = runs[k, s]["evals"]
            x = [e["train_seconds"] for e in evals]
            y = [100 * (e["test_exact"] - evals[0]["test_exact"]) for e in evals]
            ax.plot(x, y, color=f"C{j}", lw=0.6, alpha=0.35)
            curves.append((x, y))
        n = min(len(y) for _, y in curves)  # the same evaluation points (equal updates)
        mean = [(statistics.fmean(x[i] for x, _ in curves),
                 statistics.fmean(y[i] for _, y in curves)) for i in range(n)]
        ax.plot(*zip(*mean), "o-", color=f"C{j}", ms=3, label=f"K = {k}")
    ax.axhline(0, color="k", lw=0.5)
    ax.set(xlabel="training seconds (updates only)", ylabel="gain in test exact (points)",
           title=f"{kind} with dtrpo, K steps per block ({len(seeds)} seeds, faint: each)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    exit_on_bad_input(main)
