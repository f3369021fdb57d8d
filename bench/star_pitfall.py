"""The planning pitfall of next-token prediction, measured on the star graph.

Bachmann & Nagarajan (arXiv 2403.06963): trained with teacher forcing, a left-to-right model learns
the shortcut "the child of the node before" for every node after the first step out of the source,
and that shortcut cannot make the first step, which needs the goal's end of the graph. Reversed
(goal to source), every node is "the parent of the node before" and the shortcut is the answer.
A masked-diffusion model decodes in any order, so it could reveal the parent of the goal first
(Ye et al., arXiv 2410.14157, report that it does). The same data (the star task's defaults, forward
and reversed), the same recipe (the task's 5,000 steps), four kinds of run and three seeds each,
one training job at a time:

    python -m minidtrpo sft --task=star --seed=S --eval_n=200 --out_dir=runs/star/NAME_sS OPTIONS

    NAME      OPTIONS                                               decoder
    ar_fwd    --block_size=1 --t_min=1                              left to right
    ar_rev    --block_size=1 --t_min=1 --task_options=reverse=true  left to right
    diff_fwd  (none)                                                masked diffusion, a block of 4
    diff_rev  --task_options=reverse=true                           masked diffusion, a block of 4

Block size 1 in the block layout is a left-to-right model, and t_min = 1 masks every response
token at weight 1: exactly teacher forcing (docs/math.md §2). Then

    python bench/star_pitfall.py        # ~30 s: the table and runs/star/pitfall.png

scores each run's final checkpoint on 500 test problems (greedy; the diffusion models also in
random order), counts the answers whose first step out of the source takes the wrong arm (the
shortcut's mistake: a guess between the source's children), and draws each run's test curve.
"""

import os
import statistics
import sys
from dataclasses import dataclass

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from minidtrpo.config import (BadInput, Config, arg, check, exit_on_bad_input,  # noqa: E402
                              file_problem, parse)
from minidtrpo.folders import read_metrics  # noqa: E402
from minidtrpo.train import load, rollout  # noqa: E402

NAMES = ("ar_fwd", "ar_rev", "diff_fwd", "diff_rev")


@dataclass
class PitfallConfig(Config):
    """Left-to-right against masked-diffusion decoding on the star graph, forward and reversed."""
    runs_dir: str = arg("runs/star", "the folder holding the sft runs NAME_sS")
    runs: str = arg(",".join(NAMES), f"comma-separated run names among {', '.join(NAMES)}")
    seeds: str = arg("0,1,2", "comma-separated seeds: the runs NAME_s0, NAME_s1, ...")
    n: int = arg(500, "fixed test problems per checkpoint", ge=1)
    out: str = arg("runs/star/pitfall.png", "the figure", valid=file_problem)

    def __post_init__(self):
        names = self.runs.split(",")
        check(names and all(n in NAMES for n in names), "runs", self.runs,
              f"comma-separated names among {', '.join(NAMES)}")
        check(all(s.strip().isdigit() for s in self.seeds.split(",")), "seeds", self.seeds,
              "comma-separated non-negative integers, e.g. 0,1,2")


def other_arm(task, problem: str, text: str) -> bool:
    """Whether `text` takes the wrong arm at the first step: the node after the source (reading
    source first) is a child of the source, but not the one on the goal's arm. The shortcut's
    mistake: a guess between the source's children."""
    edges, ends = problem.split(":")
    path = text[: task.path_len][:: -1 if task.reverse else 1]  # source .. goal
    right = task.answer_text(problem)[:: -1 if task.reverse else 1]
    return (len(path) == task.path_len and path[0] == ends[0] and path[1] != right[1]
            and path[:2] in edges.split(","))


def score(model, task, prompts, **decoding) -> tuple[float, float]:
    """(share exact, share on the other arm) of greedy decoding."""
    traj, _, exact = rollout(model, task, prompts, chunk=500, **decoding)
    problems = [task.decode_problem(p) for p in traj.prompts.cpu()]
    texts = [task.response_text(r) for r in traj.responses.cpu()]
    wrong_arm = sum(map(lambda p, t: other_arm(task, p, t), problems, texts))
    return exact.float().mean().item(), wrong_arm / len(prompts)


def spread(values: list[float]) -> str:
    """'mean ± sd (v1 / v2 / ...)' in percent; one value alone."""
    cells = " / ".join(f"{100 * v:.1f}" for v in values)
    if len(values) < 2:
        return f"{cells}%"
    return f"{100 * statistics.mean(values):.1f}% ± {100 * statistics.stdev(values):.1f} ({cells})"


def main(cfg: PitfallConfig):
    seeds = [int(s) for s in cfg.seeds.split(",")]
    folders = {(name, s): os.path.join(cfg.runs_dir, f"{name}_s{s}")
               for name in cfg.runs.split(",") for s in seeds}
    missing = [f for f in folders.values() if not os.path.isfile(os.path.join(f, "checkpoint.pt"))]
    if missing:  # before any work
        raise BadInput(f"{missing[0]}: no checkpoint.pt; make the runs with the commands in "
                       "bench/star_pitfall.py's docstring (or pass --runs_dir, --runs, --seeds)")
    print(f"test exact on {cfg.n} problems, greedy: mean ± sd (seeds {cfg.seeds}); wrong arm: the "
          "share of answers whose first step takes the other arm\n"
          "| run | decoder | direction | steps | test exact | random order | wrong arm |\n"
          "|---|---|---|---|---|---|---|")
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for i, name in enumerate(cfg.runs.split(",")):
        exact, shuffled, wrong, steps = [], [], [], set()
        for s in seeds:
            model, task = load(os.path.join(folders[name, s], "checkpoint.pt"))
            b = model.config.block_size
            prompts, _ = task.test_set(cfg.n)
            with torch.no_grad():
                e, w = score(model, task, prompts)
                if b > 1:  # one token per block has no order to choose
                    shuffled.append(score(model, task, prompts, remasking="random",
                                          generator=torch.Generator().manual_seed(0))[0])
            exact.append(e)
            wrong.append(w)
            rows = read_metrics(os.path.join(folders[name, s], "metrics.jsonl"))
            steps.add([r for r in rows if "loss" in r][-1]["iter"])  # the last optimizer step
            evals = [r for r in rows if "test_exact" in r]
            ax.plot([r["iter"] for r in evals], [100 * r["test_exact"] for r in evals],
                    color=f"C{i}", ls="-" if b == 1 else "--", lw=1, marker=".",
                    label=name if s == seeds[0] else None)
        decoder = "left to right (b = 1)" if b == 1 else f"masked diffusion (b = {b})"
        direction = "reversed" if task.reverse else "forward"
        print(f"| {name} | {decoder} | {direction} | {'/'.join(f'{n:,}' for n in sorted(steps))} "
              f"| {spread(exact)} | {spread(shuffled) if shuffled else '—'} | {spread(wrong)} |")
    ax.axhline(50, color="grey", ls=":", lw=1, label="the shortcut: a coin flip at the first step")
    ax.set(xlabel="optimizer steps", ylabel="test exact, % (own evaluations)", ylim=(0, 100),
           title="star graph: left to right (solid) vs masked diffusion (dashed)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    fig.savefig(cfg.out, dpi=120)
    print(f"figure: {cfg.out}")


if __name__ == "__main__":
    exit_on_bad_input(main, parse(PitfallConfig, sys.argv[1:], "bench/star_pitfall.py"))
