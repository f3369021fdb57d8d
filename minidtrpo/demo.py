"""The demo: the project's main job in one command, `python -m minidtrpo demo`.

It is `compare` (compare.py) with the preset below: a short supervised start on sudoku, then three
objectives from that start, each scored on the same 500 test puzzles before and after:
- full_trajectory: online GRPO on the exact trajectory log-probability (docs/math.md §4.1, §5.2);
- bgpo: online, BGPO's lower bound of the ELBO ratio, one Monte Carlo sample at a time (§5.4);
- dpo_dtrpo: offline DPO on pairs the start sampled, dTRPO's one-pass reduced trajectory (§4.2,
  §5.3).
Every run is stopped by a count (SFT steps, RL iterations, DPO epochs), not by seconds, so every
machine runs the same updates (its finals may still move by a point or two between CPUs: a
last-bit difference in a float changes a sampled token). It writes runs/demo/compare.md (the
table, also printed) and runs/demo/compare.png (test accuracy against seconds and iterations).
Any option can still be changed (`--seeds=0,1,2` runs three seeds); `--help` lists the preset.
"""

from dataclasses import dataclass

from .compare import CompareConfig
from .config import arg, folder_problem


@dataclass
class DemoConfig(CompareConfig):
    """compare's head-to-head with a preset that runs in about 10 minutes on a 2-core CPU."""
    # Harder puzzles than the task's default (8-12 blanks of 16, not 4-10): the start is then
    # right about 30% of the time, so GRPO's groups of 8 rollouts mostly hold a signal.
    task_options: str = arg("min_blanks=8,max_blanks=12", "sudoku options for the start")
    # A short supervised start (120 steps, not evaluated on the way): weak enough to leave room.
    sft_args: str = arg("max_steps=120,eval_every=0", "sft options for the start")
    # RL: 36 iterations of 64 prompts × 8 rollouts, each objective at its command's defaults.
    rl_args: str = arg("max_iters=36", "rl options for the online runs")
    # BGPO at twice rl's rate: its per-sample updates are smaller, and 36 iterations are few.
    lr_overrides: str = arg("bgpo=2e-4", "per-objective learning rates, name=lr,...")
    # DPO: 2,048 prompts give the pairs (a best and a worst response each); 5 passes over them.
    pairs_args: str = arg("num_prompts=2048", "pairs options for the DPO pairs")
    dpo_args: str = arg("epochs=5", "dpo options for the DPO runs")
    objectives: str = arg("full_trajectory,bgpo,dpo_dtrpo", "comma-separated objectives")
    seeds: str = arg("0", "comma-separated seeds; each objective runs once per seed")
    # The counts above end every run; the budgets are only caps far beyond them.
    sft_budget: float = arg(3600.0, "cap on the start's SFT seconds", gt=0)
    budget: float = arg(3600.0, "cap on each run's training seconds", gt=0)
    eval_every_s: float = arg(90.0, "also evaluate every this many training seconds", ge=0)
    out_dir: str = arg("runs/demo", "folder of the runs, compare.md and compare.png",
                       valid=folder_problem)
