# %% [markdown]
# # Tutorial 5: decoding rules, and what each costs an objective
#
# A masked-diffusion model does not fix how it is decoded. LLaDA's sampler reveals one token per
# step, the least uncertain first; the works this project follows change that rule, and the RL
# objectives feel it, because the exact trajectory objective costs one forward pass per decoding
# step:
#
# - **CJ-GRPO** (arXiv 2509.23924) decodes a block in ⌊log₂ b⌋ steps (step s reveals 2^s
#   tokens, the last step the rest: the *ascending* schedule) and delays EOS (*early
#   rejection*), so that the exact trajectory objective becomes cheap, and argues that the
#   trajectory optimised must be the one the rollout took;
# - **confidence-threshold** decoding reveals every position the model is sure enough of;
# - **CreditDecoding** (arXiv 2510.06133) adds *trace credit*, each position's decayed history of
#   its top-1 predictions, so that a token the model kept predicting crosses the threshold sooner.
#
# Every rule here draws its tokens from the model and records the same `Trajectory`
# (docs/math.md §3, "Decoding rules"), so every estimator works unchanged. Run it as
# `python tutorials/05_decoding.py`: about 2 minutes on this project's 2-core CPU.
# `MINIDTRPO_TUTORIAL_QUICK=1` makes it a smoke test of a few seconds whose numbers mean nothing.

# %%
import os
import sys
import time
from pathlib import Path

QUICK = os.environ.get("MINIDTRPO_TUTORIAL_QUICK", "0") == "1"

try:  # as a script: this file's folder; as a notebook, the kernel starts in the notebook's folder
    HERE = Path(__file__).resolve().parent
except NameError:
    HERE = Path.cwd()
sys.path.insert(0, str(HERE.parent))  # so that a fresh clone runs without `pip install -e .`
OUT = HERE / "out" / ("05_quick" if QUICK else "05")  # run folder, figure (git-ignored)
OUT.mkdir(parents=True, exist_ok=True)

import matplotlib

matplotlib.use("Agg")  # write image files; never open a window
import matplotlib.pyplot as plt
import torch

from minidtrpo.estimators import reduced_trajectory_logprob, sample_block_steps, trajectory_logprob
from minidtrpo.meters import Meters
from minidtrpo.sampling import Trajectory
from minidtrpo.sft import SFTConfig, train_sft
from minidtrpo.train import evaluate, load, rollout

torch.manual_seed(0)
print(f"quick mode: {QUICK}; the run and the figure go to {OUT}")

# %% [markdown]
# ## 1. A model to decode with
#
# 4×4 sudoku in the block layout (blocks of b = 4 tokens), 200 steps of masked-diffusion SFT:
# about a minute, and a model that solves most puzzles greedily.

# %%
options = dict(d_model=32, n_layers=2, max_steps=5, batch_size=32) if QUICK else \
    dict(max_steps=200)
t0 = time.perf_counter()
start = train_sft(SFTConfig(task="sudoku", layout="block", eval_every=0,
                            eval_n=16 if QUICK else 200, out_dir=str(OUT / "sft"), **options))
model, task = load(str(OUT / "sft" / "checkpoint.pt"), "cpu")
b, L = model.config.block_size, model.config.response_len
print(f"{100 * start['exact']:.1f}% of {start['n']} test puzzles exact; "
      f"SFT took {time.perf_counter() - t0:.0f} s")

# %% [markdown]
# ## 2. One puzzle, every rule
#
# Each row below decodes the same puzzle greedily; a cell's colour is the step at which that
# position was revealed (dark: early), its text the digit. One token per step takes L = 16 steps;
# two per step, 8; the ascending schedule reveals 1, then 3 tokens per block: 2 steps per block,
# 8 in all. The threshold rules take as many steps as the model's doubt requires: a block the
# model is sure of goes in one step.

# %%
RULES = {
    "one token per step": {},
    "two tokens per step": dict(steps_per_block=b // 2),
    "ascending (CJ-GRPO)": dict(schedule="ascending"),
    "threshold 0.9": dict(remasking="threshold", threshold=0.9),
    "trace credit 0.9": dict(remasking="credit", threshold=0.9),
}
tests, _ = task.test_set(16 if QUICK else 200)
one = {name: rollout(model, task, tests[:1], temperature=0.0, **opts)[0]
       for name, opts in RULES.items()}

fig, ax = plt.subplots(figsize=(9, 3.2))
grid = torch.stack([t.unmask_step[0].float() / (t.num_steps - 1) for t in one.values()])
ax.imshow(grid, cmap="viridis", aspect="auto")
for r, traj in enumerate(one.values()):
    for c in range(L):
        ax.text(c, r, task.vocab.decode([int(traj.responses[0, c])]) or "·", ha="center",
                va="center", color="w" if grid[r, c] < 0.5 else "k", fontsize=8)
ax.set_yticks(range(len(RULES)),  # the steps this puzzle needed: its distinct reveal steps
              [f"{n} ({len(set(t.unmask_step[0].tolist()))} steps)" for n, t in one.items()])
ax.set_xticks([k * b - 0.5 for k in range(1, L // b)], minor=True)
ax.grid(which="minor", color="w", lw=2)
ax.set(xticks=[], title="which position is revealed when (dark: early), one puzzle")
fig.tight_layout()
fig.savefig(OUT / "reveal_order.png", dpi=120)
plt.close(fig)
for name, traj in one.items():
    print(f"{name:>22}: steps {traj.unmask_step[0].tolist()}")
assert one["one token per step"].num_steps == L
assert one["ascending (CJ-GRPO)"].num_steps == 2 * L // b

# %% [markdown]
# ## 3. What each rule costs, and what it gets right
#
# The same rules on the test puzzles, greedy. *Passes* counts the decoding steps a response needed
# (a batch waits for its slowest sequence in the threshold rules, so a batch runs more).

# %%
print("| rule | passes/response | exact |\n|---|---|---|")
accuracy = {}
for name, opts in RULES.items():
    traj, _, exact = rollout(model, task, tests, temperature=0.0, **opts)
    steps = torch.tensor([len(set(row.tolist())) for row in traj.unmask_step])  # own steps
    accuracy[name] = exact.float().mean().item()
    print(f"| {name} | {steps.float().mean():.2f} | {100 * accuracy[name]:.1f}% |")

# %% [markdown]
# ## 4. What each rule costs the objectives
#
# The exact trajectory objective scores every decoding step: T_B forward rows per response in the
# block layout (one `[x ; y ; ỹ]` pass per within-block step, every block at once). dTRPO samples
# one step per block and scores all blocks in one pass, whatever the rule. Below, on rollouts at
# temperature 1 under each rule: the rows each estimator ran, and P1 (the exact log-probability
# equals the sampler's record, Σ `logp_at_reveal`), which every rule keeps.

# %%
prompts, _ = task.sample(4 if QUICK else 32, "train", generator=torch.Generator().manual_seed(1))
gen = torch.Generator().manual_seed(2)
print("| rule | T_B | exact objective rows/response | dTRPO rows/response | P1 gap (nats) |\n"
      "|---|---|---|---|---|")
with torch.no_grad():
    for name, opts in RULES.items():
        traj, _, _ = rollout(model, task, prompts, temperature=1.0, generator=gen, **opts)
        with Meters(torch.device("cpu"), model) as exact_rows:
            exact = trajectory_logprob(model, traj)
        with Meters(torch.device("cpu"), model) as dtrpo_rows:
            reduced_trajectory_logprob(model, traj, sample_block_steps(traj, gen))
        gap = (exact - traj.logp_at_reveal.sum(1)).abs().max().item()
        n = len(prompts)
        print(f"| {name} | {traj.steps_per_block} | {exact_rows.rows / n:.0f} | "
              f"{dtrpo_rows.rows / n:.0f} | {gap:.1e} |")
        assert exact_rows.rows == traj.steps_per_block * n and dtrpo_rows.rows == n
        assert gap < 1e-3  # float32 rounding of a sum over 16 tokens

# %% [markdown]
# ## 5. CJ-GRPO's argument: optimise the trajectory the rollout took
#
# A policy-gradient ratio is π_θ(τ) / π_old(τ) for the trajectory τ that was sampled. With the
# ascending schedule, τ reveals three tokens together at each block's second step. Suppose an
# objective scores the same response as if it had been decoded one token per step, in the order
# revealed (tokens revealed together put in position order): a different, finer trajectory
# τ'. On-policy, the ratio of the real trajectory is exactly 1; the ratio of τ' against the
# record is not: the later tokens of each group are scored at states that contain the earlier
# ones, which the sampler never saw.

# %%
with torch.no_grad():
    asc, _, _ = rollout(model, task, prompts, temperature=1.0, generator=gen, schedule="ascending")
    # τ': within each block, one token per step in the order (step revealed, position)
    us, blk = asc.unmask_step, torch.arange(L) // b
    order = (us * b + torch.arange(L) % b).view(-1, L // b, b).argsort(-1).argsort(-1).view(-1, L)
    finer = Trajectory(**{**asc.to_dict(), "unmask_step": blk * b + order, "steps_per_block": b})
    recorded = asc.logp_at_reveal.sum(1)
    same = trajectory_logprob(model, asc) - recorded
    other = trajectory_logprob(model, finer) - recorded
print(f"log-ratio at θ = θ_old, the rollout's trajectory: max |·| = {same.abs().max():.1e}")
print(f"log-ratio at θ = θ_old, one-token-per-step rescoring: mean {other.mean():+.3f}, "
      f"max |·| {other.abs().max():.3f} nats")
assert same.abs().max() < 1e-3
if not QUICK:  # a trained model: scoring the wrong states moves the ratio away from 1
    assert other.abs().mean() > 10 * same.abs().max()

# %% [markdown]
# What this shows: the objective must score the states the sampler visited. A rollout decoded in
# 2 steps per block and optimised as if decoded in 4 has a ratio away from 1 before the policy has
# moved at all, a bias that clipping then treats as a policy change. CJ-GRPO therefore trains with
# the same schedule it decodes with: `rl --objective=full_trajectory --ratio_level=step
# --schedule=ascending`, at 2 rather than 4 rows per response here (log₂ b against b; the
# saving grows with b: 5 against 32 rows for b = 32, `bench/bench_scaling.py`).

# %% [markdown]
# ## 6. The planning pitfall of left to right (Bachmann & Nagarajan, arXiv 2403.06963)
#
# Decoding order is not only a cost. On the star graph (`tasks/star.py`: a source with two arms of
# two nodes, the edges shuffled, "find the path from the source to the goal") the first step out
# of the source is a choice between two arms, and only the goal's end of the graph says which. A
# left-to-right model trained with teacher forcing sees the true prefix at every position, so every
# node after the first choice is "the child of the node before": one lookup, no planning. That
# shortcut (their "Clever Hans cheat") fits most of the training tokens and is useless at the one
# position that needs planning. Reversed, every node is "the parent of the node before", unique,
# and the shortcut is the solution. A masked-diffusion model is trained on every masking pattern,
# including those where the goal's side is hidden, and its decoder may reveal the node next to the
# goal first (the parent of the goal), then the one before it. The cell below measures the
# shortcut itself, with no model: the one-hop rule applied left to right on the test problems.

# %%
from minidtrpo.tasks import get_task  # noqa: E402


def one_hop_rule(problem: str, path_len: int, reverse: bool) -> str:
    """Decode left to right by the shortcut: from the first node, always follow the first listed
    edge out of (forward: a child of) or into (reversed: the parent of) the node before."""
    edges, ends = problem.split(":")
    here, there = (1, 0) if reverse else (0, 1)  # which end of an edge the path is at, and goes to
    path = [ends[here]]  # the source (forward) or the goal (reversed)
    for _ in range(path_len - 1):
        step = [e[there] for e in edges.split(",") if e[here] == path[-1]]
        path.append(step[0] if step else "?")
    return "".join(path)


for reverse in (False, True):
    star = get_task("star", reverse=reverse)
    prompts, _ = star.test_set(500)
    problems = [star.decode_problem(p) for p in prompts]
    decoded = [one_hop_rule(p, star.path_len, reverse) for p in problems]
    right = sum(map(star.score, problems, decoded)) / len(problems)
    print(f"star graph, {'reversed' if reverse else 'forward '}: the one-hop rule solves "
          f"{100 * right:.1f}% of {len(problems)} test problems")
    assert (right == 1.0) if reverse else (0.35 < right < 0.65)  # forward: a coin flip per arm

# %% [markdown]
# The forward shortcut solves about half (a coin flip at the first step); reversed it solves all.
# The planning pitfall table of docs/results.md trains the same star data at the same recipe (the
# task's 5,000 steps) with block size 1 (`sft --task=star --block_size=1 --t_min=1`: the block
# layout with one token per block is a left-to-right model, and t = 1 masks every token, which is
# exactly teacher forcing) and with the default masked-diffusion decoder (one block of 4, any order
# inside it), forward and reversed, three seeds each, and says what each learned. If seed 0's run
# folders exist (`runs/star/ar_fwd_s0`, `ar_rev_s0`, `diff_fwd_s0`, `diff_rev_s0`, made by the
# commands there), the cell below scores them.

# %%
for name in ("ar_fwd", "ar_rev", "diff_fwd", "diff_rev"):
    path = HERE.parent / "runs" / "star" / f"{name}_s0" / "checkpoint.pt"
    if path.exists() and not QUICK:
        star_model, star_task = load(str(path), "cpu")
        result = evaluate(star_model, star_task, star_task.test_set(500)[0])
        print(f"{name}: {100 * result['exact']:.1f}% of 500 test problems exact")

print(f"figure: {OUT / 'reveal_order.png'}")
