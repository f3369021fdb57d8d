"""Benchmark of the objectives' update cost: BGPO's flat memory and dTRPO's cheap DPO update.

    python bench/bench_objectives.py                                    # ~3 minutes on a 2-core CPU
    python bench/bench_objectives.py --ckpt=runs/h2h/sft/checkpoint.pt  # a trained model's rollouts
    python bench/bench_objectives.py --device=cuda

Everything runs side by side in one process, on one batch of rollouts, through the update functions
the training commands use (`updates.UPDATES`, `preference.DPO_ESTIMATORS`), so it measures the code
that trains:
1. online updates (B = num_prompts × G responses, advantages A ~ N(0, 1) from a seeded generator:
   the cost of an update does not depend on A's values): bgpo, vrpo_ol (one graph) and
   vrpo_ol_two_pass (`--vrpo_two_pass`) at n_mc = 1, 4, 16, on-policy, and at n_mc = 4 off-policy
   (μ = 2 optimizer steps per batch: the old values' pass, then each step's); full_trajectory and
   diffu_grpo; for each, the median seconds of one update, the model rows run forward per
   response, and the peak bytes autograd saves for backward (the activation memory,
   `meters.SavedBytes`; on CUDA also the peak allocation);
2. DPO updates on the same pairs (the rollouts paired two by two): dTRPO (one [x ; y ; ỹ] pass per
   response and model in the block layout, one pass per block state in the full one),
   exact-trajectory DPO with flat memory (the default) and with plain autograd.
Targets: bgpo's and vrpo_ol_two_pass's peaks at n_mc = 16 within 1.2× of n_mc = 1 while vrpo_ol's
grows; a dTRPO update
≤ 1/4 of an exact-trajectory DPO update. The ratios are printed and saved as JSON; a figure shows
peak saved memory against n_mc.

Without --ckpt the model is the default sudoku model (`--layout`, full by default) at its random
initialisation, with its logits spread so that sampling is not uniform: update costs depend on
shapes, not on what was learned.
"""

import copy
import json
import os
import sys
import time
from dataclasses import dataclass

import torch

from minidtrpo.config import (Config, arg, device_arg, exit_on_bad_input, folder_problem, parse,
                              pick_device)
from minidtrpo.model import LAYOUTS, MaskedDiffusionTransformer
from minidtrpo.preference import DPO_ESTIMATORS, DPOConfig
from minidtrpo.rl import RLConfig
from minidtrpo.sampling import Trajectory
from minidtrpo.tasks import get_task
from minidtrpo.meters import Meters
from minidtrpo.sft import model_config
from minidtrpo.train import load, rollout
from minidtrpo.updates import UPDATES


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, policy, ref, device, responses: int, repeat: int) -> dict:
    """Median seconds of fn() over `repeat` runs (after one warm-up run), with its rows and saved
    bytes."""
    fn()
    policy.zero_grad(set_to_none=True)
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        with Meters(device, policy, ref) as meters:
            fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        # the weights never move: every repeat is the same update
        policy.zero_grad(set_to_none=True)
    out = {"update_s": sorted(times)[len(times) // 2], **meters.summary(responses)}
    # the process's peak so far: not a per-update figure in a shared process
    out.pop("rss_mb", None)
    return out


def online(name, n_mc, mu, policy, ref, traj, adv, device, repeat) -> dict:
    # n_mc 0: an objective without ELBO samples; vrpo_ol_two_pass: vrpo_ol --vrpo_two_pass
    two_pass = name.endswith("_two_pass")
    cfg = RLConfig(objective=name.removesuffix("_two_pass"), vrpo_two_pass=two_pass,
                   n_mc=n_mc or 1, num_iterations=mu)
    gen = torch.Generator(device).manual_seed(0)

    def update():
        gen.manual_seed(0)  # the same masks (ELBO) or prompt mask (one-step) at every repeat
        # step: keep the weights fixed
        UPDATES[cfg.objective](cfg, policy, ref, traj, adv, gen, step=lambda: None)

    return measure(update, policy, ref, device, len(adv), repeat)


def dpo(estimator, flat_memory, policy, ref, both, device, repeat) -> dict:
    cfg = DPOConfig(estimator=estimator, flat_memory=flat_memory)
    gen = torch.Generator(device).manual_seed(0)

    def update():
        gen.manual_seed(0)  # the same s_b draws at every repeat
        DPO_ESTIMATORS[estimator](cfg, policy, ref, both, gen)

    return measure(update, policy, ref, device, len(both.tokens), repeat)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, style in (("bgpo", "o-"), ("vrpo_ol", "s--"), ("vrpo_ol_two_pass", "^:")):
        pts = sorted((r["n_mc"], r["peak_saved_mb"]) for r in rows
                     if r["objective"] == name and r["mu"] == 1)
        ax.plot(*zip(*pts), style, label=name)
    ax.set(xlabel="Monte Carlo samples n_mc", ylabel="peak MB saved for backward", xscale="log",
           title="activation memory of one update")
    ax.set_xticks([1, 4, 16], ["1", "4", "16"])
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclass
class BenchConfig(Config):
    """One update per objective on the same rollouts: seconds, forward rows, activation memory."""
    ckpt: str = arg("", "checkpoint whose rollouts to score (default: a fresh model)")
    layout: str = arg("full", "layout of the fresh model", LAYOUTS)
    num_prompts: int = arg(16, "prompts per batch (the cost per response is what is compared)",
                           ge=1)
    num_generations: int = arg(8, "rollouts per prompt G (even: the DPO rows pair them up)", ge=2,
                               valid=lambda g: None if g % 2 == 0 else "an even int")
    repeat: int = arg(3, "timed runs per update (the median is reported)", ge=1)
    device: str = device_arg()
    out: str = arg("runs/bench_objectives", "folder for the JSON and the figure",
                   valid=folder_problem)


def main():
    args = parse(BenchConfig, sys.argv[1:], "python bench/bench_objectives.py")
    device = pick_device(args.device)
    if args.ckpt:
        ref, task = load(args.ckpt, device)
    else:
        task = get_task("sudoku")
        with torch.random.fork_rng(devices=[]):  # a seeded init; the global RNG left as it was
            torch.manual_seed(0)
            ref = MaskedDiffusionTransformer(model_config(task, layout=args.layout),
                                             verbose=False).to(device)
        with torch.no_grad():
            ref.head.weight.mul_(20.0)  # a fresh init predicts almost uniformly; spread its logits
    ref.requires_grad_(False)
    policy = copy.deepcopy(ref).requires_grad_(True)
    B = args.num_prompts * args.num_generations
    prompts, _ = task.sample(args.num_prompts, "train", generator=torch.Generator().manual_seed(0))
    traj, _, _ = rollout(ref, task, prompts.repeat_interleave(args.num_generations, 0).to(device),
                         temperature=1.0, remasking="low_confidence", steps_per_block=0,
                         generator=torch.Generator(device).manual_seed(1))
    adv = torch.randn(B, generator=torch.Generator().manual_seed(2)).to(device)  # (B,)
    # B/2 pairs, 2 rows each
    both = Trajectory.cat([traj.index(slice(0, B // 2)), traj.index(slice(B // 2, B))])
    print(f"{task!r}, layout={ref.config.layout}, {B} responses, "
          f"T = {traj.num_steps} decoding steps")

    rows = []
    elbo = ("bgpo", "vrpo_ol", "vrpo_ol_two_pass")
    jobs = [(name, n, 1) for name in elbo for n in (1, 4, 16)] + [(name, 4, 2) for name in elbo]
    jobs += [("full_trajectory", 0, 1), ("diffu_grpo", 0, 1)]
    for name, n_mc, mu in jobs:  # mu: optimizer steps per batch (num_iterations)
        rows.append({"objective": name, "n_mc": n_mc, "mu": mu,
                     **online(name, n_mc, mu, policy, ref, traj, adv, device, args.repeat)})
    for estimator, flat in (("dtrpo", True), ("full_trajectory", True), ("full_trajectory", False)):
        label = "dpo_" + estimator + ("" if estimator == "dtrpo"
                                      else ", flat memory" if flat else ", plain autograd")
        rows.append({"objective": label, "n_mc": 0, "mu": 1,
                     **dpo(estimator, flat, policy, ref, both, device, args.repeat)})

    print("\n| update | n_mc | μ | seconds | passes/response | saved MB, activation proxy |\n"
          "|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['objective']} | {r['n_mc'] or '—'} | {r['mu']} | {r['update_s']:.3f} | "
              f"{r['passes_per_response']:.1f} | {r['peak_saved_mb']:.1f} |")
    pick = {(r["objective"], r["n_mc"], r["mu"]): r for r in rows}
    ratios = {
        **{f"{name}_peak_16_over_1": pick[name, 16, 1]["peak_saved_mb"]
           / pick[name, 1, 1]["peak_saved_mb"] for name in elbo},
        "dtrpo_over_exact_dpo_seconds": pick["dpo_dtrpo", 0, 1]["update_s"]
        / pick["dpo_full_trajectory, flat memory", 0, 1]["update_s"],
        "dtrpo_over_exact_dpo_seconds_plain": pick["dpo_dtrpo", 0, 1]["update_s"]
        / pick["dpo_full_trajectory, plain autograd", 0, 1]["update_s"],
    }
    print(f"\nbgpo peak saved memory, n_mc 16 / 1: {ratios['bgpo_peak_16_over_1']:.2f}x, "
          f"vrpo_ol_two_pass: {ratios['vrpo_ol_two_pass_peak_16_over_1']:.2f}x (target <= 1.2)")
    print(f"vrpo_ol peak saved memory, n_mc 16 / 1: {ratios['vrpo_ol_peak_16_over_1']:.2f}x "
          "(grows with n_mc)")
    print("dTRPO DPO update / exact-trajectory DPO update: "
          f"{ratios['dtrpo_over_exact_dpo_seconds']:.3f} (flat memory), "
          f"{ratios['dtrpo_over_exact_dpo_seconds_plain']:.3f} (plain autograd) (target <= 0.25)")
    os.makedirs(args.out, exist_ok=True)
    plot([r for r in rows if r["objective"] in elbo],
         os.path.join(args.out, "memory_vs_nmc.png"))
    result = {"device": str(device), "threads": torch.get_num_threads(), "ckpt": args.ckpt,
              "responses": B, "rows": rows, "ratios": ratios}
    with open(os.path.join(args.out, "bench_objectives.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(ratios))


if __name__ == "__main__":
    exit_on_bad_input(main)
