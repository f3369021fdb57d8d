"""The planning pitfall of next-token prediction, measured on the star graph (issue 12, item 2).

Bachmann & Nagarajan (arXiv 2403.06963): trained with teacher forcing, a left-to-right model learns
the shortcut "the child of the node before" for every node after the first step out of the source,
and that shortcut cannot make the first step, which needs the goal's end of the graph. Reversed
(goal to source), every node is "the parent of the node before" and the shortcut is the answer.
A masked-diffusion model decodes in any order. The same data (the star task's defaults, forward and
reversed) and the same 1200 s, four runs, one training job at a time:

    python -m minidtrpo sft --task=star --time_budget=1200 --eval_every=0 --eval_every_s=150 \
        --eval_n=200 --out_dir=runs/star/NAME OPTIONS

    NAME      OPTIONS                                               decoder
    ar_fwd    --block_size=1 --t_min=1                              left to right
    ar_rev    --block_size=1 --t_min=1 --task_options=reverse=true  left to right
    diff_fwd  (none)                                                masked diffusion, a block of 4
    diff_rev  --task_options=reverse=true                           masked diffusion, a block of 4

Block size 1 in the block layout is a left-to-right model, and t_min = 1 masks every response
token at weight 1: exactly teacher forcing (docs/math.md §2). Then

    python bench/star_pitfall.py        # ~10 s: the table and runs/star/pitfall.png

scores each run's final checkpoint on 500 test problems (greedy; the diffusion models also in
random order) and draws each run's test curve (its own evaluations on 200 problems) against steps.
"""

import os
import sys
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from minidtrpo.config import BadInput, Config, arg, file_problem, parse  # noqa: E402
from minidtrpo.folders import read_metrics  # noqa: E402
from minidtrpo.train import evaluate, load  # noqa: E402


@dataclass
class PitfallConfig(Config):
    """Left-to-right against masked-diffusion decoding on the star graph, forward and reversed."""
    runs: str = arg("runs/star/ar_fwd,runs/star/ar_rev,runs/star/diff_fwd,runs/star/diff_rev",
                    "comma-separated sft run folders (the commands above make the defaults)")
    n: int = arg(500, "fixed test problems per checkpoint", ge=1)
    out: str = arg("runs/star/pitfall.png", "the figure", valid=file_problem)


def main(cfg: PitfallConfig):
    print("| run | decoder | direction | steps | training s | test exact, greedy | random order |\n"
          "|---|---|---|---|---|---|---|")
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for folder in cfg.runs.split(","):
        model, task = load(os.path.join(folder, "checkpoint.pt"))
        b = model.config.block_size
        decoder = "left to right (b = 1)" if b == 1 else f"masked diffusion (b = {b})"
        direction = "reversed" if task.reverse else "forward"
        prompts, _ = task.test_set(cfg.n)
        greedy = evaluate(model, task, prompts)["exact"]
        shuffled = f"{100 * evaluate(model, task, prompts, remasking='random')['exact']:.1f}%" \
            if b > 1 else "—"  # one token per block: no order to choose
        rows = read_metrics(os.path.join(folder, "metrics.jsonl"))
        last = [r for r in rows if "loss" in r][-1]  # the last optimizer step
        evals = [r for r in rows if "test_exact" in r]
        print(f"| {os.path.basename(folder)} | {decoder} | {direction} | {last['iter']:,} | "
              f"{last['train_seconds']:.0f} | {100 * greedy:.1f}% | {shuffled} |")
        ax.plot([r["iter"] for r in evals], [100 * r["test_exact"] for r in evals], marker="o",
                ls="-" if b == 1 else "--", label=f"{decoder}, {direction}")
    ax.set(xlabel="optimizer steps", ylabel="test exact, % (own evaluations)",
           title="star graph: left to right vs masked diffusion, same 1200 s")
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    fig.savefig(cfg.out, dpi=120)
    print(f"figure: {cfg.out}")


if __name__ == "__main__":
    config = parse(PitfallConfig, sys.argv[1:], "bench/star_pitfall.py")
    try:
        main(config)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
