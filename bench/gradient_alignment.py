"""How much of a policy-gradient estimate points where the supervised gradient does.

    python bench/gradient_alignment.py --ckpt=runs/hard/sft/checkpoint.pt   # docs/results.md

On a sudoku checkpoint whose puzzles have one solution, the supervised gradient on the true
solutions is a direction that is known to improve the model. For each estimator of the policy
gradient ∇ mean_i A_i·score_i (GRPO advantages A, the rollouts of `batches` batches of
`num_prompts` prompts × G at τ = 1), it prints
- cos(g, g_sft) for one batch's gradient g, averaged over the batches;
- cos(g, g') between two batches' gradients (how much of g is signal rather than noise);
- cos(mean of the batches' g, g_sft) (what a `batches`× larger batch would give);
- a line search: greedy test accuracy after one sign step θ + η·sign(g) (an Adam-like first step)
  along the gradient of all batches together.
Scores: the exact trajectory log-probability (token terms), and BGPO's ELBO (per-token ℓ, n_mc 4)
with uniform masks, uniform masks shared by each group (`group_masks`), and masks from the
trajectory (`elbo_masks=trajectory`). Docs: docs/math.md §4.1, §4.3, §5.4.
"""

import copy
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import repeat

from minidtrpo.config import Config, arg, exit_on_bad_input, parse
from minidtrpo.elbo import elbo_terms, sample_elbo_masks, sample_trajectory_masks
from minidtrpo.estimators import trajectory_logprob
from minidtrpo.objectives import grpo_advantages
from minidtrpo.sft import sft_loss
from minidtrpo.train import evaluate, load, rollout


@dataclass
class AlignConfig(Config):
    """Cosine of policy-gradient estimates with the supervised gradient, and a line search."""
    ckpt: str = arg("runs/hard/sft/checkpoint.pt", "a block-layout sudoku checkpoint")
    num_prompts: int = arg(16, "prompts per batch", ge=1)
    num_generations: int = arg(8, "rollouts per prompt G", ge=2)
    batches: int = arg(4, "rollout batches (≥ 2 for the batch-to-batch cosine)", ge=2)
    sft_prompts: int = arg(512, "prompts of the supervised gradient (8 mask draws each)", ge=1)
    steps: str = arg("3e-5,1e-4", "sign-step sizes η of the line search (comma-separated)")
    eval_n: int = arg(500, "test puzzles of the line search", ge=1)
    seed: int = arg(0, "seed of prompts, rollouts and masks", ge=0)


def flat_grad(model):
    g = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad()
    return g


def main():
    cfg = parse(AlignConfig, sys.argv[1:], "python bench/gradient_alignment.py")
    torch.manual_seed(cfg.seed)
    model, task = load(cfg.ckpt, "cpu")
    gen, G = torch.Generator().manual_seed(cfg.seed), cfg.num_generations

    def supervised():
        x, y = task.sample(cfg.sft_prompts, "train", generator=gen)
        for _ in range(8):
            (sft_loss(model, x, y, gen)[0] / 8).backward()
        return -flat_grad(model)  # the descent direction of the supervised loss

    g_sft = supervised()
    again = F.cosine_similarity(g_sft, supervised(), 0).item()
    print(f"cos(supervised, supervised on other prompts) {again:.3f}")

    def elbo(traj, masks):  # (B, N) per-token ℓ at the rollout temperature
        return elbo_terms(model, traj.prompts, traj.responses, masks,
                          temperature=traj.logp_temperature)

    def uniform(traj, shared):
        B, L = traj.responses.shape
        g = G if shared else 1
        return repeat(sample_elbo_masks(B // g, L, 4, gen), "p n l -> (p g) n l", g=g)

    scores = {  # (trajectories, advantages) -> scalar whose gradient is the policy gradient
        "exact trajectory": lambda t, a: (a * trajectory_logprob(model, t)).mean(),
        "ELBO, uniform masks": lambda t, a: (a[:, None] * elbo(t, uniform(t, False))).mean(),
        "ELBO, uniform masks shared by a group": lambda t, a: (
            a[:, None] * elbo(t, uniform(t, True))).mean(),
        "ELBO, masks from the trajectory": lambda t, a: (
            a[:, None] * elbo(t, sample_trajectory_masks(t, 4, gen))).mean(),
    }
    grads = {k: [] for k in scores}
    for b in range(cfg.batches):
        prompts, _ = task.sample(cfg.num_prompts, "train", generator=gen)
        traj, rewards, _ = rollout(model, task, repeat(prompts, "p l -> (p g) l", g=G),
                                   temperature=1.0, generator=gen)
        adv, stats = grpo_advantages(rewards, G)
        for name, fn in scores.items():
            fn(traj, adv).backward()
            grads[name].append(flat_grad(model))
        print(f"batch {b}: reward {stats['reward_mean']:.3f}", flush=True)

    test, _ = task.sample(cfg.eval_n, "test", generator=torch.Generator().manual_seed(123))
    start = evaluate(model, task, test)["exact"]
    etas = [float(e) for e in cfg.steps.split(",")]
    print(f"\n{cfg.batches} batches of {cfg.num_prompts} prompts × {G}; greedy test exact at the "
          f"start {100 * start:.1f}% ({cfg.eval_n} puzzles)\n")
    print("| score | cos(g, g_sft), one batch | cos(g, g'), two batches | "
          f"cos(mean of {cfg.batches}, g_sft) | " + " | ".join(f"sign step {e:g}" for e in etas)
          + " |")
    print("|---|---|---|---|" + "---|" * len(etas))
    for name, gs in grads.items():
        one = sum(F.cosine_similarity(g, g_sft, 0).item() for g in gs) / len(gs)
        pairs = [F.cosine_similarity(gs[i], gs[i + 1], 0).item()
                 for i in range(0, len(gs) - 1, 2)]
        mean = torch.stack(gs).mean(0)
        after = []
        for eta in etas:
            stepped = copy.deepcopy(model)
            with torch.no_grad():
                offset = 0
                for p in stepped.parameters():
                    p.add_(eta * mean[offset:offset + p.numel()].view_as(p).sign())
                    offset += p.numel()
            after.append(evaluate(stepped, task, test)["exact"])
        print(f"| {name} | {one:+.3f} | {sum(pairs) / len(pairs):+.3f} | "
              f"{F.cosine_similarity(mean, g_sft, 0).item():+.3f} | "
              + " | ".join(f"{100 * a:.1f}%" for a in after) + " |", flush=True)


if __name__ == "__main__":
    exit_on_bad_input(main)
