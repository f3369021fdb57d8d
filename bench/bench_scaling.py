"""How an update's cost grows with the decoding steps T_B and the Monte Carlo samples n_mc.

    python bench/bench_scaling.py                 # a few minutes on a 2-core CPU
    python bench/bench_scaling.py --quick         # small sizes, for the tests
    python bench/bench_scaling.py --device=cuda

A random-initialised block-layout model with a long response (L = 64 in two blocks of b = 32; its
logits spread so that sampling is not uniform: update costs depend on shapes, not on what was
learned). Everything runs side by side in one process, through the update functions the training
commands use:
1. against T_B ∈ {2, 4, 8, 16, 32} (responses decoded with T_B steps per block): one DPO update with
   the exact trajectory log-ratio (`dpo --estimator=full_trajectory --flat_memory=false`, T_B
   `[x ; y ; ỹ]` passes per response, the fewest rows of the two ways it can run) and with dTRPO's
   single pass (`dpo --estimator=dtrpo`, one pass); and the exact update on responses decoded
   with CJ-GRPO's ascending schedule (1, 2, 4, 8, 17: five steps per block).
   The reference's terms are read from the record (the reference decoded the pairs), so each
   update runs only the policy.
   The dial between the two, for T_B ∈ {4, 8, 16}: dTRPO's update scoring K ∈ {1, 2, 4, …, T_B}
   steps per block (`dpo --estimator=dtrpo --steps_scored=K`), all K copies of every block in one
   [x ; y ; ỹ¹ … ỹᴷ] pass of P + (K+1)·L tokens.
2. against n_mc ∈ {1, 2, 4, 8, 16, 32}: one online BGPO update (`rl --objective=bgpo`, gradients
   accumulated one Monte Carlo sample at a time), one VRPO-OL update (the exp-of-mean objective,
   one graph over all samples) and one two-pass VRPO-OL update (`--vrpo_two_pass`: the same
   gradient, one sample's graph at a time after a no-grad pass for its factor), on-policy (μ = 1
   optimizer step per batch); and off-policy (μ = 2: the old values' pass, then each step's; the
   two-pass form's no-grad pass runs in the second step): the two-pass update at every n_mc, all
   three at n_mc = 4.
For each: the median seconds, the model rows run forward per response, and the peak bytes autograd
saves for backward (`meters.SavedBytes`). Ends with one JSON line: the seconds ratio dTRPO / exact
per T_B, the dial's rows (T_B, K, seconds, rows per response, saved MB), each ELBO objective's
activation memory over its n_mc = 1 value (μ = 1, and the two-pass
form's at μ = 2 too), and each one's rows per response at μ = 2, n_mc = 4. Log-log figures go to
--out.
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
from minidtrpo.meters import Meters
from minidtrpo.model import MaskedDiffusionTransformer, ModelConfig
from minidtrpo.preference import DPO_ESTIMATORS, DPOConfig
from minidtrpo.rl import RLConfig
from minidtrpo.sampling import Trajectory, generate
from minidtrpo.updates import UPDATES


@dataclass
class ScalingConfig(Config):
    """One update per objective and size on a fresh long-response model: seconds, rows, memory."""
    quick: bool = arg(False, "small sizes (L = 16, T_B ≤ 8, n_mc ≤ 8): a smoke run for the tests")
    pairs: int = arg(8, "preference pairs of the DPO updates", ge=1)
    responses: int = arg(8, "responses of the online updates (groups of 4)", ge=4,
                         valid=lambda n: None if n % 4 == 0 else "a multiple of 4")
    repeat: int = arg(3, "timed runs per update (the median is reported)", ge=1)
    device: str = device_arg()
    out: str = arg("runs/bench_scaling", "folder for the JSON and the figures",
                   valid=folder_problem)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, policy, device, responses: int, repeat: int) -> dict:
    """Median seconds of fn() over `repeat` runs after a warm-up, with its rows and saved bytes."""
    fn()
    policy.zero_grad(set_to_none=True)
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        with Meters(device, policy) as meters:
            fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        policy.zero_grad(set_to_none=True)  # the weights never move: every repeat is the same
    return {"seconds": sorted(times)[len(times) // 2], **meters.summary(responses)}


def dpo_update(estimator, policy, ref, both, device, repeat, steps_scored=1) -> dict:
    # plain autograd for the exact estimator: T_B rows per response (flat memory would run 2·T_B)
    cfg = DPOConfig(estimator=estimator, flat_memory=False, steps_scored=steps_scored)
    gen = torch.Generator(device).manual_seed(0)

    def update():
        gen.manual_seed(0)  # the same s_b draws at every repeat
        DPO_ESTIMATORS[estimator](cfg, policy, ref, both, gen)

    return measure(update, policy, device, len(both.tokens), repeat)


def online_update(name, n_mc, mu, policy, ref, traj, adv, device, repeat) -> dict:
    # vrpo_ol_two_pass: vrpo_ol --vrpo_two_pass; mu optimizer steps per batch (num_iterations)
    two_pass = name.endswith("_two_pass")
    cfg = RLConfig(objective=name.removesuffix("_two_pass"), vrpo_two_pass=two_pass, n_mc=n_mc,
                   num_iterations=mu)
    gen = torch.Generator(device).manual_seed(0)

    def update():
        gen.manual_seed(0)  # the same ELBO masks at every repeat
        # step: keep the weights fixed (the second step's cost does not depend on them)
        UPDATES[cfg.objective](cfg, policy, ref, traj, adv, gen, step=lambda: None)

    return measure(update, policy, device, len(adv), repeat)


def plot(rows, key, xs, path, title, xlabel, ylabel):
    """One line per update against `key` on log-log axes, labelled at the measured xs only."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter
    fig, ax = plt.subplots(figsize=(5.4, 3.8))
    for name in dict.fromkeys(r["update"] for r in rows):
        pts = [(r[key], r["y"]) for r in rows if r["update"] == name]
        ax.plot(*zip(*pts), "o-" if len(pts) > 1 else "k*", label=name, ms=5 if len(pts) > 1 else 9)
    ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel, title=title)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.xaxis.set_minor_formatter(NullFormatter())  # no "2×10¹" between the measured points
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    args = parse(ScalingConfig, sys.argv[1:], "python bench/bench_scaling.py")
    device = pick_device(args.device)
    L, b = (16, 8) if args.quick else (64, 32)
    steps = [2, 4, 8] if args.quick else [2, 4, 8, 16, 32]
    dial_steps = [4, 8] if args.quick else [4, 8, 16]  # T_B of the dial
    n_mcs = [1, 2, 4, 8] if args.quick else [1, 2, 4, 8, 16, 32]
    cfg = ModelConfig(vocab_size=48, mask_id=47, prompt_len=16, response_len=L, block_size=b)
    with torch.random.fork_rng(devices=[]):  # a seeded init; the global RNG left as it was
        torch.manual_seed(0)
        ref = MaskedDiffusionTransformer(cfg, verbose=False).to(device)
    with torch.no_grad():
        ref.head.weight.mul_(20.0)  # a fresh init predicts almost uniformly; spread its logits
    ref.requires_grad_(False)
    policy = copy.deepcopy(ref).requires_grad_(True)
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, 47, (2 * args.pairs, 16), generator=gen).to(device)

    def pairs(**decoding):  # 2·pairs responses decoded by the reference, paired two by two
        traj = generate(ref, prompts, temperature=1.0, generator=torch.Generator(device)
                        .manual_seed(2), **decoding)
        half = args.pairs
        return Trajectory.cat([traj.index(slice(0, half)), traj.index(slice(half, None))])

    print(f"block layout, L = {L}, b = {b}, {args.pairs} pairs, {args.responses} online responses, "
          f"{torch.get_num_threads()} threads, {device}")
    by_steps, dial = [], []
    for T_B in steps:
        both = pairs(steps_per_block=T_B)
        for est in ("full_trajectory", "dtrpo"):
            by_steps.append({"update": f"dpo {est}", "T_B": T_B,
                             **dpo_update(est, policy, ref, both, device, args.repeat)})
        for K in [2 ** j for j in range(T_B.bit_length()) if 2 ** j <= T_B] \
                if T_B in dial_steps else []:  # K = 1, 2, 4, ..., T_B
            r = dpo_update("dtrpo", policy, ref, both, device, args.repeat, steps_scored=K)
            dial.append({"T_B": T_B, "K": K, "seconds": r["seconds"],
                         "rows_per_response": r["passes_per_response"],
                         "tokens_per_row": cfg.prompt_len + (K + 1) * L,
                         "peak_saved_mb": r["peak_saved_mb"]})
    asc = pairs(schedule="ascending")
    by_steps.append({"update": "dpo full_trajectory, ascending", "T_B": asc.steps_per_block,
                     **dpo_update("full_trajectory", policy, ref, asc, device, args.repeat)})

    traj = generate(ref, prompts[:args.responses], temperature=1.0,
                    generator=torch.Generator(device).manual_seed(3))
    adv = torch.randn(args.responses, generator=gen).to(device)
    elbo = ("bgpo", "vrpo_ol", "vrpo_ol_two_pass")
    jobs = [(name, 1, n) for name in elbo for n in n_mcs]  # (update, μ, n_mc)
    jobs += [("vrpo_ol_two_pass", 2, n) for n in n_mcs] + [(name, 2, 4) for name in elbo[:2]]
    by_nmc = [{"update": name, "mu": mu, "n_mc": n,
               **online_update(name, n, mu, policy, ref, traj, adv, device, args.repeat)}
              for name, mu, n in jobs]

    print("\n| update | T_B | seconds | passes/response | saved MB, activation proxy |"
          "\n|---|---|---|---|---|")
    for r in by_steps:
        print(f"| {r['update']} | {r['T_B']} | {r['seconds']:.3f} | "
              f"{r['passes_per_response']:.1f} | {r['peak_saved_mb']:.1f} |")
    exact_s = {r["T_B"]: r["seconds"] for r in by_steps if r["update"] == "dpo full_trajectory"}
    print("\n| dial: dtrpo, K steps per block | T_B | K | seconds | rows/response | tokens/row | "
          "saved MB | exact's seconds |\n|---|---|---|---|---|---|---|---|")
    for r in dial:
        print(f"| K = {r['K']} of {r['T_B']} | {r['T_B']} | {r['K']} | {r['seconds']:.3f} | "
              f"{r['rows_per_response']:.1f} | {r['tokens_per_row']} | {r['peak_saved_mb']:.1f} | "
              f"{exact_s[r['T_B']]:.3f} |")
    print("\n| update | μ | n_mc | seconds | passes/response | saved MB, activation proxy |\n"
          "|---|---|---|---|---|---|")
    for r in by_nmc:
        print(f"| {r['update']} | {r['mu']} | {r['n_mc']} | {r['seconds']:.3f} | "
              f"{r['passes_per_response']:.1f} | {r['peak_saved_mb']:.1f} |")

    def pick(rows, name, key, x, mu=1):
        return next(r for r in rows if r["update"] == name and r[key] == x
                    and r.get("mu", 1) == mu)

    def memory_ratio(name, mu=1):  # peak saved bytes over n_mc, relative to n_mc = 1
        return [pick(by_nmc, name, "n_mc", n, mu)["peak_saved_mb"]
                / pick(by_nmc, name, "n_mc", 1, mu)["peak_saved_mb"] for n in n_mcs]
    result = {
        "T_B": steps,
        "dtrpo_over_exact": [pick(by_steps, "dpo dtrpo", "T_B", t)["seconds"]
                             / pick(by_steps, "dpo full_trajectory", "T_B", t)["seconds"]
                             for t in steps],
        "ascending_steps_per_block": asc.steps_per_block,
        "dial": [{k: r[k] for k in ("T_B", "K", "seconds", "rows_per_response", "peak_saved_mb")}
                 for r in dial],
        "n_mc": n_mcs,
        **{f"{name}_memory_ratio": memory_ratio(name) for name in elbo},
        "vrpo_ol_two_pass_memory_ratio_mu2": memory_ratio("vrpo_ol_two_pass", mu=2),
        "rows_per_response_mu2_nmc4": {name: pick(by_nmc, name, "n_mc", 4, 2)["passes_per_response"]
                                       for name in elbo},
    }
    print("\ndTRPO / exact seconds per T_B: "
          + ", ".join(f"{t}: {r:.3f} (1/T_B = {1 / t:.3f})"
                      for t, r in zip(steps, result["dtrpo_over_exact"])))
    os.makedirs(args.out, exist_ok=True)
    note = f"median of {args.repeat}, one seed, {device}"
    plot([{**r, "y": r["seconds"]} for r in by_steps], "T_B", steps,
         os.path.join(args.out, "seconds_vs_steps.png"), f"one DPO update ({note})",
         "T_B, decoding steps per block", "seconds")
    exact_at_t_b = [{"update": "exact, T_B rows (drawn at K = T_B)", "K": t, "y": exact_s[t]}
                    for t in dial_steps]
    plot([{"update": f"dtrpo, K of T_B = {r['T_B']}", "K": r["K"], "y": r["seconds"]}
          for r in dial] + exact_at_t_b, "K", sorted({r["K"] for r in dial}),
         os.path.join(args.out, "dial.png"), f"one DPO update ({note})",
         "K, steps scored per block (one pass of P + (K+1)·L tokens)", "seconds")
    plot([{**r, "y": r["peak_saved_mb"]} for r in by_nmc if r["mu"] == 1], "n_mc", n_mcs,
         os.path.join(args.out, "memory_vs_nmc.png"), f"one online update, μ = 1 ({note})",
         "n_mc, Monte Carlo samples per response", "MB saved for backward (activation proxy)")
    with open(os.path.join(args.out, "bench_scaling.json"), "w") as f:
        json.dump({"device": str(device), "threads": torch.get_num_threads(), "L": L, "b": b,
                   "by_steps": by_steps, "by_nmc": by_nmc, "dial_rows": dial, **result}, f,
                  indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    exit_on_bad_input(main)
